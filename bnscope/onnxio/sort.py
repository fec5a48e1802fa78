"""Topological order of a graph's nodes (subgraph reads included): checking, sorting in place
(stable: ties keep graph order) and naming the nodes of a cycle.
"""

from __future__ import annotations

import heapq

import onnx

from bnscope.onnxio.nodes import subgraphs


def topological_order(graph: onnx.GraphProto) -> list[int] | None:
    """Node indices in a topological order (stable: ties keep graph order), or None on a cycle.

    A node depends on the producers of its inputs, including names its subgraphs read from outside.
    """
    order = _reachable_order(graph)
    return order if len(order) == len(graph.node) else None


def sort_graph_nodes(graph: onnx.GraphProto) -> bool | None:
    """Put ``graph``'s own nodes in topological order, in place (subgraphs are not touched).

    Returns True when it reordered them, False when they were in order, None on a cycle (nothing
    moves).
    """
    order = topological_order(graph)
    if order is None:
        return None
    if order == list(range(len(order))):
        return False
    nodes = [onnx.NodeProto() for _ in order]
    for node, i in zip(nodes, order):
        node.CopyFrom(graph.node[i])
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def unsortable_nodes(graph: onnx.GraphProto) -> list[int]:
    """Indices of the nodes no topological order can place (on a cycle or behind one); [] for a DAG.

    The complement of the nodes :func:`topological_order` reaches, in graph order.
    """
    reached = set(_reachable_order(graph))
    return [i for i in range(len(graph.node)) if i not in reached]


def _reachable_order(graph: onnx.GraphProto) -> list[int]:
    """Kahn's algorithm (stable: ties keep graph order): the nodes it can order, in that order."""
    nodes = list(graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    waiting = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for j in {producer[name] for name in all_node_inputs(node) if name in producer}:
            if j != i:
                waiting[i] += 1
                users[j].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    return order


def all_node_inputs(node: onnx.NodeProto):
    """The node's inputs plus names its subgraphs (If/Loop/Scan bodies) read from outside."""
    yield from (name for name in node.input if name)
    for sub in subgraphs(node):
        yield from _outer_names(sub)


def _outer_names(graph: onnx.GraphProto):
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        for name in all_node_inputs(node):
            if name not in local:
                yield name
        local.update(node.output)
