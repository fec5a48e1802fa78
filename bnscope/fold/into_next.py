"""Folding BN into the linear op(s) after it: ``y = (s*x + t) @ W = x @ (diag(s) W) + t @ W``.

The BN output, maybe through a layout chain, feeds only ops that absorb it: Conv with zero padding,
Gemm with transA=0, MatMul contracting over the channel axis with a constant 2-D weight (several of
them, e.g. a transformer's q/k/v), and Shape/Size (they read no values). Padding is refused: the
padded border would see 0 instead of BN's shift, so the fold is not exact there. For a MatMul the
new bias ``t @ W`` merges into the bias Add that follows it (:func:`following_bias_add`), or a new
Add is inserted.
"""

from __future__ import annotations

import numpy as np

from bnscope.fold.layout import LayoutRefusal, trace_forward
from bnscope.fold.plan import (
    SHAPE_ONLY_OPS,
    BnParams,
    FoldOptions,
    FoldPlan,
    Refusal,
    constant_weight,
    describe_node,
    optional_bias,
)
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.nodes import attribute_values


def check_into_next(view: GraphView, bn: int, params: BnParams, options: FoldOptions) -> FoldPlan | Refusal:
    """BN output feeds (maybe through a layout chain) only ops that absorb it: Conv/Gemm/MatMul
    contracting over the channel axis, or Shape (which reads no values)."""
    y = view.nodes[bn].output[0]
    if view.is_graph_output(y):
        return Refusal("its output is a graph output")
    chain = trace_forward(view, y, view.rank_of(view.nodes[bn].input[0]))
    if isinstance(chain, LayoutRefusal):
        return Refusal(chain.reason)
    end = view.nodes[chain.nodes[-1]].output[0] if chain.nodes else y
    behind = "".join(f" behind {describe_node(view, i)}" for i in chain.nodes)
    if view.is_graph_output(end):
        return Refusal(f"its output{behind} is a graph output")
    consumers = view.consumers_of(end)
    targets = []
    for idx in consumers:
        if view.nodes[idx].op_type in SHAPE_ONLY_OPS:
            continue
        result = _next_target(view, idx, end, chain, params, options)
        if isinstance(result, Refusal):
            many = f"its output{behind} has {len(consumers)} consumers and " if len(consumers) > 1 else ""
            return Refusal(f"{many}{result.reason}")
        targets.append((idx, result))
    if not targets:
        return Refusal(f"nothing after it{behind} reads its values")
    (first, weight), *others = targets
    notes = (f"also folded into {', '.join(describe_node(view, i) for i, _ in others)}",) if others else ()
    return FoldPlan(
        bn,
        "into_next",
        first,
        weight,
        rank=chain.bn_rank,
        layout=chain.nodes,
        targets=tuple(targets),
        target_rank=chain.rank,
        notes=notes,
    )


def _next_target(view, idx, y, chain, params, options) -> int | Refusal:
    node = view.nodes[idx]
    if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
        return Refusal(f"{describe_node(view, idx)} comes after it, not Conv/Gemm/MatMul")
    if list(node.input).count(y) != 1:
        return Refusal(f"{describe_node(view, idx)} reads it more than once")
    check = {"Conv": _next_conv, "Gemm": _next_gemm, "MatMul": _next_matmul}[node.op_type]
    return check(view, idx, y, params, options, chain)


def _next_conv(view, idx, y, params, options, chain) -> int | Refusal:
    node = view.nodes[idx]
    if node.input[0] != y or chain.axis != 1:
        return Refusal(f"{describe_node(view, idx)} does not take BN's channels as its input channels")
    attrs = attribute_values(node)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = attrs.get("pads", [])
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") or any(pads):
        shown = list(pads) if pads else auto_pad
        return Refusal(
            f"{describe_node(view, idx)} after it has padding {shown} (the shift is not exact at the borders)"
        )
    w = constant_weight(view, idx, 1, options)
    if isinstance(w, Refusal):
        return w
    group = int(attrs.get("group", 1))
    if w.value.shape[1] * group != params.channels:
        return Refusal(
            f"{describe_node(view, idx)} takes {w.value.shape[1] * group} input channels, BN has {params.channels}"
        )
    return optional_bias(view, idx, 2, options) or 1


def _next_gemm(view, idx, y, params, options, chain) -> int | Refusal:
    node = view.nodes[idx]
    attrs = attribute_values(node)
    if node.input[0] != y or int(attrs.get("transA", 0)) or chain.axis != 1:
        return Refusal(f"{describe_node(view, idx)} does not take it as its untransposed A input")
    w = constant_weight(view, idx, 1, options)
    if isinstance(w, Refusal):
        return w
    k = w.value.shape[1] if int(attrs.get("transB", 0)) else w.value.shape[0]
    if k != params.channels:
        return Refusal(f"{describe_node(view, idx)} takes {k} inputs, BN has {params.channels} channels")
    return optional_bias(view, idx, 2, options) or 1


def _next_matmul(view, idx, y, params, options, chain) -> int | Refusal:
    """y @ W contracts y's last axis with W's rows; W @ y contracts y's axis -2 with W's columns."""
    node = view.nodes[idx]
    rank = chain.rank
    for data, weight, contracted, w_axis in ((0, 1, -1, 0), (1, 0, -2, 1)):
        if node.input[data] != y or rank is None or chain.axis != rank + contracted:
            continue
        w = constant_weight(view, idx, weight, options)
        if isinstance(w, Refusal):
            return w
        if w.value.ndim == 2 and w.value.shape[w_axis] == params.channels:
            return weight
    return Refusal(
        f"{describe_node(view, idx)} after it does not contract over BN's channel axis with a constant weight"
    )


def following_bias_add(view: GraphView, matmul: int, rank: int | None) -> tuple[int, int] | None:
    """(Add, position of its constant) when a MatMul's only reader adds a per-feature constant
    ``(..., 1, F)`` that a new bias can merge into without changing the output shape."""
    out = view.nodes[matmul].output[0]
    readers = view.consumers_of(out)
    if len(readers) != 1 or view.is_graph_output(out) or view.nodes[readers[0]].op_type != "Add":
        return None
    add = view.nodes[readers[0]]
    pos = 1 if add.input[0] == out else 0
    const = view.constant(add.input[pos]) if add.input[1 - pos] == out else None
    if const is None or not np.issubdtype(const.value.dtype, np.floating):
        return None
    shape, features = const.value.shape, view.constant(view.nodes[matmul].input[1]).value.shape[1]
    if not shape or shape[-1] != features or any(d != 1 for d in shape[:-1]) or rank is None or len(shape) > rank:
        return None
    return readers[0], pos
