"""Folding BN into the linear op(s) after it: ``y = (s*x + t) @ W = x @ (diag(s) W) + t @ W``.

The BN output, maybe through a layout chain, feeds only ops that absorb it: Conv with zero padding,
Gemm with transA=0, MatMul contracting over the channel axis with a constant 2-D weight (several of
them, e.g. a transformer's q/k/v), and Shape/Size (they read no values). Padding is refused: the
padded border would see 0 instead of BN's shift, so the fold is not exact there. For a MatMul the
new bias ``t @ W`` merges into the bias Add that follows it (:func:`~bnscope.fold.plan.following_bias_add`),
or a new Add is inserted. Each op's own checks are in :mod:`bnscope.fold.variants`.
"""

from __future__ import annotations

from bnscope.fold.layout import trace_forward
from bnscope.fold.plan import SHAPE_ONLY_OPS, BnParams, FoldOptions, FoldPlan, Refusal, describe_node
from bnscope.fold.variants import linear_op
from bnscope.onnxio.graph import GraphView


def check_into_next(view: GraphView, bn: int, params: BnParams, options: FoldOptions) -> FoldPlan | Refusal:
    """BN output feeds (maybe through a layout chain) only ops that absorb it: Conv/Gemm/MatMul
    contracting over the channel axis, or Shape (which reads no values)."""
    y = view.nodes[bn].output[0]
    if view.is_graph_output(y):
        return Refusal("its output is a graph output")
    chain = trace_forward(view, y, view.rank_of(view.nodes[bn].input[0]))
    if isinstance(chain, Refusal):
        return chain
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
    variant = linear_op(node)
    if variant is None or not variant.takes_bn_before:
        return Refusal(f"{describe_node(view, idx)} comes after it, not Conv/Gemm/MatMul")
    if list(node.input).count(y) != 1:
        return Refusal(f"{describe_node(view, idx)} reads it more than once")
    return variant.check_into_next(view, idx, y, params, options, chain)
