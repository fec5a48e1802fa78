"""The ops a BN folds into, one small type each: its checks, its weight axes and its rewrite.

With the BN's per-channel ``scale = gamma / sqrt(var + epsilon)`` and ``shift = beta - mean * scale``
(epsilon defaults to 1e-5):

- Into the op before the BN: ``W' = W * scale`` along the weight's output axis and
  ``b' = b * scale + shift``. Conv ``W (M, C/group, k...)``: axis 0. ConvTranspose
  ``W (C, M/group, k...)``: axis 1 within each group. Gemm ``Y = alpha A B + beta C``: axis 1 of
  B, or 0 with transB; ``C' = beta C * scale + shift`` and beta becomes 1. MatMul ``X @ W``: W's
  axis 1 (``W @ X``: axis 0); it has no bias input, so an Add of ``shift`` follows it (or the Add
  of a constant between it and the BN absorbs the shift).
- Into the op after the BN: ``W (scale x + shift) + b = (W scale) x + (b + W shift)``: W is scaled
  along its input axis and the bias grows by W contracted with ``shift``. Conv: input axis 1 per
  group, zero padding only; Gemm: transA=0, B's axis 0 (1 with transB), ``C' = beta C + alpha W shift``;
  MatMul: the axis it contracts with BN's channels, the new bias merged into a following Add of a
  bias or a new Add. A ConvTranspose does not take a BN before it.

:func:`linear_op` gives the type for a node; the pattern modules (into_previous, into_next) find
the node, these types check and rewrite it (the shared parts: :mod:`bnscope.fold.linear_op`).
"""

from __future__ import annotations

import numpy as np
import onnx

from bnscope import numerics
from bnscope.fold.edits import (
    dtype_of,
    feature_shape,
    fold_gemm_bias,
    input_value,
    insert_bias_add,
    merge_bn_pair,
    range_growth,
)
from bnscope.fold.linear_op import LinearOp
from bnscope.fold.plan import Refusal, constant_weight, describe_node, following_bias_add, optional_bias
from bnscope.onnxio.nodes import attribute_values


class Conv(LinearOp):
    """``W (M, C/group, k...)``: outputs on axis 0, inputs on axis 1 per group; bias input 2."""

    op_type = "Conv"
    feature_kind = "output channels"

    def check_into_next(self, view, idx, y, params, options, chain) -> int | Refusal:
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
        taken = w.value.shape[1] * int(attrs.get("group", 1))
        if taken != params.channels:
            return Refusal(f"{describe_node(view, idx)} takes {taken} input channels, BN has {params.channels}")
        return optional_bias(view, idx, 2, options) or 1

    def rewrite_into_next(self, editor, view, plan, idx, weight_input, w, scale, shift) -> np.ndarray:
        node = view.nodes[idx]
        group = int(attribute_values(node).get("group", 1))
        b = input_value(view, node, 2)
        new_w, new_b = numerics.fold_before_linear(w, b, scale, shift, in_axis=1, out_axis=0, group=group)
        editor.set_input(node, 2, new_b, dtype=dtype_of(view, node, 2, w.dtype))
        return new_w


class ConvTranspose(LinearOp):
    """``W (C, M/group, k...)``: outputs on axis 1 within each group; bias input 2; only before a BN."""

    op_type = "ConvTranspose"
    feature_kind = "output channels"
    takes_bn_before = False

    def weight_rank_ok(self, ndim: int) -> bool:
        return ndim >= 3

    def output_axis(self, node, weight_input) -> int:
        return 1

    def features(self, node, shape, weight_input) -> int:
        return shape[1] * _group(node)

    def rewrite_into_previous(self, editor, view, plan, node, w, scale, shift) -> tuple[np.ndarray, onnx.NodeProto]:
        b = input_value(view, node, 2)
        new_w, new_b = numerics.fold_into_weight_grouped_transpose(w, b, scale, shift, _group(node))
        editor.set_input(node, 2, new_b, dtype=dtype_of(view, node, 2, w.dtype))
        return new_w, node

    def range_metrics(self, node, w, new_w, scale, weight_input) -> tuple[float, float | None]:
        if _group(node) > 1:  # channels are spread over groups: range growth only
            return range_growth(w, new_w, None)
        return super().range_metrics(node, w, new_w, scale, weight_input)


