"""Folding BN into the linear op before it: ``W' = W * scale`` per output feature, ``b' = b * scale + shift``.

Conv (weight axis 0), ConvTranspose (axis 1 within each group), Gemm (axis 1 of B, or 0 with transB),
MatMul X@W (W axis 1, output features on the last axis) or W@X (W axis 0, features on axis -2);
optionally through an Add of a constant, then a Reshape/Flatten, then a chain of layout-only ops
(Identity, Transpose, Slice, Squeeze, Unsqueeze; kept in the graph). Without a Reshape the BN channel
axis must trace back (:mod:`bnscope.fold.layout`) to the op's output-feature axis with one channel per
feature; through a Reshape every channel that shares a feature must have the same (scale, shift), so
the fold stays per feature. A BN whose channels all share one (scale, shift) is a scalar affine map
and folds across any axis. A BN after a BN merges into the first one's gamma/beta.
"""

from __future__ import annotations

import numpy as np

from bnscope.fold.layout import channel_of_feature, trace_back
from bnscope.fold.linear_op import LinearOp
from bnscope.fold.plan import SHAPE_ONLY_OPS, BnParams, FoldOptions, FoldPlan, Refusal, check_bn, describe_node
from bnscope.fold.variants import linear_op
from bnscope.numerics import bn_scale_shift
from bnscope.onnxio.bn import is_batchnorm
from bnscope.onnxio.graph import GraphView


def check_into_previous(view: GraphView, bn: int, params: BnParams, options: FoldOptions) -> FoldPlan | Refusal:
    x = view.nodes[bn].input[0]
    chain = trace_back(view, x, view.rank_of(x))
    if isinstance(chain, Refusal):
        return chain
    behind = "".join(f" behind {describe_node(view, i)}" for i in reversed(chain.nodes))
    idx = view.producer_of(view.nodes[chain.nodes[0]].input[0] if chain.nodes else x)
    if idx is None:
        return Refusal(f"input is a graph input{behind}, nothing before it to fold into")
    reshape, add = None, None
    if view.nodes[idx].op_type in ("Reshape", "Flatten"):
        reshape, idx = idx, view.producer_of(view.nodes[idx].input[0])
        behind = f" behind {describe_node(view, reshape)}{behind}"
        if idx is None:
            return Refusal(f"Reshape input is a graph input{behind}")
    if view.nodes[idx].op_type == "Add":
        add, idx = idx, _add_data_producer(view, idx)
        if idx is None:
            return Refusal("producer Add has no constant operand or no producer for its other operand")
    node = view.nodes[idx]
    if is_batchnorm(node) and reshape is None and add is None and not chain.nodes:
        return _check_previous_bn(view, bn, idx, params, options, chain.rank)
    variant = linear_op(node)
    if variant is None:
        return Refusal(f"{describe_node(view, idx)}{behind} comes before it, not Conv/ConvTranspose/Gemm/MatMul")
    refusal = _check_single_use_chain(view, [i for i in (idx, add, reshape) if i is not None] + list(chain.nodes))
    if refusal:
        return refusal
    weight_input = variant.check_into_previous(view, idx, options)
    if isinstance(weight_input, Refusal):
        return weight_input
    return _plan_previous(view, bn, _Target(view, idx, variant, weight_input), params, chain, reshape, add)


class _Target:
    """The op before the BN: node index, its type and the input that holds its weight."""

    def __init__(self, view: GraphView, idx: int, variant: LinearOp, weight_input: int):
        self.idx, self.variant, self.weight_input = idx, variant, weight_input
        node = view.nodes[idx]
        self.features = variant.features(node, view.constant(node.input[weight_input]).value.shape, weight_input)


def _plan_previous(view, bn, target: _Target, params, chain, reshape, add) -> FoldPlan | Refusal:
    """Checks where BN's channels land among the linear op's output features, and the bias Add."""
    idx = target.idx
    out_rank = _linear_output_rank(view, idx, chain.rank if reshape is None else None)
    axis = target.variant.feature_axis(target.weight_input, out_rank)
    if axis is None:
        return Refusal(f"{describe_node(view, idx)} output rank is unknown: cannot tell which axis holds its outputs")
    if reshape is None:
        mapping = _check_same_axis(view, target, params, chain, out_rank, axis)
    else:
        mapping = _check_reshape_map(view, target, reshape, params, chain, axis)
    if isinstance(mapping, Refusal):
        return mapping
    trailing = None if out_rank is None else out_rank - 1 - axis
    if add is not None:
        refusal = _check_bias_add(view, add, target.features, out_rank, trailing)
        if refusal:
            return refusal
    return FoldPlan(
        bn,
        "into_previous",
        idx,
        target.weight_input,
        bias_add=add,
        reshape=reshape,
        block=_block(mapping, params),
        rank=chain.bn_rank,
        layout=chain.nodes,
        feature_channels=mapping,
        trailing_axes=trailing,
    )


def _linear_output_rank(view: GraphView, idx: int, same_as: int | None) -> int | None:
    rank = view.rank_of(view.nodes[idx].output[0])
    return rank if rank is not None else same_as


