"""Train mode: each BN normalises with its batch's own statistics, and those statistics are the tap.

The batch mean and (population) variance that train-mode normalisation computes anyway are the
batch's moments of the BN input, so ``instrument(mode="train")`` taps them directly, per channel,
(1, C) each: no second reduction of x. Two ways to build it, the same outputs either way:

``bn`` (opset >= 14, float32/float64): the BN itself in training mode with momentum 0 and running
statistics 0 and 1, whose optional outputs are then exactly the batch's mean and variance,

    y, mean_b, var_b = BatchNormalization(x, gamma, beta, 0, 1, training_mode=1, momentum=0)

one fused kernel (on this 2-core CPU, 8 BN x 512 channels on [256, 512, 2, 2]: about 2.8x plain
inference against 22x for the standard ops below before they tapped their own statistics; see
benchmarks/RESULTS.md). onnxruntime before 1.31 and some providers refuse training-mode BN;
:class:`bnscope.stats.collect.Collector` then rebuilds with ``ops``.

``ops`` (any opset and provider; float16/bfloat16 computed in float32):

    mean_b = ReduceMean(x),  xc = x - mean_b,  var_b = ReduceMean(xc * xc)   over N and the spatial axes
    y = xc * (gamma / sqrt(var_b + eps)) + beta

(two-pass, centred: float32 keeps the variance however far the data are from zero). A mixin of
:class:`bnscope.stats.taps.TapBuilder`, whose node helpers it uses.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper

from bnscope.onnxio.bn import bn_attributes
from bnscope.stats.tap_map import Tap

LOW_PRECISION = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
BATCH_MOMENTS = "batch_moments"  # the tap strategy of train mode: the batch's own mean and variance
TRAIN_OPS = ("bn", "ops")


def bn_params(view, node: onnx.NodeProto):
    """gamma, beta, mean, var of a BN node as float64 vectors."""
    return [view.constant(n).value.astype(np.float64).reshape(-1) for n in node.input[1:5]]


def can_train_as_bn(view, node: onnx.NodeProto) -> bool:
    """Whether the BN can run itself in training mode here (the ``bn`` way): opset >= 14 (the
    training_mode attribute) and a float32/float64 input."""
    return view.opset >= 14 and view.elem_type_of(node.input[0]) in (TensorProto.FLOAT, TensorProto.DOUBLE)


class TrainModeOps:
    """Replaces a BN by its training-mode normalisation and taps the batch statistics it computes."""

    def batch_moments(self, idx: int, node: onnx.NodeProto, ops: str = "ops") -> tuple[str, str, str]:
        """Train mode for BN ``idx``; returns the batch's (mean, variance) as (C,) tensors and the
        tensor whose Shape counts the values (x, or its (N, C, L) reshape)."""
        if ops == "bn" and can_train_as_bn(self.view, node):
            return self._as_training_bn(idx, node)
        return self._as_standard_ops(idx, node)

    def _as_training_bn(self, idx: int, node: onnx.NodeProto) -> tuple[str, str, str]:
        gamma = self.view.constant(node.input[1]).value
        channels = int(np.asarray(gamma).size)
        dtype = helper.tensor_dtype_to_np_dtype(self.view.elem_type_of(node.input[0]))
        mean, var = self._name("batch_mean"), self._name("batch_var")
        for attr in list(node.attribute):
            if attr.name in ("training_mode", "momentum", "is_test"):
                node.attribute.remove(attr)
        node.attribute.extend([helper.make_attribute("training_mode", 1), helper.make_attribute("momentum", 0.0)])
        # Momentum 0: the outputs are the batch's own statistics whatever these inputs hold. But
        # onnxruntime writes those outputs into the inputs' buffers, and merges equal initializers
        # first: a constant shared with another node (zeros, ones, or a gamma of the same values)
        # would be overwritten. Each BN gets values no other tensor holds. (So a batch with NaN
        # statistics leaves NaN there for the next batch's 0 * NaN; the merged moments are NaN from
        # that batch on anyway, and the layer is reported broken.)
        own = self.k + np.arange(channels) / (channels + 1.0) + 1.0 / 3.0
        node.input[3] = self._const("running_mean_in", own.astype(dtype))
        node.input[4] = self._const("running_var_in", (own + 0.5).astype(dtype))
        del node.output[1:]
        node.output.extend([mean, var])
        return mean, var, node.input[0]

    def _as_standard_ops(self, idx: int, node: onnx.NodeProto) -> tuple[str, str, str]:
        x, y = node.input[0], node.output[0]
        gamma, beta, _, _ = bn_params(self.view, node)
        eps = bn_attributes(node, self.view.opset).epsilon
        xc, dtype = self._compute_input(idx, x)
        rank = self.view.rank_of(x)
        counted = x
        flat = rank is None  # normalise (N, C, L) and reshape back to x's shape
        if flat:
            xc = counted = self._node(idx, "Reshape", [xc, self._const("shape3", np.array([0, 0, -1], np.int64))], "x3")
            rank = 3
        axes = [0] + list(range(2, rank))
        per_channel = (-1,) + (1,) * (rank - 2)
        mean = self._reduce(idx, "ReduceMean", xc, axes, "mean", keepdims=1)
        centred = self._node(idx, "Sub", [xc, mean], "bc")
        var = self._reduce(
            idx, "ReduceMean", self._node(idx, "Mul", [centred, centred], "bc2"), axes, "var", keepdims=1
        )
        eps_const = self._const("eps", np.array(eps, dtype))
        gamma_const = self._const("gamma", gamma.astype(dtype).reshape(per_channel))
        scale = self._node(
            idx,
            "Div",
            [gamma_const, self._node(idx, "Sqrt", [self._node(idx, "Add", [var, eps_const], "ve")], "std")],
            "s",
        )
        scaled = self._node(idx, "Mul", [centred, scale], "g")
        out_dtype = self.view.elem_type_of(x) or TensorProto.FLOAT
        shifted = self._node(
            idx, "Add", [scaled, self._const("beta", beta.astype(dtype).reshape(per_channel))], "train_bn"
        )
        if flat:
            shifted = self._node(idx, "Reshape", [shifted, self._node(idx, "Shape", [x], "xshape")], "unflat")
        if out_dtype in LOW_PRECISION:
            shifted = self._node(idx, "Cast", [shifted], "cast", to=out_dtype)
        self.new_nodes[-1][1].output[0] = y  # the last node made writes the BN's output
        row = self._const("row", np.array([-1], np.int64))
        rows = (self._node(idx, "Reshape", [mean, row], "mean_row"), self._node(idx, "Reshape", [var, row], "var_row"))
        node.op_type = "Identity"  # placeholder removed in finish(); keeps indices stable
        del node.input[1:]
        del node.output[:]
        return (*rows, counted)

    def train_tap(self, idx: int, name: str, node: onnx.NodeProto, ops: str = "ops") -> Tap:
        """Train mode (see :mod:`bnscope.stats.train_ops`): the BN normalises with its batch's
        statistics, which are its tap."""
        x = node.input[0]
        shift = self.view.constant(node.input[3]).value.astype(np.float64).reshape(-1)
        rank = self.view.rank_of(x)
        spatial = (1 if rank == 2 else self._spatial(x)) if rank is not None else None
        elem = self.view.elem_type_of(x) or TensorProto.FLOAT
        elem = TensorProto.FLOAT if elem in LOW_PRECISION else elem  # computed in float32
        mean, var, counted = self.batch_moments(idx, node, ops)
        tap = Tap(name, shift.shape[0], BATCH_MOMENTS, {}, shift, spatial=spatial)
        self._pack(name, x, (mean, var), tap.columns, elem, 2, direct=True)
        outputs = {"s1": mean, "s2": var, **self._shape_tap(idx, counted, spatial, rank if rank is not None else 3)}
        return replace(tap, outputs=outputs)
