"""``inspect``: every BatchNormalization layer of a model, its neighbours, fold decision and health.

Returns frozen dataclasses with ``to_dict()`` (the JSON schema); never prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from bnscope.fold.patterns import plan_fold
from bnscope.fold.plan import FoldOptions, FoldPlan
from bnscope.numerics.lint import SEVERITY_RANK, Flag, lint_parameters, worst_severity
from bnscope.onnxio.bn import PARAMS, bn_attributes, is_batchnorm, is_foreign_batchnorm, training_mode
from bnscope.onnxio.external_data import TensorStore
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.model_io import LoadedModel, load_model
from bnscope.onnxio.nodes import LINEAR_OPS, subgraphs
from bnscope.schema import SCHEMA_VERSION

FILL_OPS = ("ConstantOfShape", "Expand")


@dataclass(frozen=True)
class FoldDecision:
    possible: bool
    direction: str | None
    target: str | None
    reason: str | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "possible": self.possible,
            "direction": self.direction,
            "target": self.target,
            "reason": self.reason,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class LayerInfo:
    """One BN layer as ``inspect`` reports it."""

    name: str
    input: str
    output: str
    rank: int | None
    channels: int | None
    epsilon: float
    momentum: float
    training_mode: int
    producer: dict
    consumers: tuple[dict, ...]
    fold: FoldDecision
    flags: tuple[Flag, ...]

    @property
    def severity(self) -> str | None:
        return worst_severity(self.flags)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "input": self.input,
            "output": self.output,
            "rank": self.rank,
            "channels": self.channels,
            "epsilon": self.epsilon,
            "momentum": self.momentum,
            "training_mode": self.training_mode,
            "producer": self.producer,
            "consumers": list(self.consumers),
            "fold": self.fold.to_dict(),
            "flags": [f.to_dict() for f in self.flags],
        }


@dataclass(frozen=True)
class DecomposedBN:
    """A per-channel Mul then Add of constants after a linear op: BN already lowered."""

    after: str
    after_op: str
    mul: str
    add: str
    channels: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ModelSummary:
    path: str
    ir_version: int
    opset: int
    producer: str
    inputs: tuple[dict, ...]
    outputs: tuple[dict, ...]
    node_count: int
    bn_count: int
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["inputs"], d["outputs"], d["notes"] = list(self.inputs), list(self.outputs), list(self.notes)
        return d


@dataclass(frozen=True)
class InspectResult:
    model: ModelSummary
    layers: tuple[LayerInfo, ...]
    decomposed: tuple[DecomposedBN, ...] = field(default=())

    @property
    def foldable(self) -> int:
        return sum(layer.fold.possible for layer in self.layers)

    @property
    def flags(self) -> list[Flag]:
        return [f for layer in self.layers for f in layer.flags]

    def fails_on(self, severity: str) -> bool:
        """Whether a flag of ``severity`` ("info", "warning", "error") or worse was found."""
        return any(SEVERITY_RANK[f.severity] >= SEVERITY_RANK[severity] for f in self.flags)

    @property
    def passed(self) -> bool:
        """No error flag: the verdict of ``inspect --fail-on error``, as data like every result's ``passed``."""
        return not self.fails_on("error")

    def to_dict(self) -> dict:
        counts = {s: sum(f.severity == s for f in self.flags) for s in ("error", "warning", "info")}
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            "decomposed_bn": [d.to_dict() for d in self.decomposed],
            "summary": {"bn": len(self.layers), "foldable": self.foldable, "flags": counts},
        }


def inspect_model(path: str | os.PathLike, options: FoldOptions = FoldOptions()) -> InspectResult:
    """Load a model and describe every BN layer. Raises BnscopeError on bad input."""
    loaded = load_model(path)
    return inspect_loaded(loaded, options)


def inspect_loaded(loaded: LoadedModel, options: FoldOptions = FoldOptions()) -> InspectResult:
    view = GraphView(loaded.model, TensorStore(loaded))
    layers = tuple(describe_layer(view, i, options) for i in view.bn_indices())
    decomposed = tuple(find_decomposed_bn(view))
    return InspectResult(summarize_model(loaded, view, layers, decomposed), layers, decomposed)


def describe_layer(view: GraphView, idx: int, options: FoldOptions = FoldOptions()) -> LayerInfo:
    node = view.nodes[idx]
    attrs = bn_attributes(node, view.opset)
    training = training_mode(node, view.opset)
    params = [view.constant(name) for name in node.input[1:5]]
    values = [p.value if p is not None else None for p in params]
    channels = _channel_count(view, node, values)
    plan = plan_fold(view, idx, FoldOptions(keep_overridable=options.keep_overridable, into_next=options.into_next))
    return LayerInfo(
        name=view.node_name(idx),
        input=node.input[0],
        output=node.output[0],
        rank=view.rank_of(node.input[0]),
        channels=channels,
        epsilon=attrs.epsilon,
        momentum=attrs.momentum,
        training_mode=int(training is not None),
        producer=_producer(view, node.input[0]),
        consumers=tuple(_consumers(view, node.output[0])),
        fold=_decision(view, plan),
        flags=tuple(lint_parameters(*values, attrs.epsilon, attrs.momentum, training, _filled(params))),
    )


