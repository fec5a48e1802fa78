"""Which BN layers feed which: the graph facts the diagnosis and ``recalibrate`` need."""

from __future__ import annotations

from bnscope.onnxio.bn import is_batchnorm
from bnscope.onnxio.graph import GraphView


def bn_upstream(view: GraphView) -> dict[str, set[str]]:
    """For every BN, the names of the BNs its input depends on (one topological sweep)."""
    ancestors: dict[str, frozenset[str]] = {}
    result = {}
    for idx, node in enumerate(view.nodes):
        above = frozenset().union(*(ancestors.get(t, frozenset()) for t in node.input if t))
        if is_batchnorm(node):
            result[view.node_name(idx)] = set(ancestors.get(node.input[0], frozenset()))
            above = above | {view.node_name(idx)}
        for out in node.output:
            ancestors[out] = above
    return result
