"""Tests for bnscope.fold: each fold pattern rewritten and checked by value against onnxruntime.

Every comparison runs both models at ``ORT_DISABLE_ALL``: at any other level onnxruntime folds
Conv+BN itself and the comparison would prove nothing.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import (
    bn_arrays,
    bn_count,
    bn_inits,
    bn_node,
    check_fold,
    init,
    make_model,
    ort_run,
    ref_run,
    vi,
)
from helpers import REAL_MODELS
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bnscope.errors import BnscopeError
from bnscope.fold.plan import FoldOptions
from bnscope.fold.rewrite import fold_batchnorm


def _randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _refusals(records) -> list[str]:
    return [r.reason for r in records if not r.folded]


# -- Conv ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("group", ["1", "2", "depthwise"])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_conv_bn(rng, dims, group, bias):
    #   x -> Conv(w[, b], group) -> BN -> y
    c_in, c_out = 4, 8 if group != "depthwise" else 4
    g = {"1": 1, "2": 2, "depthwise": c_in}[group]
    spatial = [6, 5, 4][:dims]
    w = _randn(rng, c_out, c_in // g, *([3] * dims))
    inits = [init("w", w)] + ([init("b", _randn(rng, c_out))] if bias else []) + bn_inits(rng, c_out)
    conv = helper.make_node("Conv", ["x", "w", "b"] if bias else ["x", "w"], ["c"], group=g, pads=[1] * 2 * dims)
    model = make_model([conv, bn_node("c", "y")], [vi("x", [2, c_in, *spatial])], [vi("y", None)], inits)
    folded, records = check_fold(model, {"x": _randn(rng, 2, c_in, *spatial)}, folded_bns=1)
    assert records[0].direction == "into_previous" and records[0].target_op == "Conv"
    conv_out = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert len(conv_out) == 1 and conv_out[0].output[0] == "y" and len(conv_out[0].input) == 3


# -- ConvTranspose ------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_conv_transpose_bn(rng, group, bias):
    #   x -> ConvTranspose(w (C_in, C_out/g, 3, 3)[, b], group, stride 2) -> BN -> y
    c_in, c_out = 4, 8
    w = _randn(rng, c_in, c_out // group, 3, 3)
    inits = [init("w", w)] + ([init("b", _randn(rng, c_out))] if bias else []) + bn_inits(rng, c_out)
    node = helper.make_node(
        "ConvTranspose", ["x", "w", "b"] if bias else ["x", "w"], ["c"], group=group, strides=[2, 2]
    )
    model = make_model([node, bn_node("c", "y")], [vi("x", [1, c_in, 5, 5])], [vi("y", None)], inits)
    _, records = check_fold(model, {"x": _randn(rng, 1, c_in, 5, 5)}, folded_bns=1)
    assert records[0].target_op == "ConvTranspose"


@pytest.mark.parametrize("group", [1, 2])
def test_fold_conv_transpose_add_bn_paddle_style(rng, group):
    #   x -> ConvTranspose(w, no bias) -> Add(const [1,C,1,1]) -> BN -> y
    c_in, c_out = 4, 6
    inits = [init("w", _randn(rng, c_in, c_out // group, 2, 2)), init("addb", _randn(rng, 1, c_out, 1, 1))]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=group, strides=[2, 2]),
        helper.make_node("Add", ["c", "addb"], ["a"]),
        bn_node("a", "y"),
    ]
    model = make_model(nodes, [vi("x", [1, c_in, 4, 4])], [vi("y", None)], inits + bn_inits(rng, c_out))
    folded, _ = check_fold(model, {"x": _randn(rng, 1, c_in, 4, 4)}, folded_bns=1)
    assert [n.op_type for n in folded.graph.node] == ["ConvTranspose", "Add"]


# -- Gemm ---------------------------------------------------------------------------------------
_GEMM_C = [None, "N", "1N", "MN", "M1", "1"]


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.7, 1.0), (1.0, 2.5), (1.3, 0.0)])
@pytest.mark.parametrize("c_shape", _GEMM_C)
def test_fold_gemm_bn(rng, trans_a, trans_b, alpha, beta, c_shape):
    #   x -> Gemm(B[, C], alpha, beta, transA, transB) -> BN -> y     (batch M fixed)
    m, k, n = 3, 5, 4
    b = _randn(rng, *((n, k) if trans_b else (k, n)))
    inits = [init("B", b)]
    inputs = ["x", "B"]
    if c_shape is not None:
        inits.append(init("C", _randn(rng, *{"N": (n,), "1N": (1, n), "MN": (m, n), "M1": (m, 1), "1": (1,)}[c_shape])))
        inputs.append("C")
    gemm = helper.make_node("Gemm", inputs, ["g"], alpha=alpha, beta=beta, transA=trans_a, transB=trans_b)
    x_shape = [k, m] if trans_a else [m, k]
    model = make_model([gemm, bn_node("g", "y")], [vi("x", x_shape)], [vi("y", None)], inits + bn_inits(rng, n))
    folded, records = check_fold(model, {"x": _randn(rng, *x_shape)}, folded_bns=1)
    assert records[0].target_op == "Gemm"
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]


# -- MatMul -------------------------------------------------------------------------------------
def test_fold_matmul_bn_2d(rng):
    #   x (M, K) -> MatMul(W (K, N)) -> BN -> y
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["mm"]), bn_node("mm", "y")],
        [vi("x", [3, 5])],
        [vi("y", None)],
        [init("W", _randn(rng, 5, 4))] + bn_inits(rng, 4),
    )
    folded, _ = check_fold(model, {"x": _randn(rng, 3, 5)}, folded_bns=1)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]


def test_fold_matmul_add_bn(rng):
    #   x (M, K) -> MatMul(W) -> Add(bias (N,)) -> BN -> y
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["a"]),
        bn_node("a", "y"),
    ]
    inits = [init("W", _randn(rng, 5, 4)), init("bias", _randn(rng, 4))] + bn_inits(rng, 4)
    model = make_model(nodes, [vi("x", [3, 5])], [vi("y", None)], inits)
    folded, _ = check_fold(model, {"x": _randn(rng, 3, 5)}, folded_bns=1)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]


def test_fold_constant_left_matmul_bn_3d(rng):
    #   x (B, K, L) -> MatMul(W (M, K) @ x) -> (B, M, L) -> BN(M) -> y
    model = make_model(
        [helper.make_node("MatMul", ["W", "x"], ["mm"]), bn_node("mm", "y")],
        [vi("x", [2, 5, 7])],
        [vi("y", None)],
        [init("W", _randn(rng, 4, 5))] + bn_inits(rng, 4),
    )
    check_fold(model, {"x": _randn(rng, 2, 5, 7)}, folded_bns=1)


# -- constants that are not plain initializers --------------------------------------------------
def _const(name, value):
    return helper.make_node("Constant", [], [name], value=init(name + "_t", value))


def test_fold_weights_and_params_from_constant_nodes(rng):
    #   Constant(w), Constant(b), Constant(scale..var)
    #   x -> Conv(w, b) -> BN -> y
    params = bn_arrays(rng, 4)
    nodes = [_const("w", _randn(rng, 4, 3, 3, 3)), _const("b", _randn(rng, 4))]
    nodes += [_const(f"bn_{k}", v) for k, v in params.items()]
    nodes += [helper.make_node("Conv", ["x", "w", "b"], ["c"]), bn_node("c", "y")]
    model = make_model(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", None)])
    folded, _ = check_fold(model, {"x": _randn(rng, 1, 3, 6, 6)}, folded_bns=1)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    assert sum(n.op_type == "Constant" for n in folded.graph.node) + len(folded.graph.initializer) == 2


@pytest.mark.parametrize("via", ["Transpose", "Identity", "Cast"])
def test_fold_weight_through_constant_op(rng, via):
    #   w0 -> Transpose/Identity/Cast -> w;   x -> Conv(w) -> BN -> y
    if via == "Transpose":
        w0, node = _randn(rng, 3, 4, 3, 3), helper.make_node("Transpose", ["w0"], ["w"], perm=[1, 0, 2, 3])
    elif via == "Identity":
        w0, node = _randn(rng, 4, 3, 3, 3), helper.make_node("Identity", ["w0"], ["w"])
    else:
        w0, node = (
            _randn(rng, 4, 3, 3, 3, dtype=np.float64),
            helper.make_node("Cast", ["w0"], ["w"], to=TensorProto.FLOAT),
        )
    nodes = [node, helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")]
    model = make_model(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", None)], [init("w0", w0)] + bn_inits(rng, 4))
    folded, _ = check_fold(model, {"x": _randn(rng, 1, 3, 6, 6)}, folded_bns=1)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


# -- BN before the linear op --------------------------------------------------------------------
def test_fold_bn_before_conv_without_padding(rng):
    #   x -> BN -> Conv(w, b, pads 0, group 2) -> y
    nodes = [bn_node("x", "n"), helper.make_node("Conv", ["n", "w", "b"], ["y"], group=2)]
    inits = [init("w", _randn(rng, 6, 2, 3, 3)), init("b", _randn(rng, 6))] + bn_inits(rng, 4)
    model = make_model(nodes, [vi("x", [2, 4, 7, 7])], [vi("y", None)], inits)
    _, records = check_fold(model, {"x": _randn(rng, 2, 4, 7, 7)}, folded_bns=1)
    assert records[0].direction == "into_next"


def test_fold_bn_before_conv_with_padding_is_refused(rng):
    #   x -> BN -> Conv(pads 1) -> y
    nodes = [bn_node("x", "n"), helper.make_node("Conv", ["n", "w"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(
        nodes, [vi("x", [1, 4, 5, 5])], [vi("y", None)], [init("w", _randn(rng, 3, 4, 3, 3))] + bn_inits(rng, 4)
    )
    _, records = fold_batchnorm(model)
    assert not records[0].folded and "padding" in records[0].reason


@pytest.mark.parametrize("trans_b", [0, 1])
def test_fold_bn_before_gemm(rng, trans_b):
    #   x (M, K) -> BN(K) -> Gemm(B, C, alpha 0.5, beta 2, transB) -> y
    b = _randn(rng, *((3, 5) if trans_b else (5, 3)))
    nodes = [bn_node("x", "n"), helper.make_node("Gemm", ["n", "B", "C"], ["y"], transB=trans_b, alpha=0.5, beta=2.0)]
    inits = [init("B", b), init("C", _randn(rng, 3))] + bn_inits(rng, 5)
    model = make_model(nodes, [vi("x", [4, 5])], [vi("y", None)], inits)
    _, records = check_fold(model, {"x": _randn(rng, 4, 5)}, folded_bns=1)
    assert records[0].direction == "into_next"


def test_fold_bn_before_matmul(rng):
    #   x (M, K) -> BN(K) -> MatMul(W (K, N)) -> y
    nodes = [bn_node("x", "n"), helper.make_node("MatMul", ["n", "W"], ["y"])]
    model = make_model(nodes, [vi("x", [4, 5])], [vi("y", None)], [init("W", _randn(rng, 5, 3))] + bn_inits(rng, 5))
    _, records = check_fold(model, {"x": _randn(rng, 4, 5)}, folded_bns=1)
    assert records[0].direction == "into_next"


# -- BN after BN --------------------------------------------------------------------------------
def test_fold_bn_after_bn(rng):
    #   x -> BN1 -> BN2 -> y
    nodes = [bn_node("x", "t", "bn1"), bn_node("t", "y", "bn2")]
    model = make_model(
        nodes, [vi("x", [2, 4, 3, 3])], [vi("y", None)], bn_inits(rng, 4, "bn1") + bn_inits(rng, 4, "bn2")
    )
    folded, records = check_fold(model, {"x": _randn(rng, 2, 4, 3, 3)}, folded_bns=1)
    assert [r.folded for r in records] == [False, True]
    assert "graph input" in records[0].reason


def test_fold_conv_bn_bn(rng):
    #   x -> Conv -> BN1 -> BN2 -> y      (both end up in the Conv)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "t", "bn1"), bn_node("t", "y", "bn2")]
    inits = [init("w", _randn(rng, 4, 3, 1, 1))] + bn_inits(rng, 4, "bn1") + bn_inits(rng, 4, "bn2")
    model = make_model(nodes, [vi("x", [2, 3, 3, 3])], [vi("y", None)], inits)
    folded, _ = check_fold(model, {"x": _randn(rng, 2, 3, 3, 3)}, folded_bns=2)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


# -- sharing and consumers ----------------------------------------------------------------------
def test_fold_shared_weight_is_cloned(rng):
    #   x -> Conv1(w) -> BN -> y1
    #   x -> Conv2(w) -------> y2      (Conv2 must keep the original w)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c1"], name="conv1"),
        bn_node("c1", "y1"),
        helper.make_node("Conv", ["x", "w", "b"], ["y2"], name="conv2"),
    ]
    w = _randn(rng, 4, 3, 3, 3)
    model = make_model(
        nodes,
        [vi("x", [1, 3, 5, 5])],
        [vi("y1", None), vi("y2", None)],
        [init("w", w), init("b", _randn(rng, 4))] + bn_inits(rng, 4),
    )
    folded, _ = check_fold(model, {"x": _randn(rng, 1, 3, 5, 5)}, folded_bns=1)
    conv2 = next(n for n in folded.graph.node if n.name == "conv2")
    inits = {t.name: t for t in folded.graph.initializer}
    assert list(conv2.input) == ["x", "w", "b"]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits["w"]), w)


def test_fold_conv_with_two_consumers_is_refused(rng):
    #   x -> Conv -> BN -> y1
    #           \--> Relu -> y2
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y1"), helper.make_node("Relu", ["c"], ["y2"])]
    model = make_model(
        nodes,
        [vi("x", [1, 3, 5, 5])],
        [vi("y1", None), vi("y2", None)],
        [init("w", _randn(rng, 4, 3, 1, 1))] + bn_inits(rng, 4),
    )
    folded, records = fold_batchnorm(model)
    assert "2 consumers" in records[0].reason and bn_count(folded) == 1


def test_fold_conv_output_is_graph_output_is_refused(rng):
    #   x -> Conv -> c (graph output) -> BN -> y
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")]
    model = make_model(
        nodes,
        [vi("x", [1, 3, 5, 5])],
        [vi("c", None), vi("y", None)],
        [init("w", _randn(rng, 4, 3, 1, 1))] + bn_inits(rng, 4),
    )
    folded, records = fold_batchnorm(model)
    assert "graph output" in records[0].reason and bn_count(folded) == 1


# -- through Reshape / Flatten ------------------------------------------------------------------
@pytest.mark.parametrize("tail", [[6], [2, 3]])
def test_fold_gemm_reshape_bn(rng, tail):
    #   x (M, K) -> Gemm(B, C) -> (M, C*L) -> Reshape(M, C, L) or (M, C, 2, 3) -> BN(C) -> y
    m, k, c, span = 3, 5, 4, 6
    nodes = [
        helper.make_node("Gemm", ["x", "B", "C"], ["g"], transB=1),
        helper.make_node("Reshape", ["g", "shape"], ["r"]),
        bn_node("r", "y"),
    ]
    shape = np.array([m, c, *tail], np.int64)
    inits = [init("B", _randn(rng, c * span, k)), init("C", _randn(rng, c * span)), init("shape", shape)]
    model = make_model(nodes, [vi("x", [m, k])], [vi("y", None)], inits + bn_inits(rng, c))
    _, records = check_fold(model, {"x": _randn(rng, m, k)}, folded_bns=1)
    assert records[0].target_op == "Gemm"


def test_fold_matmul_reshape_bn(rng):
    #   x (M, K) -> MatMul(W) -> Reshape(M, C, L) -> BN(C) -> y   (a bias Add is inserted)
    m, k, c, span = 3, 5, 4, 2
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["g"]),
        helper.make_node("Reshape", ["g", "shape"], ["r"]),
        bn_node("r", "y"),
    ]
    inits = [init("W", _randn(rng, k, c * span)), init("shape", np.array([m, c, span], np.int64))]
    model = make_model(nodes, [vi("x", [m, k])], [vi("y", None)], inits + bn_inits(rng, c))
    check_fold(model, {"x": _randn(rng, m, k)}, folded_bns=1)


def test_fold_gemm_flatten_bn(rng):
    #   x (M, K) -> Gemm -> Flatten -> BN(N) -> y
    nodes = [helper.make_node("Gemm", ["x", "B"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]), bn_node("f", "y")]
    model = make_model(nodes, [vi("x", [3, 5])], [vi("y", None)], [init("B", _randn(rng, 5, 4))] + bn_inits(rng, 4))
    check_fold(model, {"x": _randn(rng, 3, 5)}, folded_bns=1)


def test_fold_reshape_channel_owns_two_blocks(rng):
    #   x (2, 5) -> Gemm -> (2, 24) -> Reshape(4, 3, 4) -> BN(3) -> y
    #   the Reshape splits each row across the batch axis: channel c owns features {4c..4c+3} and
    #   {12+4c..12+4c+3}; every feature still belongs to one channel, so the fold is exact
    nodes = [
        helper.make_node("Gemm", ["x", "B"], ["g"]),
        helper.make_node("Reshape", ["g", "shape"], ["r"]),
        bn_node("r", "y"),
    ]
    inits = [init("B", _randn(rng, 5, 24)), init("shape", np.array([4, 3, 4], np.int64))]
    model = make_model(nodes, [vi("x", [2, 5])], [vi("y", None)], inits + bn_inits(rng, 3))
    check_fold(model, {"x": _randn(rng, 2, 5)}, folded_bns=1)


def test_fold_reshape_feature_in_two_channels_is_refused(rng):
    #   x (2, 5) -> Gemm -> (2, 6) -> Reshape(3, 4) -> BN(4) -> y
    #   feature 0 is element 0 (channel 0) of sample 0 and element 6 (channel 2) of sample 1
    nodes = [
        helper.make_node("Gemm", ["x", "B"], ["g"]),
        helper.make_node("Reshape", ["g", "shape"], ["r"]),
        bn_node("r", "y"),
    ]
    inits = [init("B", _randn(rng, 5, 6)), init("shape", np.array([3, 4], np.int64))]
    model = make_model(nodes, [vi("x", [2, 5])], [vi("y", None)], inits + bn_inits(rng, 4))
    folded, records = fold_batchnorm(model)
    assert not records[0].folded and "feature 0" in records[0].reason and "channels 0 and 2" in records[0].reason
    assert bn_count(folded) == 1


# -- parameters, modes, overridable initializers ------------------------------------------------
def test_fold_training_mode_is_refused(rng):
    #   x -> Conv -> BN(training_mode=1, opset 15) -> y
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", ["y", "rm", "rv"], training_mode=1)]
    model = make_model(
        nodes,
        [vi("x", [2, 3, 4, 4])],
        [vi("y", None)],
        [init("w", _randn(rng, 4, 3, 1, 1))] + bn_inits(rng, 4),
        opset=15,
    )
    _, records = fold_batchnorm(model)
    assert not records[0].folded and "training_mode" in records[0].reason


def test_fold_params_as_graph_inputs_is_refused(rng):
    #   x, scale, B, mean, var (all graph inputs) -> Conv -> BN -> y
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")]
    ins = [vi("x", [1, 3, 4, 4])] + [vi(f"bn_{k}", [4]) for k in ("scale", "B", "mean", "var")]
    model = make_model(nodes, ins, [vi("y", None)], [init("w", _randn(rng, 4, 3, 1, 1))])
    _, records = fold_batchnorm(model)
    assert not records[0].folded and "graph inputs" in records[0].reason


def _ir3_conv_bn(rng):
    #   opset 9, IR 3: every initializer also listed as a graph input
    #   x -> Conv(w, b) -> BN -> y
    inits = [init("w", _randn(rng, 4, 3, 3, 3)), init("b", _randn(rng, 4))] + bn_inits(rng, 4)
    ins = [vi("x", [1, 3, 6, 6])] + [vi(t.name, list(t.dims)) for t in inits]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "y")]
    return make_model(nodes, ins, [vi("y", None)], inits, opset=9, ir_version=3)


def test_fold_initializers_listed_as_inputs(rng):
    model = _ir3_conv_bn(rng)
    folded, records = check_fold(model, {"x": _randn(rng, 1, 3, 6, 6)}, folded_bns=1)
    assert records[0].notes and "graph inputs" in records[0].notes[0]
    init_names = {t.name for t in folded.graph.initializer}
    assert init_names <= {i.name for i in folded.graph.input}


def test_fold_initializers_listed_as_inputs_kept_when_overridable(rng):
    model = _ir3_conv_bn(rng)
    folded, records = fold_batchnorm(model, FoldOptions(keep_overridable=True))
    assert not records[0].folded and "overridable" in records[0].reason
    assert folded.SerializeToString() == model.SerializeToString()


def test_fold_conv_weight_graph_input_is_refused(rng):
    #   x, w (graph input) -> Conv -> BN -> y
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4]), vi("w", [4, 3, 1, 1])], [vi("y", None)], bn_inits(rng, 4))
    _, records = fold_batchnorm(model)
    assert not records[0].folded and "not a constant" in records[0].reason


def test_fold_nan_in_running_var_is_refused(rng):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")]
    params = bn_arrays(rng, 4)
    params["var"][2] = np.nan
    inits = [init("w", _randn(rng, 4, 3, 1, 1))] + [init(f"bn_{k}", v) for k, v in params.items()]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits)
    _, records = fold_batchnorm(model)
    assert not records[0].folded and "NaN" in records[0].reason and "[2]" in records[0].reason


# -- dtypes -------------------------------------------------------------------------------------
def _conv_bn_chain(rng, dtype, elem_type):
    #   x -> Conv(w1, b1, pads 1) -> BN1 -> Relu -> Conv(w2) -> BN2 -> y
    c = 8
    inits = (
        [
            init("w1", (_randn(rng, c, 3, 3, 3) * 0.3).astype(dtype)),
            init("b1", _randn(rng, c).astype(dtype)),
            init("w2", (_randn(rng, c, c, 3, 3) * 0.1).astype(dtype)),
        ]
        + bn_inits(rng, c, "bn1", dtype)
        + bn_inits(rng, c, "bn2", dtype)
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        bn_node("c1", "n1", "bn1"),
        helper.make_node("Relu", ["n1"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        bn_node("c2", "y", "bn2"),
    ]
    return make_model(nodes, [vi("x", [1, 3, 8, 8], elem_type)], [vi("y", None, elem_type)], inits)


def test_fold_float16_close_to_float32_twin(rng):
    m16 = _conv_bn_chain(np.random.default_rng(1), np.float16, TensorProto.FLOAT16)
    m32 = _conv_bn_chain(np.random.default_rng(1), np.float32, TensorProto.FLOAT)
    x = _randn(rng, 1, 3, 8, 8).astype(np.float16)
    f16, _ = check_fold(m16, {"x": x}, folded_bns=2, rtol=5e-2, atol=5e-2)
    f32, _ = fold_batchnorm(m32)
    assert {t.data_type for t in f16.graph.initializer} == {TensorProto.FLOAT16}
    want = ort_run(f32, {"x": x.astype(np.float32)})[0]
    unfolded, folded = ort_run(m16, {"x": x})[0], ort_run(f16, {"x": x})[0]
    rel = lambda a: np.linalg.norm(a.astype(np.float64) - want) / np.linalg.norm(want)  # noqa: E731
    assert folded.dtype == np.float16
    assert rel(folded) < 3 * rel(unfolded) + 1e-4


def test_fold_float64(rng):
    model = _conv_bn_chain(rng, np.float64, TensorProto.DOUBLE)
    folded, _ = check_fold(
        model, {"x": _randn(rng, 1, 3, 8, 8, dtype=np.float64)}, folded_bns=2, rtol=1e-10, atol=1e-12, run=ref_run
    )
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.DOUBLE}


# -- selection and names ------------------------------------------------------------------------
def test_fold_only_and_skip(rng):
    model = _conv_bn_chain(rng, np.float32, TensorProto.FLOAT)
    x = {"x": _randn(rng, 1, 3, 8, 8)}
    _, records = check_fold(model, x, FoldOptions(only=frozenset({"bn2"})), folded_bns=1)
    assert [r.folded for r in records] == [False, True] and "--only" in records[0].reason
    _, records = check_fold(model, x, FoldOptions(skip=frozenset({"bn2"})), folded_bns=1)
    assert [r.folded for r in records] == [True, False] and "--skip" in records[1].reason


@pytest.mark.parametrize(
    "options", [FoldOptions(only=frozenset({"bn_2"})), FoldOptions(skip=frozenset({"bn1", "nope"}))]
)
def test_fold_only_or_skip_naming_no_bn_is_refused(rng, options):
    # a typo must not silently fold everything (--skip) or nothing (--only)
    with pytest.raises(BnscopeError, match=r"no BatchNormalization in the model is named '(bn_2|nope)'.*bn1, bn2"):
        fold_batchnorm(_conv_bn_chain(rng, np.float32, TensorProto.FLOAT), options)


def test_fold_unnamed_nodes_get_stable_record_names(rng):
    model = _conv_bn_chain(rng, np.float32, TensorProto.FLOAT)
    for node in model.graph.node:
        node.name = ""
    folded, records = check_fold(
        model, {"x": _randn(rng, 1, 3, 8, 8)}, FoldOptions(skip=frozenset({"BatchNormalization#1"})), folded_bns=1
    )
    assert [(r.name, r.folded, r.target) for r in records] == [
        ("BatchNormalization#0", True, "Conv#0"),
        ("BatchNormalization#1", False, None),
    ]
    assert all(n.name == "" for n in folded.graph.node)


# -- property: random Conv + BN -----------------------------------------------------------------
@st.composite
def _conv_cases(draw):
    group = draw(st.sampled_from([1, 2, 3]))
    c_in = group * draw(st.integers(1, 3))
    c_out = group * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    return group, c_in, c_out, kernel, stride, draw(st.booleans()), draw(st.integers(0, 2**31))


@settings(max_examples=30, deadline=None)
@given(_conv_cases())
def test_fold_conv_bn_property(case):
    group, c_in, c_out, kernel, stride, bias, seed = case
    rng = np.random.default_rng(seed)
    inits = [init("w", _randn(rng, c_out, c_in // group, kernel, kernel))] + bn_inits(rng, c_out)
    inputs = ["x", "w"]
    if bias:
        inits.append(init("b", _randn(rng, c_out)))
        inputs.append("b")
    conv = helper.make_node("Conv", inputs, ["c"], group=group, strides=[stride, stride], pads=[kernel // 2] * 4)
    model = make_model([conv, bn_node("c", "y")], [vi("x", [2, c_in, 7, 7])], [vi("y", None)], inits)
    check_fold(model, {"x": _randn(rng, 2, c_in, 7, 7)}, folded_bns=1, rtol=1e-4, atol=1e-5)


# -- real models --------------------------------------------------------------------------------
def _real(name: str) -> onnx.ModelProto:
    path = REAL_MODELS / name
    if not path.exists():
        pytest.skip(f"needs the real exported models, not in the repository: {path} is absent")
    return onnx.load(str(path))


def _feeds(model, rng):
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        shape = [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        feeds[i.name] = rng.random(shape).astype(dtype)
    return feeds


@pytest.mark.slow
def test_fold_real_picodet(rng):
    model = _real("paddle_picodet_s_320_coco.onnx")
    reference = _real("paddle_picodet_s_320_coco_sim_BNfolded_reference.onnx")
    folded, records = fold_batchnorm(model)
    assert len(records) == 103 and all(r.folded for r in records), _refusals(records)[:3]
    assert bn_count(folded) == 0
    onnx.checker.check_model(folded, full_check=True)
    feeds = _feeds(model, rng)
    want, got, ref = ort_run(model, feeds), ort_run(folded, feeds), ort_run(reference, feeds)
    for w, g, r in zip(want, got, ref):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4)
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_fold_real_ultraface(rng):
    model = _real("pytorch_ultraface_version-RFB-320.onnx")
    folded, records = fold_batchnorm(model)
    assert len(records) == 35 and all(r.folded for r in records), _refusals(records)[:3]
    assert bn_count(folded) == 0
    onnx.checker.check_model(folded, full_check=True)
    feeds = _feeds(model, rng)
    for w, g in zip(ort_run(model, feeds), ort_run(folded, feeds)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * max(1.0, float(np.abs(w).max())))


def test_fold_real_vit_refusals_have_reasons():
    model = _real("vnncomp23_vit_ibp_3_3_8.onnx")
    folded, records = fold_batchnorm(model)
    assert len(records) == 7
    assert all(r.folded or r.reason for r in records)
    assert bn_count(folded) == 7 - sum(r.folded for r in records)
    feeds = _feeds(model, np.random.default_rng(0))
    for w, g in zip(ort_run(model, feeds), ort_run(folded, feeds)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * max(1.0, float(np.abs(w).max())))


# -- more combinations --------------------------------------------------------------------------
def test_fold_gemm_add_reshape_bn(rng):
    #   x (M, K) -> Gemm(B) -> Add(bias (C*L,)) -> Reshape(M, C, L) -> BN(C) -> y
    m, k, c, span = 2, 5, 3, 4
    nodes = [
        helper.make_node("Gemm", ["x", "B"], ["g"]),
        helper.make_node("Add", ["g", "bias"], ["a"]),
        helper.make_node("Reshape", ["a", "shape"], ["r"]),
        bn_node("r", "y"),
    ]
    inits = [
        init("B", _randn(rng, k, c * span)),
        init("bias", _randn(rng, c * span)),
        init("shape", np.array([m, c, span], np.int64)),
    ]
    model = make_model(nodes, [vi("x", [m, k])], [vi("y", None)], inits + bn_inits(rng, c))
    check_fold(model, {"x": _randn(rng, m, k)}, folded_bns=1)


def test_fold_matmul_bn_bn(rng):
    #   x -> MatMul(W) -> BN1 -> BN2 -> y
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"]), bn_node("mm", "t", "bn1"), bn_node("t", "y", "bn2")]
    inits = [init("W", _randn(rng, 5, 4))] + bn_inits(rng, 4, "bn1") + bn_inits(rng, 4, "bn2")
    model = make_model(nodes, [vi("x", [3, 5])], [vi("y", None)], inits)
    check_fold(model, {"x": _randn(rng, 3, 5)}, folded_bns=2)


def test_fold_bn_conv_bn(rng):
    #   x -> BN1 -> Conv(depthwise, pads 0) -> BN2 -> y      (BN1 into_next, BN2 into_previous)
    nodes = [bn_node("x", "n", "bn1"), helper.make_node("Conv", ["n", "w"], ["c"], group=4), bn_node("c", "y", "bn2")]
    inits = [init("w", _randn(rng, 4, 1, 3, 3))] + bn_inits(rng, 4, "bn1") + bn_inits(rng, 4, "bn2")
    model = make_model(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", None)], inits)
    _, records = check_fold(model, {"x": _randn(rng, 1, 4, 6, 6)}, folded_bns=2)
    assert [r.direction for r in records] == ["into_next", "into_previous"]


def test_fold_bn_bn_conv(rng):
    #   x -> BN1 -> BN2 -> Conv(pads 0) -> y      (BN2 merges into BN1, which then goes into Conv)
    nodes = [bn_node("x", "t", "bn1"), bn_node("t", "n", "bn2"), helper.make_node("Conv", ["n", "w"], ["y"])]
    inits = [init("w", _randn(rng, 3, 4, 1, 1))] + bn_inits(rng, 4, "bn1") + bn_inits(rng, 4, "bn2")
    model = make_model(nodes, [vi("x", [1, 4, 3, 3])], [vi("y", None)], inits)
    check_fold(model, {"x": _randn(rng, 1, 4, 3, 3)}, folded_bns=2)


def test_fold_bn_before_constant_left_matmul(rng):
    #   x (B, K, L) -> BN(K) -> MatMul(W (M, K) @ .) -> y (B, M, L)
    nodes = [bn_node("x", "n"), helper.make_node("MatMul", ["W", "n"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 5, 3])], [vi("y", None)], [init("W", _randn(rng, 4, 5))] + bn_inits(rng, 5))
    _, records = check_fold(model, {"x": _randn(rng, 2, 5, 3)}, folded_bns=1)
    assert records[0].direction == "into_next"


def test_fold_shared_weight_both_folded(rng):
    #   x -> Conv1(w) -> BN1 -> y1;   x -> Conv2(w) -> BN2 -> y2
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"]),
        bn_node("c1", "y1", "bn1"),
        helper.make_node("Conv", ["x", "w"], ["c2"]),
        bn_node("c2", "y2", "bn2"),
    ]
    inits = [init("w", _randn(rng, 4, 3, 3, 3))] + bn_inits(rng, 4, "bn1") + bn_inits(rng, 4, "bn2")
    model = make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("y1", None), vi("y2", None)], inits)
    check_fold(model, {"x": _randn(rng, 1, 3, 5, 5)}, folded_bns=2)


def test_fold_ir3_matmul_inserts_listed_bias(rng):
    #   opset 9, IR 3: x -> MatMul(W) -> BN -> y; the inserted bias must also be a graph input
    inits = [init("W", _randn(rng, 5, 4))] + bn_inits(rng, 4)
    ins = [vi("x", [3, 5])] + [vi(t.name, list(t.dims)) for t in inits]
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["mm"]), bn_node("mm", "y")],
        ins,
        [vi("y", None)],
        inits,
        opset=9,
        ir_version=3,
    )
    check_fold(model, {"x": _randn(rng, 3, 5)}, folded_bns=1)


def test_fold_bn_with_epsilon(rng):
    #   x -> Conv -> BN(epsilon 1e-2) -> y
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y", epsilon=1e-2)]
    model = make_model(
        nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], [init("w", _randn(rng, 4, 3, 1, 1))] + bn_inits(rng, 4)
    )
    check_fold(model, {"x": _randn(rng, 1, 3, 4, 4)}, folded_bns=1)


@pytest.mark.parametrize("opset", [7, 9, 13])
def test_fold_bn_with_five_outputs_is_training_mode(rng, opset):
    #   opset 7-13: x -> Conv -> BN(5 outputs, 4 unused) -> y; the output count means training mode
    #   (onnxruntime normalises with batch statistics), so folding would change y
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", ["y", "m", "v", "sm", "sv"])]
    model = make_model(
        nodes,
        [vi("x", [2, 3, 4, 4])],
        [vi("y", [2, 4, 4, 4])],
        [init("w", _randn(rng, 4, 3, 1, 1))] + bn_inits(rng, 4),
        opset=opset,
    )
    folded, records = fold_batchnorm(model)
    assert not records[0].folded and "training mode" in records[0].reason and bn_count(folded) == 1


def test_fold_conv_bias_add_bn(rng):
    #   x -> Conv(w, b) -> Add(const (C, 1, 1)) -> BN -> y
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"]),
        helper.make_node("Add", ["c", "k"], ["a"]),
        bn_node("a", "y"),
    ]
    inits = [init("w", _randn(rng, 4, 3, 3, 3)), init("b", _randn(rng, 4)), init("k", _randn(rng, 4, 1, 1))] + bn_inits(
        rng, 4
    )
    model = make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", None)], inits)
    folded, _ = check_fold(model, {"x": _randn(rng, 1, 3, 5, 5)}, folded_bns=1)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Add"]


def test_fold_unnamed_matmul_adds_no_names(rng):
    #   unnamed: x -> MatMul(W) -> BN -> y; the inserted bias Add stays unnamed too
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"]),
        helper.make_node("BatchNormalization", ["mm", "bn_scale", "bn_B", "bn_mean", "bn_var"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [3, 5])], [vi("y", None)], [init("W", _randn(rng, 5, 4))] + bn_inits(rng, 4))
    folded, records = check_fold(model, {"x": _randn(rng, 3, 5)}, folded_bns=1)
    assert (records[0].name, records[0].target) == ("BatchNormalization#0", "MatMul#0")
    assert [n.name for n in folded.graph.node] == ["", ""]


def test_fold_zero_var_and_epsilon_is_refused(rng):
    #   var 0 with epsilon 0 divides by zero: the BN is not a finite affine map
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y", epsilon=0.0)]
    params = bn_arrays(rng, 4)
    params["var"][3] = 0.0
    inits = [init("w", _randn(rng, 4, 3, 1, 1))] + [init(f"bn_{k}", v) for k, v in params.items()]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits)
    _, records = fold_batchnorm(model)
    assert not records[0].folded and "var + epsilon" in records[0].reason and "[3]" in records[0].reason


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_fold_bn_linear_bn(rng, op):
    #   x (M, K) -> BN1(K) -> MatMul/Gemm(W (K, N)) -> BN2(N) -> y      (both fold)
    nodes = [bn_node("x", "n", "bn1"), helper.make_node(op, ["n", "W"], ["l"]), bn_node("l", "y", "bn2")]
    inits = [init("W", _randn(rng, 5, 4))] + bn_inits(rng, 5, "bn1") + bn_inits(rng, 4, "bn2")
    model = make_model(nodes, [vi("x", [3, 5])], [vi("y", None)], inits)
    _, records = check_fold(model, {"x": _randn(rng, 3, 5)}, folded_bns=2)
    assert [r.direction for r in records] == ["into_next", "into_previous"]


def test_fold_constant_left_matmul_add_bn(rng):
    #   x (B, K, L) -> MatMul(W (M, K) @ x) -> Add(const (M, 1)) -> BN(M) -> y
    nodes = [
        helper.make_node("MatMul", ["W", "x"], ["mm"]),
        helper.make_node("Add", ["mm", "k"], ["a"]),
        bn_node("a", "y"),
    ]
    inits = [init("W", _randn(rng, 4, 5)), init("k", _randn(rng, 4, 1))] + bn_inits(rng, 4)
    model = make_model(nodes, [vi("x", [2, 5, 3])], [vi("y", None)], inits)
    check_fold(model, {"x": _randn(rng, 2, 5, 3)}, folded_bns=1)


def test_fold_float16_overflow_is_refused(rng):
    #   fp16: x -> Conv(|w| ~ 1000) -> BN(gamma 100, var 0, eps 1e-5: scale ~ 3e4) -> y
    #   W * scale is far past float16's 65504: folding would write inf, so the BN stays
    params = bn_arrays(rng, 4, np.float16)
    params["var"][:], params["scale"][:] = 0, 100
    inits = [init("w", (_randn(rng, 4, 3, 1, 1) * 1000).astype(np.float16))]
    inits += [init(f"bn_{k}", v) for k, v in params.items()]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")]
    model = make_model(nodes, [vi("x", [1, 3, 2, 2], TensorProto.FLOAT16)], [vi("y", None, TensorProto.FLOAT16)], inits)
    folded, records = fold_batchnorm(model)
    assert not records[0].folded and "overflow float16" in records[0].reason and bn_count(folded) == 1


def test_fold_chain_with_value_info_is_idempotent(rng):
    #   x (3, 5) -> BN0 -> MatMul(W1) -> BN1 -> Relu -> Gemm(B, C) -> Reshape(3, 2, 2) -> BN2
    #     -> Flatten -> MatMul(W3) -> Add(k) -> BN3 -> y        (shapes inferred into value_info)
    nodes = [
        bn_node("x", "a", "bn0"),
        helper.make_node("MatMul", ["a", "W1"], ["m1"]),
        bn_node("m1", "b", "bn1"),
        helper.make_node("Relu", ["b"], ["rl"]),
        helper.make_node("Gemm", ["rl", "B", "C"], ["g"]),
        helper.make_node("Reshape", ["g", "s"], ["rs"]),
        bn_node("rs", "c2", "bn2"),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("MatMul", ["f", "W3"], ["m3"]),
        helper.make_node("Add", ["m3", "k"], ["ad"]),
        bn_node("ad", "y", "bn3"),
    ]
    inits = [init("W1", _randn(rng, 5, 6)), init("B", _randn(rng, 6, 4)), init("C", _randn(rng, 4))]
    inits += [init("s", np.array([3, 2, 2], np.int64)), init("W3", _randn(rng, 4, 7)), init("k", _randn(rng, 7))]
    for prefix, c in (("bn0", 5), ("bn1", 6), ("bn2", 2), ("bn3", 7)):
        inits += bn_inits(rng, c, prefix)
    model = onnx.shape_inference.infer_shapes(make_model(nodes, [vi("x", [3, 5])], [vi("y", None)], inits))
    assert len(model.graph.value_info) == 10
    folded, records = check_fold(model, {"x": _randn(rng, 3, 5)}, folded_bns=4)
    assert [r.direction for r in records] == ["into_next"] + ["into_previous"] * 3
    assert [n.op_type for n in folded.graph.node] == [
        "MatMul",
        "Add",
        "Relu",
        "Gemm",
        "Reshape",
        "Flatten",
        "MatMul",
        "Add",
    ]
    again, records = fold_batchnorm(folded)
    assert records == [] and again.SerializeToString() == folded.SerializeToString()