def _filled(params) -> dict[str, str]:
    """The parameters the graph makes by filling one value into every channel (ConstantOfShape, or
    Expand of one value): parameter -> that op."""
    out = {}
    for name, param in zip(PARAMS, params):
        op = next((op for op in reversed(param.via) if op in FILL_OPS), None) if param is not None else None
        if op and param.value.size > 1 and np.all(param.value == param.value.reshape(-1)[0]):
            out[name] = op
    return out


def _channel_count(view: GraphView, node: onnx.NodeProto, values) -> int | None:
    if values[0] is not None:
        return int(np.asarray(values[0]).size)
    shape = view.shape_of(node.input[0])
    return shape[1] if shape and len(shape) > 1 and isinstance(shape[1], int) else None


def _producer(view: GraphView, tensor: str) -> dict:
    idx = view.producer_of(tensor)
    if idx is not None:
        return {"op": view.nodes[idx].op_type, "name": view.node_name(idx)}
    if tensor in view.initializers:
        return {"op": "initializer", "name": tensor}
    return {"op": "graph_input", "name": tensor}


def _consumers(view: GraphView, tensor: str):
    for idx in view.consumers_of(tensor):
        yield {"op": view.nodes[idx].op_type, "name": view.node_name(idx)}
    if view.is_graph_output(tensor):
        yield {"op": "graph_output", "name": tensor}


def _decision(view: GraphView, plan) -> FoldDecision:
    if isinstance(plan, FoldPlan):
        return FoldDecision(True, plan.direction, view.node_name(plan.target), None, plan.notes)
    return FoldDecision(False, None, None, plan.reason)


def find_decomposed_bn(view: GraphView):
    """Linear op -> Mul(per-channel constant) -> Add(per-channel constant): BN lowered to arithmetic."""
    for idx, node in enumerate(view.nodes):
        if node.op_type != "Mul":
            continue
        data, scale = _split_constant(view, node)
        producer = view.producer_of(data) if data else None
        consumers = view.consumers_of(node.output[0])
        if scale is None or producer is None or len(consumers) != 1:
            continue
        add = view.nodes[consumers[0]]
        _, shift = _split_constant(view, add) if add.op_type == "Add" else (None, None)
        channels = _per_channel(scale)
        if (
            view.nodes[producer].op_type in LINEAR_OPS
            and shift is not None
            and channels
            and channels == _per_channel(shift)
        ):
            yield DecomposedBN(
                view.node_name(producer),
                view.nodes[producer].op_type,
                view.node_name(idx),
                view.node_name(consumers[0]),
                channels,
            )


def _split_constant(view: GraphView, node: onnx.NodeProto):
    if len(node.input) != 2:
        return None, None
    a, b = (view.constant(n) for n in node.input)
    if b is not None and a is None:
        return node.input[0], b.value
    if a is not None and b is None:
        return node.input[1], a.value
    return None, None


def _per_channel(value: np.ndarray) -> int | None:
    """C when the constant varies along exactly one axis (e.g. (1, C, 1, 1) or (C,)), else None."""
    varying = [d for d in value.shape if d != 1]
    return int(varying[0]) if len(varying) == 1 and varying[0] > 1 else None


def summarize_model(loaded: LoadedModel, view: GraphView, layers, decomposed) -> ModelSummary:
    model = loaded.model
    notes = list(_model_notes(view, layers, decomposed))
    return ModelSummary(
        path=str(loaded.path),
        ir_version=model.ir_version,
        opset=view.opset,
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        inputs=tuple(_value_desc(vi) for vi in view.real_inputs),
        outputs=tuple(_value_desc(vi) for vi in model.graph.output),
        node_count=len(view.nodes),
        bn_count=len(layers),
        notes=tuple(notes),
    )


def _model_notes(view: GraphView, layers, decomposed):
    if not layers:
        yield (
            "no BatchNormalization nodes. PyTorch's exporter folds Conv+BN in eval mode; export with "
            "training=torch.onnx.TrainingMode.PRESERVE (and do_constant_folding=False) to keep BN"
        )
    if decomposed:
        yield f"{len(decomposed)} per-channel Mul+Add pair(s) after linear ops: BN already decomposed into arithmetic"
    overridable = [t for t in view.initializers if t in view.input_names]
    if overridable:
        yield (
            f"{len(overridable)} initializers are also graph inputs (overridable); bnscope treats them as "
            "constants (fold --keep-overridable refuses them)"
        )
    foreign = sorted({n.domain for n in view.nodes if is_foreign_batchnorm(n)})
    if foreign:
        count = sum(is_foreign_batchnorm(n) for n in view.nodes)
        yield (
            f"{count} BatchNormalization node(s) of domain {', '.join(foreign)}: another operator than ONNX's "
            "BatchNormalization, left alone by every command"
        )
    subgraph_bn = sum(1 for n in view.nodes for sub in subgraphs(n) if any(is_batchnorm(s) for s in sub.node))
    if subgraph_bn:
        yield f"{subgraph_bn} control-flow subgraph(s) contain BatchNormalization; only the main graph is analysed"


def _value_desc(vi: onnx.ValueInfoProto) -> dict:
    tt = vi.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else None
    return {"name": vi.name, "shape": shape, "dtype": dtype}
