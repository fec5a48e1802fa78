"""What every op a BN folds into has: checks, weight axes and the rewrite, for both directions.

:mod:`bnscope.fold.variants` holds one subclass per op (Conv, ConvTranspose, Gemm, MatMul, and a BN
before the BN) with what differs: the axes, the rank it accepts, how its bias absorbs the shift.
The maths is in that module's docstring.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx

from bnscope import numerics
from bnscope.fold.edits import dtype_of, fold_bias_add, input_value, range_growth, take_bn_output
from bnscope.fold.plan import FoldOptions, Refusal, constant_weight, optional_bias
from bnscope.onnxio.graph import GraphView


class LinearOp:
    """One op a BN folds into. Subclasses name the op and give what differs; the defaults are Conv's
    (weight input 1 with its output features on axis 0, bias input 2, feature axis 1 of the output)."""

    op_type: ClassVar[str]
    feature_kind: ClassVar[str] = "output features"
    takes_bn_before: ClassVar[bool] = True  # False: never the target of an into_next fold
    feature_axis_from_rank: ClassVar[bool] = False  # the output axis of its features depends on the rank

    # -- into the op before the BN -----------------------------------------------------------------
    def check_into_previous(self, view: GraphView, idx: int, options: FoldOptions) -> int | Refusal:
        """The input that holds the weight, when weight and bias may change; else why not."""
        w = constant_weight(view, idx, 1, options)
        if isinstance(w, Refusal):
            return w
        if not self.weight_rank_ok(w.value.ndim):
            return Refusal(f"{self.op_type} weight has rank {w.value.ndim}")
        return optional_bias(view, idx, 2, options) or 1

    def weight_rank_ok(self, ndim: int) -> bool:
        return True

    def output_axis(self, node: onnx.NodeProto, weight_input: int) -> int:
        """The weight axis of the output features."""
        return 0

    def feature_axis(self, weight_input: int, rank: int | None) -> int | None:
        """The axis of the op's output that holds its channels/features (None: rank unknown)."""
        return 1

    def features(self, node: onnx.NodeProto, shape: tuple[int, ...], weight_input: int) -> int:
        """Output features, from the weight's shape."""
        return shape[self.output_axis(node, weight_input)]

    def fold_into_previous(self, editor, view: GraphView, plan, node, scale, shift) -> tuple[float, float | None]:
        """Folds the BN after ``node`` into it; returns (weight range growth, channel imbalance)."""
        bn = view.nodes[plan.bn]
        bias_shift = np.zeros_like(shift) if plan.bias_add is not None else shift
        w = view.constant(node.input[plan.weight_input]).value
        last = view.nodes[view.producer_of(bn.input[0])]  # what feeds the BN now takes its output name
        new_w, output = self.rewrite_into_previous(editor, view, plan, node, w, scale, bias_shift)
        last = output if last is node else last
        editor.set_input(node, plan.weight_input, new_w, dtype=w.dtype)
        if plan.bias_add is not None:
            fold_bias_add(editor, view, plan, scale, shift)
        take_bn_output(editor, view, last, bn)
        return self.range_metrics(node, w, new_w, scale, plan.weight_input)

    def rewrite_into_previous(self, editor, view, plan, node, w, scale, shift) -> tuple[np.ndarray, onnx.NodeProto]:
        """Folds ``shift`` into the bias; returns W' and the node that now computes the op's output."""
        b = input_value(view, node, 2)
        new_w, new_b = numerics.fold_into_weight(w, b, scale, shift, axis=self.output_axis(node, 1))
        editor.set_input(node, 2, new_b, dtype=dtype_of(view, node, 2, w.dtype))
        return new_w, node

    def range_metrics(self, node, w, new_w, scale, weight_input) -> tuple[float, float | None]:
        """From W and scale: no pass over the float64 W'."""
        return numerics.scaled_range_metrics(w, scale, self.output_axis(node, weight_input))

    # -- into the op after the BN ------------------------------------------------------------------
    def check_into_next(self, view: GraphView, idx: int, y: str, params, options, chain) -> int | Refusal:
        """The weight input, when the op contracts over the BN's channels exactly; else why not."""
        raise NotImplementedError  # only for takes_bn_before

    def input_axes(self, node: onnx.NodeProto, weight_input: int) -> tuple[int, int]:
        """(input axis, output axis) of the weight."""
        return 1, 0

    def fold_into_next(self, editor, view, plan, idx, weight_input, scale, shift) -> tuple[float, float | None]:
        """Folds the BN before node ``idx`` into it; returns (weight range growth, channel imbalance)."""
        node = view.nodes[idx]
        w = view.constant(node.input[weight_input]).value
        new_w = self.rewrite_into_next(editor, view, plan, idx, weight_input, w, scale, shift)
        editor.set_input(node, weight_input, new_w, dtype=w.dtype)
        return range_growth(w, new_w, self.input_axes(node, weight_input)[1])

    def rewrite_into_next(self, editor, view, plan, idx, weight_input, w, scale, shift) -> np.ndarray:
        """Adds W contracted with ``shift`` to the bias; returns W'."""
        raise NotImplementedError

    # -- bounds on the folded values ---------------------------------------------------------------
    def bias_bound(self, view: GraphView, node: onnx.NodeProto) -> float:
        """max |b| of the bias the fold rewrites (0 without one)."""
        return abs_max(view, node.input[2]) if len(node.input) > 2 else 0.0

    def bias_add_after(self, view: GraphView, idx: int, weight_input: int, rank: int | None) -> int | None:
        """The Add after the op that takes the new bias of an into_next fold, if any."""
        return None


def abs_max(view: GraphView, name: str) -> float:
    """max |value| of a constant tensor (0 when it is not a constant or empty)."""
    const = view.constant(name)
    return float(np.abs(const.value).max(initial=0.0)) if const is not None and const.value.size else 0.0
