"""Graph surgery primitives shared by the rewrites (fold, recalibrate): constants, renames, cleanup.

Rewritten tensors keep their names when nothing else reads them; shared, derived or overridable
ones get a fresh initializer so other readers are untouched. IR-3 models also list every new
initializer as a graph input, as that IR requires.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnscope.onnxio.constants import CONST_PASSTHROUGH
from bnscope.onnxio.graph import GraphView


class GraphEditor:
    """Mutations of one or more rewrites; node insertions and removals, and the value_info of renamed
    tensors, are applied in :meth:`commit` (one pass over the graph however many rewrites).

    ``suffix`` names fresh initializers made for shared or derived tensors (``weight_bnfold``).
    """

    def __init__(self, model: onnx.ModelProto, view: GraphView, suffix: str = "_bnfold"):
        self.model, self.view, self.suffix = model, view, suffix
        self.graph = model.graph
        self.removed: list[onnx.NodeProto] = []
        self.inserted: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
        self._renamed: set[str] = set()
        self._taken = all_names(model)

    def fresh(self, base: str) -> str:
        return fresh_name(base, self._taken)

    def add_initializer(self, base: str, value: np.ndarray, dtype) -> str:
        name = self.fresh(base)
        tensor = self.graph.initializer.add()
        tensor.name = name
        self._store_value(tensor, value, dtype)
        ir3 = self.model.ir_version < 4
        if ir3:  # IR 3: every initializer must also be a graph input
            self.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, tensor.dims))
        self.view.add_initializer(tensor, as_input=ir3)
        return name

    def set_input(self, node: onnx.NodeProto, pos: int, value: np.ndarray, dtype) -> None:
        """Point ``node.input[pos]`` at ``value``: in place if only this node reads a plain
        initializer, else through a fresh initializer."""
        old = node.input[pos] if len(node.input) > pos else ""
        if old and self._exclusively_owned(old, node):
            self._store_value(self.view.initializers[old], value, dtype)
            self.view.forget(old)
            return
        name = self.add_initializer((old or f"{node.name}_bias") + self.suffix, value, dtype)
        while len(node.input) <= pos:
            node.input.append("")
        node.input[pos] = name

    def _store_value(self, tensor: onnx.TensorProto, value: np.ndarray, dtype) -> None:
        """Sets ``tensor`` to ``value`` cast once to ``dtype``, through the view's store when there
        is one: a spilling store keeps big weights out of the protobuf (multi-GB models)."""
        if self.view.store is not None:
            self.view.store.put(tensor, value, dtype)
        else:
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(value).astype(dtype), tensor.name))

    def _exclusively_owned(self, name: str, node: onnx.NodeProto) -> bool:
        view = self.view
        if name not in view.initializers or name in view.input_names:
            return False
        readers = view.consumers_of(name)
        return len(readers) == 1 and view.nodes[readers[0]] is node and list(node.input).count(name) == 1

    def set_attribute(self, node: onnx.NodeProto, name: str, value) -> None:
        for attr in node.attribute:
            if attr.name == name:
                node.attribute.remove(attr)
                break
        node.attribute.append(helper.make_attribute(name, value))

    def rename_output(self, node: onnx.NodeProto, new: str) -> None:
        self._renamed.add(node.output[0])
        node.output[0] = new

    def remove_node(self, node: onnx.NodeProto) -> None:
        self.removed.append(node)

    def insert_after(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
        self.inserted.append((anchor, node))

    def commit(self) -> None:
        """Applies the insertions and removals in one sweep from the end of the node list; a node
        inserted after the same anchor later comes first, as repeated inserts at anchor + 1 place it."""
        # upb keeps node references valid across insert/delete, so edit in place (no copies).
        followers: dict[int, list[onnx.NodeProto]] = {}
        for anchor, new in self.inserted:
            followers.setdefault(id(anchor), []).insert(0, new)
        gone = {id(n) for n in self.removed}
        nodes = self.graph.node
        for i in reversed(range(len(nodes))):
            node = nodes[i]
            for new in reversed(_with_followers(node, followers)[1:]):
                nodes.insert(i + 1, new)
            if id(node) in gone:
                del nodes[i]
        self.removed, self.inserted = [], []
        if self._renamed:
            drop_value_info(self.graph, self._renamed)
            self._renamed = set()


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first not in ``taken``, which it joins."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def all_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
    for node in g.node:
        names.update(node.output)
        names.add(node.name)
    return names


def _with_followers(node: onnx.NodeProto, followers: dict) -> list[onnx.NodeProto]:
    """``node``, then each node inserted after it (each followed by those inserted after it)."""
    out = [node]
    for new in followers.get(id(node), ()):
        out.extend(_with_followers(new, followers))
    return out


def drop_value_info(graph: onnx.GraphProto, names: str | set[str]) -> None:
    names = {names} if isinstance(names, str) else names
    keep = [vi for vi in graph.value_info if vi.name not in names]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)


def remove_dead(model: onnx.ModelProto) -> None:
    """Drop initializers nothing reads and constant-making nodes whose outputs nothing reads.

    Deletes by index in place: rebuilding the repeated fields would copy every (inline) weight,
    which dominated folding time on multi-GB models. The ops removed have no side effects.
    """
    graph = model.graph
    while True:
        view = GraphView(model)
        dead = [
            i
            for i, n in enumerate(view.nodes)
            if n.op_type in PURE_CONSTANT_OPS and all(not o or view.use_count(o) == 0 for o in n.output)
        ]
        if not dead:
            break
        _delete(graph.node, dead)
    view = GraphView(model)
    used = set(view.consumers) | set(view.output_names)
    unused = {t.name for t in graph.initializer if t.name not in used}
    _delete(graph.initializer, [i for i, t in enumerate(graph.initializer) if t.name in unused])
    _delete(graph.input, [i for i, vi in enumerate(graph.input) if vi.name in unused])
    produced = used | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    _delete(graph.value_info, [i for i, vi in enumerate(graph.value_info) if vi.name not in produced])


def _delete(field, indices: list[int]) -> None:
    for i in reversed(indices):
        del field[i]


PURE_CONSTANT_OPS = {"Constant", *CONST_PASSTHROUGH}


def set_running_statistics(model: onnx.ModelProto, stats: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Points each BN's mean/var inputs (inputs 3 and 4) at new values, ``stats`` naming the BN node ->
    ``(mean, var)``, cast to the stored dtype: one view and one editor for all of them (an exclusively
    owned initializer is rewritten in place, anything else goes through a fresh ``*_recalibrated`` one)."""
    view = GraphView(model)
    editor = GraphEditor(model, view, suffix="_recalibrated")
    for name, (mean, var) in stats.items():
        node = view.nodes[view.index_of(name)]
        for pos, value in ((3, mean), (4, var)):
            const = view.constant(node.input[pos])
            dtype = const.value.dtype if const is not None else np.float32
            shape = const.value.shape if const is not None else (-1,)
            editor.set_input(node, pos, np.asarray(value, np.float64).reshape(shape), dtype)
    remove_dead(model)
