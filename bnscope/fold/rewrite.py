"""Graph surgery: fold BatchNormalization into neighbouring linear ops.

``fold_batchnorm(model)`` returns a new model and one :class:`FoldRecord` per BN; the input is
never mutated. A graph whose nodes are out of topological order (but acyclic) is sorted first. Each fold is planned by :func:`bnscope.fold.patterns.plan_fold` (pattern, then
checks with a reason), computed in float64 by :mod:`bnscope.numerics`, and rounded once to the
dtype of the tensor it replaces. Rewritten tensors keep their names when nothing else reads
them; shared or derived weights get a fresh initializer so other readers are untouched. The
node that now produces the BN's output takes over its output name, so graph outputs,
value_info and downstream names survive.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from bnscope import numerics
from bnscope.errors import BnscopeError
from bnscope.fold.into_next import following_bias_add
from bnscope.fold.patterns import plan_fold
from bnscope.fold.plan import BnParams, FoldOptions, FoldPlan, Refusal, check_bn
from bnscope.onnxio.edit import GraphEditor, remove_dead
from bnscope.onnxio.external_data import TensorStore
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.nodes import attribute_values
from bnscope.onnxio.sort import sort_graph_nodes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldRecord:
    """What happened to one BN node."""

    name: str
    folded: bool
    direction: str | None = None
    target: str | None = None
    target_op: str | None = None
    reason: str | None = None
    notes: tuple[str, ...] = ()
    weight_range_growth: float | None = None
    channel_range_imbalance: float | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name, "folded": self.folded, "direction": self.direction,
            "target": self.target, "target_op": self.target_op, "reason": self.reason,
            "notes": list(self.notes), "weight_range_growth": self.weight_range_growth,
            "channel_range_imbalance": self.channel_range_imbalance,
        }


@dataclass
class FoldOutcome:
    model: onnx.ModelProto
    records: list[FoldRecord] = field(default_factory=list)


def fold_batchnorm(
    model: onnx.ModelProto, options: FoldOptions = FoldOptions(), store: TensorStore | None = None
) -> tuple[onnx.ModelProto, list[FoldRecord]]:
    """Fold every BN the checks allow. Returns (new model, records in graph order)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    generated = _name_unnamed_nodes(work)
    _sort_topologically(work)
    order = [n.name for n in work.graph.node if n.op_type == "BatchNormalization"]
    _check_names(options, order)
    decided: dict[str, FoldRecord] = {}
    shapes = None
    changed = True
    while changed:
        changed, shapes = _fold_pass(work, options, store, decided, shapes)
    remove_dead(work)
    for node in work.graph.node:
        # generated names, and the inserted nodes named after them, leave no name behind; ClearField,
        # not name = "", which would serialise an empty name the input did not have
        if node.name in generated or node.name.partition("_folded")[0] in generated:
            node.ClearField("name")
    return work, [decided[name] for name in order]


def _check_names(options: FoldOptions, bn_names: list[str]) -> None:
    """A typo in --only/--skip would silently fold everything (or nothing): refuse it."""
    unknown = sorted((set(options.only or ()) | set(options.skip)) - set(bn_names))
    if unknown:
        shown = ", ".join(bn_names[:12]) + (", ..." if len(bn_names) > 12 else "")
        raise BnscopeError(f"no BatchNormalization in the model is named {', '.join(map(repr, unknown))} "
                           "(from --only/--skip). "
                           f"Hint: the BN layers are {shown or 'none'} (bnscope inspect lists them)")


def _fold_pass(work, options, store, decided, shapes):
    """Plan BNs in graph order, rewriting each foldable one; True when anything changed."""
    changed = False
    view = GraphView(work, store, value_infos=shapes)
    for name in [view.node_name(i) for i in view.bn_indices()]:
        if name in decided and decided[name].folded:
            continue
        bn = view.index_of(name)
        plan = plan_fold(view, bn, options)
        if isinstance(plan, Refusal):
            decided[name] = FoldRecord(name, False, reason=plan.reason)
            continue
        params = check_bn(view, bn, options)
        decided[name] = _apply(work, view, plan, params)
        changed = True
        shapes = view.value_infos
        view = GraphView(work, store, value_infos=shapes)
    return changed, shapes


def _sort_topologically(model: onnx.ModelProto) -> None:
    """Puts the nodes of an unsorted DAG (keras2onnx writes some) in topological order, in place.

    ONNX requires that order and the folded model is checked against it; onnxruntime sorts for
    itself, so the original runs and the sorted result computes the same. A graph with a cycle is
    left as it is.
    """
    if sort_graph_nodes(model.graph):
        log.warning("the graph's nodes were not in topological order; the folded model lists them sorted")


def _name_unnamed_nodes(model: onnx.ModelProto) -> set[str]:
    """Give unnamed nodes their stable generated names for the duration of the fold."""
    view = GraphView(model)
    generated = set()
    for idx, node in enumerate(model.graph.node):
        if node.name != view.node_name(idx):
            node.name = view.node_name(idx)
            generated.add(node.name)
    return generated