class Gemm(LinearOp):
    """``Y = alpha A B + beta C``, ``B (K, N)``: outputs on axis 1, or 0 with transB; C scaled by beta."""

    op_type = "Gemm"

    def weight_rank_ok(self, ndim: int) -> bool:
        return ndim == 2

    def output_axis(self, node, weight_input) -> int:
        return 0 if _trans_b(node) else 1

    def rewrite_into_previous(self, editor, view, plan, node, w, scale, shift) -> tuple[np.ndarray, onnx.NodeProto]:
        new_w = numerics.scaled_along(w, scale, self.output_axis(node, 1))
        fold_gemm_bias(editor, view, node, lambda c: c * scale + shift, w.dtype)
        return new_w, node

    def check_into_next(self, view, idx, y, params, options, chain) -> int | Refusal:
        node = view.nodes[idx]
        if node.input[0] != y or int(attribute_values(node).get("transA", 0)) or chain.axis != 1:
            return Refusal(f"{describe_node(view, idx)} does not take it as its untransposed A input")
        w = constant_weight(view, idx, 1, options)
        if isinstance(w, Refusal):
            return w
        k = w.value.shape[self.input_axes(node, 1)[0]]
        if k != params.channels:
            return Refusal(f"{describe_node(view, idx)} takes {k} inputs, BN has {params.channels} channels")
        return optional_bias(view, idx, 2, options) or 1

    def input_axes(self, node, weight_input) -> tuple[int, int]:
        return (1, 0) if _trans_b(node) else (0, 1)

    def rewrite_into_next(self, editor, view, plan, idx, weight_input, w, scale, shift) -> np.ndarray:
        node = view.nodes[idx]
        in_axis, out_axis = self.input_axes(node, weight_input)
        new_w, extra = numerics.fold_before_linear(w, None, scale, shift, in_axis=in_axis, out_axis=out_axis)
        alpha = float(attribute_values(node).get("alpha", 1.0))
        fold_gemm_bias(editor, view, node, lambda c: c + alpha * extra, w.dtype)
        return new_w

    def bias_bound(self, view, node) -> float:
        return super().bias_bound(view, node) * abs(float(attribute_values(node).get("beta", 1.0)))


class MatMul(LinearOp):
    """``X @ W`` (weight input 1, features on the last axis) or ``W @ X`` (weight input 0, axis -2)."""

    op_type = "MatMul"
    feature_axis_from_rank = True

    def check_into_previous(self, view, idx, options) -> int | Refusal:
        node = view.nodes[idx]
        right, left = view.constant(node.input[1]), view.constant(node.input[0])
        if (right is None) == (left is None):
            return Refusal(f"{describe_node(view, idx)} has no constant weight operand")
        position = 1 if right is not None else 0
        w = constant_weight(view, idx, position, options)
        if isinstance(w, Refusal):
            return w
        if w.value.ndim != 2:
            return Refusal(f"{describe_node(view, idx)} weight has rank {w.value.ndim}, not 2")
        return position

    def output_axis(self, node, weight_input) -> int:
        return 1 if weight_input == 1 else 0

    def feature_axis(self, weight_input, rank) -> int | None:
        if rank is None:
            return None
        return rank - 1 if weight_input == 1 else rank - 2

    def rewrite_into_previous(self, editor, view, plan, node, w, scale, shift) -> tuple[np.ndarray, onnx.NodeProto]:
        new_w = numerics.scaled_along(w, scale, self.output_axis(node, plan.weight_input))
        if plan.bias_add is not None:  # the Add before the BN takes the shift
            return new_w, node
        bias = feature_shape(shift, plan.trailing_axes)
        return new_w, insert_bias_add(editor, view, node, bias, plan, w.dtype)

    def check_into_next(self, view, idx, y, params, options, chain) -> int | Refusal:
        """y @ W contracts y's last axis with W's rows; W @ y contracts y's axis -2 with W's columns."""
        node, rank = view.nodes[idx], chain.rank
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

    def input_axes(self, node, weight_input) -> tuple[int, int]:
        return (0, 1) if weight_input == 1 else (1, 0)

    def rewrite_into_next(self, editor, view, plan, idx, weight_input, w, scale, shift) -> np.ndarray:
        in_axis, out_axis = self.input_axes(view.nodes[idx], weight_input)
        new_w, extra = numerics.fold_before_linear(w, None, scale, shift, in_axis=in_axis, out_axis=out_axis)
        bias = extra if weight_input == 1 else extra.reshape(-1, 1)
        add = following_bias_add(view, idx, plan.target_rank) if bias.ndim == 1 else None
        if add is None:
            insert_bias_add(editor, view, view.nodes[idx], bias, plan, w.dtype)
        else:  # the Add of a bias after it takes the new bias too
            node, pos = view.nodes[add[0]], add[1]
            const = view.constant(node.input[pos]).value
            editor.set_input(node, pos, const.astype(np.float64) + bias, dtype=const.dtype)
        return new_w

    def bias_bound(self, view, node) -> float:
        return 0.0

    def bias_add_after(self, view, idx, weight_input, rank) -> int | None:
        found = following_bias_add(view, idx, rank) if weight_input == 1 else None
        return found[0] if found else None


class BatchNormPair(LinearOp):
    """BN after BN: the second is an affine map, so it merges into the first's gamma and beta."""

    op_type = "BatchNormalization"

    def fold_into_previous(self, editor, view, plan, node, scale, shift) -> tuple[float, float | None]:
        return merge_bn_pair(editor, view, plan, scale, shift)


_LINEAR_OPS = {variant.op_type: variant() for variant in (Conv, ConvTranspose, Gemm, MatMul)}
BN_PAIR = BatchNormPair()


def linear_op(node: onnx.NodeProto) -> LinearOp | None:
    """The type of a Conv, ConvTranspose, Gemm or MatMul of the default domain; None for any other node."""
    return _LINEAR_OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None


def _group(node: onnx.NodeProto) -> int:
    return int(attribute_values(node).get("group", 1))


def _trans_b(node: onnx.NodeProto) -> bool:
    return bool(int(attribute_values(node).get("transB", 0)))
