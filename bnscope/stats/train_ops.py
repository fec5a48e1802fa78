"""Train mode as standard ops: onnxruntime cannot run BatchNormalization with training_mode=1 (in
most builds and providers), so ``instrument(mode="train")`` replaces each BN by

    y = (x - mean_b) / sqrt(var_b + eps) * gamma + beta,   mean_b, var_b over N and the spatial axes

(population variance, as BatchNormalization's training mode normalises), in float32 for fp16 and
bfloat16 models. A mixin of :class:`bnscope.stats.taps.TapBuilder`, whose node helpers it uses.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from bnscope.onnxio.bn import bn_attributes

LOW_PRECISION = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def bn_params(view, node: onnx.NodeProto):
    """gamma, beta, mean, var of a BN node as float64 vectors."""
    return [view.constant(n).value.astype(np.float64).reshape(-1) for n in node.input[1:5]]


class TrainModeOps:
    """Replaces a BN by the standard ops of its training-mode normalisation."""

    def replace_with_batch_norm_ops(self, idx: int, node: onnx.NodeProto) -> None:
        """Train mode: y = (x - mean_b) / sqrt(var_b + eps) * gamma + beta with batch moments."""
        x, y = node.input[0], node.output[0]
        gamma, beta, _, _ = bn_params(self.view, node)
        eps = bn_attributes(node, self.view.opset).epsilon
        xc, dtype = self._compute_input(idx, x)
        rank = self.view.rank_of(x)
        flat = rank is None  # normalise (N, C, L) and reshape back to x's shape
        if flat:
            xc = self._node(idx, "Reshape", [xc, self._const("shape3", np.array([0, 0, -1], np.int64))], "x3")
            rank = 3
        axes = [0] + list(range(2, rank))
        per_channel = (-1,) + (1,) * (rank - 2)
        mean = self._reduce_mean(idx, xc, axes)
        centred = self._node(idx, "Sub", [xc, mean], "bc")
        var = self._reduce_mean(idx, self._node(idx, "Mul", [centred, centred], "bc2"), axes)
        std = self._node(
            idx, "Sqrt", [self._node(idx, "Add", [var, self._const("eps", np.array(eps, dtype))], "ve")], "std"
        )
        normed = self._node(idx, "Div", [centred, std], "norm")
        scaled = self._node(idx, "Mul", [normed, self._const("gamma", gamma.astype(dtype).reshape(per_channel))], "g")
        out_dtype = self.view.elem_type_of(x) or TensorProto.FLOAT
        offset = self._const("beta", beta.astype(dtype).reshape(per_channel))
        shifted = self._node(idx, "Add", [scaled, offset], "train_bn")
        if flat:
            shifted = self._node(idx, "Reshape", [shifted, self._node(idx, "Shape", [x], "xshape")], "unflat")
        if out_dtype in LOW_PRECISION:
            shifted = self._node(idx, "Cast", [shifted], "cast", to=out_dtype)
        self.new_nodes[-1][1].output[0] = y  # the last node made writes the BN's output
        node.op_type = "Identity"  # placeholder removed in finish(); keeps indices stable
        del node.input[1:]
        del node.output[:]

    def _reduce_mean(self, after: int, x: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self._node(
                after, "ReduceMean", [x, self._const("axes", np.array(axes, np.int64))], "mean", keepdims=1
            )
        return self._node(after, "ReduceMean", [x], "mean", axes=axes, keepdims=1)