def _check_same_axis(view, target: _Target, params, chain, out_rank, axis) -> np.ndarray | None | Refusal:
    """No Reshape: BN's channel axis must come from the op's output axis, one channel per output,
    unless every channel has the same (scale, shift): then it is one scalar affine map."""
    op, idx = target.variant.op_type, target.idx
    if chain.axis != axis:
        if _is_uniform(params):
            return np.zeros(target.features, np.int64)
        what = f"{op} output has rank {out_rank}: " if target.variant.feature_axis_from_rank else ""
        return Refusal(
            f"{what}BN's channel axis comes from axis {chain.axis} of {describe_node(view, idx)}, "
            f"not from its output axis {axis}, and its channels differ in scale/shift"
        )
    if target.features != params.channels:
        return Refusal(f"{op} has {target.features} {target.variant.feature_kind}, BN has {params.channels} channels")
    return None


def _check_reshape_map(view, target: _Target, reshape, params, chain, axis) -> np.ndarray | None | Refusal:
    """Reshape/Flatten: the BN channel of each output feature, when the fold stays per feature."""
    idx = target.idx
    linear_shape = view.shape_of(view.nodes[idx].output[0]) or view.shape_of(view.nodes[reshape].input[0])
    bn_shape = view.shape_of(view.nodes[reshape].output[0])
    if linear_shape is None or bn_shape is None:
        return Refusal(f"{describe_node(view, reshape)} shapes around it are not known statically")
    scale, shift = bn_scale_shift(params.gamma, params.beta, params.mean, params.var, params.epsilon)
    owner = channel_of_feature(linear_shape, axis, bn_shape, chain.axis, scale, shift)
    if isinstance(owner, str):
        return Refusal(f"{describe_node(view, reshape)} after {describe_node(view, idx)}: {owner}")
    if owner.shape[0] != target.features:
        return Refusal(
            f"{describe_node(view, reshape)} input does not have {describe_node(view, idx)}'s features on axis {axis}"
        )
    return None if np.array_equal(owner, np.arange(params.channels)) else owner


def _is_uniform(params: BnParams) -> bool:
    scale, shift = bn_scale_shift(params.gamma, params.beta, params.mean, params.var, params.epsilon)
    return bool(np.all(scale == scale[0]) and np.all(shift == shift[0]))


def _block(mapping: np.ndarray | None, params: BnParams) -> int:
    """Features per BN channel when each channel owns one contiguous block, else 1."""
    if mapping is None or mapping.shape[0] % params.channels:
        return 1
    k = mapping.shape[0] // params.channels
    return k if np.array_equal(mapping, np.arange(mapping.shape[0]) // k) else 1


def _check_previous_bn(view, bn, idx, params, options, rank) -> FoldPlan | Refusal:
    """BN after BN: the second is an affine map, so it merges into the first's gamma/beta."""
    first = check_bn(view, idx, options)
    if isinstance(first, Refusal):
        return Refusal(f"the BatchNormalization before it cannot absorb it ({first.reason})")
    if first.channels != params.channels:
        return Refusal("the BatchNormalization before it has a different channel count")
    refusal = _check_single_use_chain(view, [idx])
    return refusal or FoldPlan(bn, "into_previous", idx, weight_input=-1, rank=rank)


def _add_data_producer(view: GraphView, add: int) -> int | None:
    a, b = view.nodes[add].input[:2]
    if view.constant(b) is not None and view.constant(a) is None:
        return view.producer_of(a)
    if view.constant(a) is not None and view.constant(b) is None:
        return view.producer_of(b)
    return None


def _check_single_use_chain(view: GraphView, chain: list[int]) -> Refusal | None:
    """Each tensor between linear op and BN has one reader whose values change, plus any Shape/Size
    (they read the shape, which the fold keeps)."""
    for i in chain:
        out = view.nodes[i].output[0]
        if view.is_graph_output(out):
            return Refusal(f"{describe_node(view, i)} output is also a graph output")
        n = sum(view.nodes[c].op_type not in SHAPE_ONLY_OPS for c in view.consumers_of(out))
        if n != 1:
            return Refusal(f"{describe_node(view, i)} output has {n} consumers (folding would change the others)")
    return None


def _check_bias_add(
    view: GraphView, add: int, features: int, out_rank: int | None, trailing: int | None
) -> Refusal | None:
    """The Add's constant k becomes ``k * scale + shift`` per output feature: it may vary along any
    axis but must not grow the output shape (no batch axis, no extra rank)."""
    node = view.nodes[add]
    const = view.constant(node.input[1]) or view.constant(node.input[0])
    shape = const.value.shape
    if out_rank is None or trailing is None:
        return Refusal("rank of the BN input is unknown, cannot check the bias Add's broadcast")
    try:
        merged = np.broadcast_shapes(shape, (features,) + (1,) * trailing)
    except ValueError:
        return Refusal(f"bias Add constant of shape {shape} does not broadcast per channel")
    if len(merged) > out_rank or (len(merged) == out_rank and merged[0] != 1):
        return Refusal(f"bias Add constant of shape {shape} would change the output shape")
    return None