# -- applying one plan --------------------------------------------------------------------------
def _apply(model: onnx.ModelProto, view: GraphView, plan: FoldPlan, params: BnParams) -> FoldRecord:
    editor = GraphEditor(model, view)
    target = view.nodes[plan.target]
    scale, shift = numerics.bn_scale_shift(params.gamma, params.beta, params.mean, params.var, params.epsilon)
    if plan.direction == "into_previous":
        growth = _fold_previous(editor, view, plan, target, scale, shift)
    else:
        growth = _fold_next(editor, view, plan, target, scale, shift)
    editor.remove_node(view.nodes[plan.bn])
    editor.commit()
    return FoldRecord(
        name=view.node_name(plan.bn), folded=True, direction=plan.direction,
        target=view.node_name(plan.target), target_op=target.op_type, notes=plan.notes,
        weight_range_growth=growth[0], channel_range_imbalance=growth[1],
    )


def _fold_previous(editor, view, plan, target, scale, shift):
    bn = view.nodes[plan.bn]
    if plan.feature_channels is not None:  # through a Reshape: one (scale, shift) per output feature
        scale, shift = scale[plan.feature_channels], shift[plan.feature_channels]
    bias_shift = np.zeros_like(shift) if plan.bias_add is not None else shift
    op = target.op_type
    if op == "BatchNormalization":
        return _merge_bn_pair(editor, view, plan, scale, shift)
    w_name = target.input[plan.weight_input]
    w = view.constant(w_name).value
    last = view.nodes[view.producer_of(bn.input[0])]  # what feeds the BN now takes its output name
    if op in ("Conv", "ConvTranspose"):
        b = _input_value(view, target, 2)
        if op == "Conv":
            new_w, new_b = numerics.fold_into_weight(w, b, scale, bias_shift, axis=0)
        else:
            group = int(attribute_values(target).get("group", 1))
            new_w, new_b = numerics.fold_into_weight_grouped_transpose(w, b, scale, bias_shift, group)
        axis = 0 if op == "Conv" else 1
        editor.set_input(target, 2, new_b, dtype=_dtype_of(view, target, 2, w.dtype))
    elif op == "Gemm":
        axis = 0 if int(attribute_values(target).get("transB", 0)) else 1
        new_w = numerics.scaled_along(w, scale, axis)
        _fold_gemm_bias(editor, view, target, lambda c: c * scale + bias_shift, w.dtype)
    else:  # MatMul: X @ W scales W's columns, W @ X scales its rows
        axis = 1 if plan.weight_input == 1 else 0
        new_w = numerics.scaled_along(w, scale, axis)
        if plan.bias_add is None:
            added = _insert_bias_add(editor, view, target, _feature_shape(shift, plan.trailing_axes), plan, w.dtype)
            last = added if last is target else last
    editor.set_input(target, plan.weight_input, new_w, dtype=w.dtype)
    if plan.bias_add is not None:
        _fold_bias_add(editor, view, plan, scale, shift)
    _take_bn_output(editor, view, last, bn)
    if op == "ConvTranspose" and int(attribute_values(target).get("group", 1)) > 1:
        return _growth(w, new_w, None, op, target)  # channels spread over groups
    return numerics.scaled_range_metrics(w, scale, axis)  # from W: no pass over the float64 W'


def _take_bn_output(editor, view, last, bn):
    """``last`` now computes the BN's output: it takes that name, and its other (Shape/Size)
    readers follow it, since the two tensors have the same shape."""
    old = last.output[0]
    editor.rename_output(last, bn.output[0])
    for idx in view.consumers_of(old):
        node = view.nodes[idx]
        if node is not bn:
            for pos, name in enumerate(node.input):
                if name == old:
                    node.input[pos] = bn.output[0]


def _growth(w, new_w, axis, op, target):
    if op == "ConvTranspose" and int(attribute_values(target).get("group", 1)) > 1:
        axis = None  # channels are spread over groups; report range growth only
    growth = numerics.weight_range_growth(w, new_w)
    imbalance = numerics.channel_range_imbalance(new_w, axis) if axis is not None else None
    return growth, imbalance


def _merge_bn_pair(editor, view, plan, scale2, shift2):
    """BN1 -> BN2 becomes BN1 with gamma1*s2 and beta1*s2 + t2 (exact: BN2 is affine)."""
    first = view.nodes[plan.target]
    gamma, beta = (view.constant(first.input[i]).value for i in (1, 2))
    editor.set_input(first, 1, gamma.astype(np.float64) * scale2, dtype=gamma.dtype)
    editor.set_input(first, 2, beta.astype(np.float64) * scale2 + shift2, dtype=beta.dtype)
    editor.rename_output(first, view.nodes[plan.bn].output[0])
    return 1.0, None


