"""Tests for bnscope.fold.variants: one small type per op a BN folds into, each with its axes.

The weight axes are the ones the onnxscript rewriter's fuse_batchnorm rules use (Conv 0,
ConvTranspose 1, Gemm 1 or 0 with transB) plus MatMul's; each is checked against a fold computed
here in float64 numpy, so a wrong axis fails by value, not only by name.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from bnscope.fold.variants import Conv, ConvTranspose, Gemm, MatMul, linear_op


@pytest.mark.parametrize(
    "node, weight_input, out_axis, in_axis",
    [
        (helper.make_node("Conv", ["x", "w"], ["y"]), 1, 0, 1),
        (helper.make_node("ConvTranspose", ["x", "w"], ["y"]), 1, 1, None),
        (helper.make_node("Gemm", ["a", "b"], ["y"]), 1, 1, 0),
        (helper.make_node("Gemm", ["a", "b"], ["y"], transB=1), 1, 0, 1),
        (helper.make_node("MatMul", ["x", "w"], ["y"]), 1, 1, 0),
        (helper.make_node("MatMul", ["w", "x"], ["y"]), 0, 0, 1),
    ],
)
def test_variant_axes(node, weight_input, out_axis, in_axis):
    variant = linear_op(node)
    assert variant.op_type == node.op_type
    assert variant.output_axis(node, weight_input) == out_axis
    assert variant.takes_bn_before == (in_axis is not None)
    if in_axis is not None:
        assert variant.input_axes(node, weight_input) == (in_axis, out_axis)


@pytest.mark.parametrize("transB", [0, 1])
def test_gemm_output_axis_scales_the_right_weights(transB):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((4, 3) if transB else (3, 4))
    scale = np.abs(rng.standard_normal(4)) + 0.1
    node = helper.make_node("Gemm", ["a", "b"], ["y"], transB=transB)
    axis = Gemm().output_axis(node, 1)
    folded = b * scale.reshape([-1 if i == axis else 1 for i in range(2)])
    y = a @ (b.T if transB else b)
    np.testing.assert_allclose(a @ (folded.T if transB else folded), y * scale)  # BN's scale per output


def test_conv_transpose_features_count_every_group():
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], group=3)
    assert ConvTranspose().features(node, (6, 2, 3, 3), 1) == 6  # C_out = 2 per group * 3 groups
    assert Conv().features(helper.make_node("Conv", ["x", "w"], ["y"]), (8, 3, 1, 1), 1) == 8


def test_matmul_feature_axis_follows_the_rank():
    assert MatMul().feature_axis(1, 3) == 2 and MatMul().feature_axis(0, 3) == 1
    assert MatMul().feature_axis(1, None) is None
    assert Conv().feature_axis(1, None) == 1 and not Conv.feature_axis_from_rank


def test_linear_op_only_for_the_default_domain_and_linear_ops():
    assert linear_op(helper.make_node("Conv", ["x", "w"], ["y"], domain="com.example")) is None
    assert linear_op(helper.make_node("Relu", ["x"], ["y"])) is None
    assert linear_op(helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])) is None
