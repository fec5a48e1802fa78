"""Read-only queries over an ONNX graph: producers, consumers, constants, shapes, BN sites.

A tensor is *constant* when it is an initializer, the output of a Constant node, or the output of
a small constant subgraph (Identity, Cast, Transpose, Reshape, Flatten, Squeeze, Unsqueeze,
ConstantOfShape) whose inputs are constant. Initializers that are also listed as graph inputs
(old exporters' ``keep_initializers_as_inputs``) are *overridable*: a runtime may feed them, so
they are reported as such and callers decide whether to trust them."""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx
from onnx import numpy_helper

from bnscope.onnxio.bn import is_batchnorm
from bnscope.onnxio.constants import CONST_PASSTHROUGH, constant_node_value, evaluate
from bnscope.onnxio.external_data import TensorStore, is_external
from bnscope.onnxio.nodes import default_opset
from bnscope.onnxio.sort import all_node_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Constant:
    """A constant tensor value and where it came from."""

    value: np.ndarray
    overridable: bool  # comes from an initializer that is also a graph input
    via: tuple[str, ...] = ()  # op types between the stored tensor and this name, e.g. ("Constant",)

    @property
    def is_plain_initializer(self) -> bool:
        return not self.via


class GraphView:
    """Indexes a model's main graph once; answers structural questions without copying weights."""

    def __init__(
        self,
        model: onnx.ModelProto,
        store: TensorStore | None = None,
        value_infos: dict[str, onnx.ValueInfoProto] | None = None,
    ):
        self.model = model
        self.graph = model.graph
        self.store = store
        self.nodes: list[onnx.NodeProto] = list(self.graph.node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.input_names = [i.name for i in self.graph.input]
        self.output_names = [o.name for o in self.graph.output]
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for idx, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = idx
            for name in all_node_inputs(node):
                self.consumers.setdefault(name, []).append(idx)
        self._const_cache: dict[str, Constant | None] = {}
        self._gone: set[int] = set()  # indices of nodes a rewrite removed (see :meth:`relink`)
        self._names = _stable_names(self.nodes)
        self._index = {name: i for i, name in enumerate(self._names)}
        if value_infos is not None:  # shapes survive folds; reuse them instead of re-inferring
            self.__dict__["value_infos"] = value_infos

    # -- model facts --------------------------------------------------------------------------
    @cached_property
    def opset(self) -> int:
        return default_opset(self.model)

    @cached_property
    def real_inputs(self) -> list[onnx.ValueInfoProto]:
        """Graph inputs that are not initializers (what a user must feed)."""
        return [i for i in self.graph.input if i.name not in self.initializers]

    def node_name(self, idx: int) -> str:
        """The node's name, or a stable generated id (``OpType#k``) when it has none."""
        return self._names[idx]

    def index_of(self, name: str) -> int:
        return self._index[name]

    # -- structure ----------------------------------------------------------------------------
    def producer_of(self, tensor: str) -> int | None:
        return self.producer.get(tensor)

    def consumers_of(self, tensor: str) -> list[int]:
        return self.consumers.get(tensor, [])

    def use_count(self, tensor: str) -> int:
        """Consumers plus one if the tensor is a graph output."""
        return len(self.consumers_of(tensor)) + (tensor in self.output_names)

    def is_graph_output(self, tensor: str) -> bool:
        return tensor in self.output_names

    def is_graph_input(self, tensor: str) -> bool:
        return tensor in self.input_names and tensor not in self.initializers

    def bn_indices(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if is_batchnorm(n) and i not in self._gone]

    # -- keeping the index after a rewrite ------------------------------------------------------
    def links(self, idx: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The names node ``idx`` reads and writes, as the index holds them (see :meth:`relink`)."""
        node = self.nodes[idx]
        return tuple(all_node_inputs(node)), tuple(node.output)

    def relink(self, before: dict[int, tuple], removed=(), added=()) -> None:
        """Updates the index after a rewrite changed only the nodes ``before`` names (index -> their
        :meth:`links` taken before the change), removed the nodes ``removed`` (indices among them) and
        added ``added`` (new nodes, appended with fresh indices). Costs what those nodes touch, not
        the graph's size: a rewrite loop that rebuilt the view after every change was quadratic."""
        for idx, (reads, writes) in before.items():
            for name in writes:
                if name and self.producer.get(name) == idx:
                    del self.producer[name]
            for name in reads:
                readers = self.consumers.get(name)
                if readers and idx in readers:
                    readers.remove(idx)
        self._gone.update(removed)
        for idx in [i for i in before if i not in self._gone]:
            self._link(idx)
        for node in added:
            self.nodes.append(node)
            self._names.append(node.name)
            self._index[node.name] = len(self.nodes) - 1
            self._link(len(self.nodes) - 1)

    def _link(self, idx: int) -> None:
        reads, writes = self.links(idx)
        for name in writes:
            if name:
                self.producer[name] = idx
        for name in reads:
            bisect.insort(self.consumers.setdefault(name, []), idx)

    def add_initializer(self, tensor: onnx.TensorProto, as_input: bool = False) -> None:
        """Registers an initializer a rewrite added (and listed as a graph input, for IR 3)."""
        self.initializers[tensor.name] = tensor
        if as_input:
            self.input_names.append(tensor.name)
        self.forget(tensor.name)

    # -- constants ----------------------------------------------------------------------------
    def constant(self, tensor: str) -> Constant | None:
        """The value of ``tensor`` if it is constant, else None. Cached."""
        if not tensor:
            return None
        if tensor not in self._const_cache:
            self._const_cache[tensor] = self._resolve_constant(tensor)
        return self._const_cache[tensor]

    def _resolve_constant(self, tensor: str) -> Constant | None:
        if tensor in self.initializers:
            value = self._read(self.initializers[tensor])
            return Constant(value, overridable=tensor in self.input_names)
        if tensor in self.input_names:
            return None
        idx = self.producer_of(tensor)
        if idx is None:
            return None
        node = self.nodes[idx]
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = constant_node_value(node, self._read)
            return None if value is None else Constant(value, overridable=False, via=("Constant",))
        if node.op_type not in CONST_PASSTHROUGH or node.domain not in ("", "ai.onnx"):
            return None
        inputs = [self.constant(name) if name else None for name in node.input]
        if any(c is None for c, name in zip(inputs, node.input) if name):
            return None
        try:
            value = evaluate(node, [c.value if c else None for c in inputs], self.opset)
        except Exception as exc:  # a malformed constant subgraph is simply not constant
            log.debug("cannot evaluate constant %s (%s): %s", tensor, node.op_type, exc)
            return None
        first = next((c for c in inputs if c is not None), None)
        overridable = any(c.overridable for c in inputs if c is not None)
        via = (first.via if first else ()) + (node.op_type,)
        return Constant(value, overridable=overridable, via=via)

    def forget(self, tensor: str) -> None:
        """Drop a cached constant after its tensor was rewritten."""
        self._const_cache.pop(tensor, None)

    def _read(self, tensor: onnx.TensorProto) -> np.ndarray:
        return self.store.to_array(tensor) if self.store else numpy_helper.to_array(tensor)

    # -- shapes -------------------------------------------------------------------------------
    @cached_property
    def value_infos(self) -> dict[str, onnx.ValueInfoProto]:
        infos = {}
        inferred = _infer_shapes(self.model, self.store)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            infos[vi.name] = vi
        return infos

    def shape_of(self, tensor: str) -> tuple[int | str | None, ...] | None:
        """Static shape (ints, dim_param strings, or None per dim), or None when unknown."""
        if tensor in self.initializers:
            return tuple(self.initializers[tensor].dims)
        vi = self.value_infos.get(tensor)
        if vi is None or not vi.type.HasField("tensor_type"):
            return None
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            return None
        return tuple(_dim_value(d) for d in tt.shape.dim)

    def rank_of(self, tensor: str) -> int | None:
        shape = self.shape_of(tensor)
        return None if shape is None else len(shape)

    def elem_type_of(self, tensor: str) -> int | None:
        if tensor in self.initializers:
            return self.initializers[tensor].data_type
        vi = self.value_infos.get(tensor)
        if vi is None or not vi.type.HasField("tensor_type"):
            return None
        return vi.type.tensor_type.elem_type or None


def _stable_names(nodes: list[onnx.NodeProto]) -> list[str]:
    """Node names, with ``OpType#k`` (k-th node of that type) for unnamed or duplicate ones."""
    counts: dict[str, int] = {}
    taken = {n.name for n in nodes if n.name}
    used: set[str] = set()
    names = []
    for node in nodes:
        k = counts.get(node.op_type, 0)
        counts[node.op_type] = k + 1
        name = node.name
        if not name or name in used:
            name = f"{node.op_type}#{k}"
            while name in taken or name in used:
                name += "'"
        used.add(name)
        names.append(name)
    return names


def _dim_value(dim) -> int | str | None:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    if dim.HasField("dim_param"):
        return dim.dim_param
    return None


# Initializers above this many values go to shape inference as typed inputs, without their data.
SKELETON_MIN_VALUES = 1024


def _infer_shapes(model: onnx.ModelProto, store: TensorStore | None = None) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(_skeleton(model, store), strict_mode=False, data_prop=True)
    except Exception as exc:  # shape inference is a help, never a requirement
        log.debug("shape inference failed: %s", exc)
        return model


def _skeleton(model: onnx.ModelProto, store: TensorStore | None = None) -> onnx.ModelProto:
    """``model`` with every large initializer declared as a typed graph input instead: shape
    inference needs their types and shapes, not their values (data propagation reads only small
    integer tensors), and serialising the weights for it cost 0.25 s on a 45 MB ResNet-18. Small
    initializers stored as external data are read in (through ``store``): shape inference cannot
    read external data, so a Reshape whose shape is one would lose every shape after it."""
    graph = model.graph
    big = [t for t in graph.initializer if int(np.prod(t.dims, dtype=np.int64)) > SKELETON_MIN_VALUES]
    big_names = {t.name for t in big}
    small_external = [t for t in graph.initializer if t.name not in big_names and is_external(t)] if store else []
    if not big and not small_external:
        return model
    listed = {vi.name for vi in graph.input}
    skeleton = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skeleton, field, getattr(model, field))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    skeleton.graph.name = graph.name
    for name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(skeleton.graph, name).extend(getattr(graph, name))
    inline = {t.name: numpy_helper.from_array(store.to_array(t), t.name) for t in small_external}
    skeleton.graph.initializer.extend(inline.get(t.name, t) for t in graph.initializer if t.name not in big_names)
    skeleton.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big if t.name not in listed
    )
    return skeleton