def _fold_gemm_bias(editor, view, gemm, transform, w_dtype):
    """Gemm: y = alpha*A*B + beta*C; the new C is transform(beta*C) and beta becomes 1."""
    attrs = attribute_values(gemm)
    beta = float(attrs.get("beta", 1.0))
    c = _input_value(view, gemm, 2)
    scaled = np.zeros(1) if c is None or beta == 0.0 else beta * c.astype(np.float64)
    editor.set_input(gemm, 2, transform(scaled), dtype=_dtype_of(view, gemm, 2, w_dtype))
    editor.set_attribute(gemm, "beta", 1.0)


def _fold_bias_add(editor, view, plan, scale, shift):
    """Add(k) before the BN: k becomes k * scale + shift per output feature."""
    add = view.nodes[plan.bias_add]
    pos = 1 if view.constant(add.input[1]) is not None else 0
    const = view.constant(add.input[pos]).value
    s, t = (_feature_shape(v, plan.trailing_axes) for v in (scale, shift))
    editor.set_input(add, pos, const.astype(np.float64) * s + t, dtype=const.dtype)


def _insert_bias_add(editor, view, matmul, bias, plan, dtype) -> onnx.NodeProto:
    """MatMul has no bias: Add(MatMul output, bias) now produces the MatMul's output name."""
    out = matmul.output[0]
    mm_out = editor.fresh(out + "_mm")
    bias_name = editor.add_initializer(view.node_name(plan.bn) + "_folded_bias", bias, dtype)
    editor.rename_output(matmul, mm_out)
    add = helper.make_node("Add", [mm_out, bias_name], [out], name=editor.fresh(view.node_name(plan.bn) + "_folded"))
    editor.insert_after(matmul, add)
    return add


def _fold_next(editor, view, plan, target, scale, shift):
    """Every reader absorbs the BN; the BN's readers (layout chain or targets) then read its input."""
    growths = [_fold_next_target(editor, view, plan, idx, weight, scale, shift)
               for idx, weight in plan.targets or ((plan.target, plan.weight_input),)]
    bn = view.nodes[plan.bn]
    for idx in view.consumers_of(bn.output[0]):
        node = view.nodes[idx]
        for pos, name in enumerate(node.input):
            if name == bn.output[0]:
                node.input[pos] = bn.input[0]
    return max(g[0] for g in growths), growths[0][1]


def _fold_next_target(editor, view, plan, idx, weight_input, scale, shift):
    target = view.nodes[idx]
    op = target.op_type
    w = view.constant(target.input[weight_input]).value
    attrs = attribute_values(target)
    if op == "Conv":
        b = _input_value(view, target, 2)
        group = int(attrs.get("group", 1))
        new_w, new_b = numerics.fold_before_linear(w, b, scale, shift, in_axis=1, out_axis=0, group=group)
        editor.set_input(target, 2, new_b, dtype=_dtype_of(view, target, 2, w.dtype))
        out_axis = 0
    elif op == "Gemm":
        trans_b = int(attrs.get("transB", 0))
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        new_w, extra = numerics.fold_before_linear(w, None, scale, shift, in_axis=in_axis, out_axis=out_axis)
        alpha = float(attrs.get("alpha", 1.0))
        _fold_gemm_bias(editor, view, target, lambda c: c + alpha * extra, w.dtype)
    else:
        in_axis, out_axis = (0, 1) if weight_input == 1 else (1, 0)
        new_w, extra = numerics.fold_before_linear(w, None, scale, shift, in_axis=in_axis, out_axis=out_axis)
        _add_next_bias(editor, view, plan, idx, extra if weight_input == 1 else extra.reshape(-1, 1), w.dtype)
    editor.set_input(target, weight_input, new_w, dtype=w.dtype)
    return _growth(w, new_w, out_axis, op, target)


def _add_next_bias(editor, view, plan, matmul, bias, dtype):
    """Merges the MatMul's new bias into the Add of a bias that follows it, else inserts an Add."""
    following = following_bias_add(view, matmul, plan.target_rank) if bias.ndim == 1 else None
    if following is None:
        _insert_bias_add(editor, view, view.nodes[matmul], bias, plan, dtype)
        return
    add, pos = view.nodes[following[0]], following[1]
    const = view.constant(add.input[pos]).value
    editor.set_input(add, pos, const.astype(np.float64) + bias, dtype=const.dtype)


# -- small helpers ------------------------------------------------------------------------------


def _feature_shape(v: np.ndarray, trailing_axes: int | None) -> np.ndarray:
    """Per-feature vector shaped to broadcast on the axis that has ``trailing_axes`` axes after it."""
    return v.reshape((-1,) + (1,) * (trailing_axes or 0))


def _input_value(view: GraphView, node: onnx.NodeProto, pos: int) -> np.ndarray | None:
    if len(node.input) > pos and node.input[pos]:
        return view.constant(node.input[pos]).value
    return None


def _dtype_of(view: GraphView, node: onnx.NodeProto, pos: int, default) -> np.dtype:
    value = _input_value(view, node, pos)
    return value.dtype if value is not None else np.dtype(default)
