"""Folds through layout-only chains, Reshapes and into several readers, checked by value.

Each positive case folds and compares with onnxruntime at ``ORT_DISABLE_ALL`` (``check_fold``:
BN count drops, full checker, graph I/O kept, no unused initializers); each near miss is refused
with its reason.
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
    vi,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bnscope.fold.rewrite import fold_batchnorm

INT64_MAX = np.iinfo(np.int64).max


def _randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _model(nodes, inputs, inits, outputs=("y",)):
    """IR 8 (onnxruntime refuses onnx 1.23's default); an output named ``shape`` is int64."""
    outs = [vi(o, None, TensorProto.INT64 if o == "shape" else TensorProto.FLOAT) for o in outputs]
    return make_model(nodes, inputs, outs, inits, ir_version=8)


def _refused(model, *words) -> str:
    folded, records = fold_batchnorm(model)
    assert not records[0].folded and bn_count(folded) == bn_count(model), records[0]
    for word in words:
        assert word in records[0].reason, records[0].reason
    return records[0].reason


def _uniform_bn(c: int, prefix: str = "bn") -> list[onnx.TensorProto]:
    """Never-trained BN (keras2onnx's): gamma 0.9995, beta 0, mean 0, var 1 in every channel."""
    values = {"scale": 0.9995, "B": 0.0, "mean": 0.0, "var": 1.0}
    return [init(f"{prefix}_{k}", np.full(c, v, np.float32)) for k, v in values.items()]


# -- a. layout chains between the linear op and the BN -------------------------------------------
def test_fold_conv_identity_bn(rng):
    #   x -> Conv -> Identity -> BN -> y
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Identity", ["c"], ["i"]), bn_node("i", "y")]
    model = _model(nodes, [vi("x", [2, 3, 5, 5])], [init("w", _randn(rng, 4, 3, 3, 3))] + bn_inits(rng, 4))
    folded, records = check_fold(model, {"x": _randn(rng, 2, 3, 5, 5)}, folded_bns=1)
    assert records[0].target_op == "Conv"
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Identity"]


def test_fold_keras_nhwc_round_trip(rng):
    #   x -> Conv -> Transpose(0,2,3,1) -> Identity -> Transpose(0,3,1,2) -> BN -> y   (keras2onnx)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Transpose", ["c"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Identity", ["nhwc"], ["keras"]),
        helper.make_node("Transpose", ["keras"], ["nchw"], perm=[0, 3, 1, 2]),
        bn_node("nchw", "y"),
    ]
    model = _model(nodes, [vi("x", [2, 3, 6, 5])], [init("w", _randn(rng, 4, 3, 2, 2))] + bn_inits(rng, 4))
    folded, _ = check_fold(model, {"x": _randn(rng, 2, 3, 6, 5)}, folded_bns=1)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Transpose", "Identity", "Transpose"]
    assert folded.graph.node[-1].output[0] == "y"


def test_fold_conv_transpose_crop_bn(rng):
    #   x -> ConvTranspose -> Transpose(NHWC) -> Slice(H from 1, every axis to INT64_MAX) ->
    #   Transpose(NCHW) -> BN -> y: the crop keeps every channel; a Shape also reads the NHWC tensor
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["ct"], strides=[1, 2]),
        helper.make_node("Transpose", ["ct"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Shape", ["nhwc"], ["shape"]),
        helper.make_node("Slice", ["nhwc", "starts", "ends", "axes", "steps"], ["crop"]),
        helper.make_node("Transpose", ["crop"], ["nchw"], perm=[0, 3, 1, 2]),
        bn_node("nchw", "y"),
    ]
    inits = [
        init("w", _randn(rng, 3, 4, 2, 3)),
        init("starts", np.array([0, 1, 0, 0], np.int64)),
        init("ends", np.full(4, INT64_MAX, np.int64)),
        init("axes", np.arange(4, dtype=np.int64)),
        init("steps", np.ones(4, np.int64)),
    ] + bn_inits(rng, 4)
    model = _model(nodes, [vi("x", [2, 3, 5, 4])], inits, outputs=("y", "shape"))
    folded, records = check_fold(model, {"x": _randn(rng, 2, 3, 5, 4)}, folded_bns=1)
    assert records[0].target_op == "ConvTranspose"


def test_fold_matmul_transpose_bn(rng):
    #   x (N, L, K) -> MatMul(W (K, F)) -> (N, L, F) -> Transpose(0,2,1) -> BN(F) -> y
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"]),
        helper.make_node("Transpose", ["mm"], ["t"], perm=[0, 2, 1]),
        bn_node("t", "y"),
    ]
    model = _model(nodes, [vi("x", [2, 7, 5])], [init("W", _randn(rng, 5, 6))] + bn_inits(rng, 6))
    folded, _ = check_fold(model, {"x": _randn(rng, 2, 7, 5)}, folded_bns=1)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add", "Transpose"]


def test_fold_uniform_bn_across_a_spatial_axis(rng):
    #   keras2onnx's tcm block: x (N, 1, L, 8) -> Conv(1 -> 1 channel, bias) -> Transpose(0,2,3,1)
    #   -> Squeeze(-1) -> Transpose(0,2,1) -> BN(8) -> y: BN channels are the Conv's W axis, so only a
    #   BN with one (scale, shift) for every channel folds
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"]),
        helper.make_node("Transpose", ["c"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Squeeze", ["nhwc", "axes"], ["sq"]),
        helper.make_node("Transpose", ["sq"], ["ncl"], perm=[0, 2, 1]),
        bn_node("ncl", "y"),
    ]
    inits = [init("w", _randn(rng, 1, 1, 3, 1)), init("b", _randn(rng, 1)), init("axes", np.array([-1], np.int64))]
    model = _model(nodes, [vi("x", [2, 1, 6, 8])], inits + _uniform_bn(8))
    check_fold(model, {"x": _randn(rng, 2, 1, 6, 8)}, folded_bns=1)
    trained = _model(nodes, [vi("x", [2, 1, 6, 8])], inits + bn_inits(rng, 8))
    _refused(trained, "comes from axis 3 of Conv", "not from its output axis 1", "differ in scale/shift")


def test_fold_layout_chain_near_misses(rng):
    #   x -> Conv -> Transpose(0,1,3,2) -> BN: channels stay on axis 1 (folds); Transpose(0,2,1,3)
    #   puts H on the BN's axis 1 (refused)
    def chain(perm):
        nodes = [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Transpose", ["c"], ["t"], perm=perm),
            bn_node("t", "y"),
        ]
        return _model(nodes, [vi("x", [1, 3, 4, 4])], [init("w", _randn(rng, 4, 3, 1, 1))] + bn_inits(rng, 4))

    check_fold(chain([0, 1, 3, 2]), {"x": _randn(rng, 1, 3, 4, 4)}, folded_bns=1)
    _refused(chain([0, 2, 1, 3]), "comes from axis 2 of Conv", "not from its output axis 1")


def test_fold_slice_of_channels_is_refused(rng):
    #   x -> Conv(8) -> Slice(channels 0..4) -> BN(4): BN channel c is not conv channel c in general
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Slice", ["c", "starts", "ends", "axes"], ["s"]),
        bn_node("s", "y"),
    ]
    inits = [
        init("w", _randn(rng, 8, 3, 1, 1)),
        init("starts", np.array([0], np.int64)),
        init("ends", np.array([4], np.int64)),
        init("axes", np.array([1], np.int64)),
    ]
    model = _model(nodes, [vi("x", [1, 3, 4, 4])], inits + bn_inits(rng, 4))
    _refused(model, "Slice", "slices the channel axis 1")


def test_fold_layout_chain_with_second_reader_is_refused(rng):
    #   x -> Conv -> Transpose -> {Transpose -> BN, Relu}: the Relu would see folded values
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Transpose", ["c"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Relu", ["nhwc"], ["r"]),
        helper.make_node("Transpose", ["nhwc"], ["nchw"], perm=[0, 3, 1, 2]),
        bn_node("nchw", "y"),
    ]
    model = _model(
        nodes, [vi("x", [1, 3, 4, 4])], [init("w", _randn(rng, 4, 3, 1, 1))] + bn_inits(rng, 4), outputs=("y", "r")
    )
    _refused(model, "Transpose", "2 consumers")


@st.composite
def _round_trips(draw):
    rank = draw(st.integers(3, 5))
    perm = draw(st.permutations(range(rank)))
    with_identity = draw(st.booleans())
    return rank, list(perm), with_identity, draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(_round_trips())
def test_fold_transpose_round_trip_property(case):
    #   x -> Conv -> Transpose(p) -> [Identity] -> Transpose(p^-1) -> BN -> y, for any p: exact
    rank, perm, with_identity, seed = case
    rng = np.random.default_rng(seed)
    inverse = list(np.argsort(perm))
    spatial = [3, 4, 2][: rank - 2]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Transpose", ["c"], ["t1"], perm=perm)]
    if with_identity:
        nodes.append(helper.make_node("Identity", ["t1"], ["t1i"]))
    nodes += [helper.make_node("Transpose", [nodes[-1].output[0]], ["t2"], perm=inverse), bn_node("t2", "y")]
    inits = [init("w", _randn(rng, 4, 3, *[1] * (rank - 2)))] + bn_inits(rng, 4)
    model = _model(nodes, [vi("x", [2, 3, *spatial])], inits)
    check_fold(model, {"x": _randn(rng, 2, 3, *spatial)}, folded_bns=1)


# -- b. BN -> layout -> MatMul (ViT) ------------------------------------------------------------
def _vit_block(rng, readers: str):
    #   x (N, C, L) -> BN(C) -> Transpose(0,2,1) -> (N, L, C) -> {Shape, q/k/v MatMul [+ bias Add]}
    nodes = [bn_node("x", "n"), helper.make_node("Transpose", ["n"], ["t"], perm=[0, 2, 1])]
    inits, outputs = bn_inits(rng, 6), []
    for k, name in enumerate(readers):
        nodes.append(helper.make_node("MatMul", ["t", f"W{k}"], [f"mm{k}"]))
        inits.append(init(f"W{k}", _randn(rng, 6, 4)))
        if name == "a":  # with a bias Add, as PyTorch exports nn.Linear
            nodes.append(helper.make_node("Add", [f"b{k}", f"mm{k}"], [f"o{k}"]))
            inits.append(init(f"b{k}", _randn(rng, 4)))
        outputs.append(nodes[-1].output[0])
    nodes.append(helper.make_node("Shape", ["t"], ["shape"]))
    return _model(nodes, [vi("x", [2, 6, 5])], inits, outputs=(*outputs, "shape"))


@pytest.mark.parametrize("readers", ["a", "m", "aaa", "ama"])
def test_fold_bn_transpose_matmuls(rng, readers):
    model = _vit_block(rng, readers)
    folded, records = check_fold(model, {"x": _randn(rng, 2, 6, 5)}, folded_bns=1)
    assert records[0].direction == "into_next" and records[0].target_op == "MatMul"
    added = sum(n.op_type == "Add" for n in folded.graph.node) - sum(n.op_type == "Add" for n in model.graph.node)
    assert added == readers.count("m")  # bias Adds absorb the shift; a bare MatMul gets one


def test_fold_bn_transpose_matmul_and_relu_is_refused(rng):
    #   x -> BN -> Transpose -> {MatMul, Relu}: the Relu reads the BN's values
    model = _vit_block(rng, "a")
    model.graph.node.append(helper.make_node("Relu", ["t"], ["r"]))
    model.graph.output.append(vi("r", None))
    reason = _refused(model, "3 consumers", "Relu")
    assert "comes after it" in reason


def test_fold_bn_identity_matmul_over_length_is_refused(rng):
    #   x (N, C, L) -> BN(C) -> Identity -> MatMul(. @ W (L, K)): contracts L, not C
    nodes = [
        bn_node("x", "n"),
        helper.make_node("Identity", ["n"], ["i"]),
        helper.make_node("MatMul", ["i", "W"], ["y"]),
    ]
    model = _model(nodes, [vi("x", [2, 6, 5])], [init("W", _randn(rng, 5, 4))] + bn_inits(rng, 6))
    _refused(model, "does not contract over BN's channel axis")


# -- c. Conv -> Reshape/Flatten -> BN -----------------------------------------------------------
@pytest.mark.parametrize("op,shape", [("Flatten", None), ("Reshape", [-1, 4])])
def test_fold_conv_1x1_flatten_bn(rng, op, shape):
    #   x -> Conv -> (N, 4, 1, 1) -> Flatten / Reshape(-1, 4) -> BN(4) -> y   (a head after pooling)
    inputs = ["c"] if op == "Flatten" else ["c", "shape"]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node(op, inputs, ["f"]), bn_node("f", "y")]
    inits = [init("w", _randn(rng, 4, 3, 3, 3)), init("b", _randn(rng, 4))] + bn_inits(rng, 4)
    inits += [init("shape", np.array(shape, np.int64))] if shape else []
    model = _model(nodes, [vi("x", [2, 3, 3, 3])], inits)
    folded, _ = check_fold(model, {"x": _randn(rng, 2, 3, 3, 3)}, folded_bns=1)
    assert [n.op_type for n in folded.graph.node] == ["Conv", op]


def test_fold_conv_reshape_per_channel_and_per_position(rng):
    #   x -> Conv -> (1, 4, 4, 4) -> Reshape(1, 64) -> BN(64): exact only when the BN's 16 channels
    #   over one conv channel share scale and shift
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Reshape", ["c", "shape"], ["r"]),
        bn_node("r", "y"),
    ]
    params = {k: np.repeat(v, 16) for k, v in bn_arrays(rng, 4).items()}
    inits = [init("w", _randn(rng, 4, 3, 1, 1)), init("shape", np.array([1, 64], np.int64))]
    blocks = _model(nodes, [vi("x", [1, 3, 4, 4])], inits + [init(f"bn_{k}", v) for k, v in params.items()])
    check_fold(blocks, {"x": _randn(rng, 1, 3, 4, 4)}, folded_bns=1)
    per_position = _model(nodes, [vi("x", [1, 3, 4, 4])], inits + bn_inits(rng, 64))
    _refused(per_position, "Reshape", "feature 0", "channels 0 and 1", "scale/shift differ")


def test_fold_conv_add_reshape_bn(rng):
    #   x -> Conv -> Add(const (4, 1, 1)) -> Reshape(N, 4, 16) -> BN(4) -> y
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Add", ["c", "k"], ["a"]),
        helper.make_node("Reshape", ["a", "shape"], ["r"]),
        bn_node("r", "y"),
    ]
    inits = [
        init("w", _randn(rng, 4, 3, 1, 1)),
        init("k", _randn(rng, 4, 1, 1)),
        init("shape", np.array([2, 4, 16], np.int64)),
    ] + bn_inits(rng, 4)
    model = _model(nodes, [vi("x", [2, 3, 4, 4])], inits)
    check_fold(model, {"x": _randn(rng, 2, 3, 4, 4)}, folded_bns=1)


# -- d. 3-D MatMul -> Reshape -> BN -------------------------------------------------------------
@pytest.mark.parametrize("shape", [[-1, 6], [-1, 3, 2], [14, 2, 3]])
def test_fold_matmul_3d_reshape_bn(rng, shape):
    #   x (2, 7, 5) -> MatMul(W (5, 6)) -> (2, 7, 6) -> Reshape: (14, 6) BN(6) one feature per
    #   channel; (14, 3, 2) BN(3) two contiguous features per channel; (14, 2, 3) BN(2) three
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"]),
        helper.make_node("Reshape", ["mm", "shape"], ["r"]),
        bn_node("r", "y"),
    ]
    channels = 6 if len(shape) == 2 else shape[1]
    inits = [init("W", _randn(rng, 5, 6)), init("shape", np.array(shape, np.int64))] + bn_inits(rng, channels)
    model = _model(nodes, [vi("x", [2, 7, 5])], inits)
    check_fold(model, {"x": _randn(rng, 2, 7, 5)}, folded_bns=1)


def test_fold_matmul_3d_reshape_tokens_as_channels_is_refused(rng):
    #   x (2, 7, 5) -> MatMul -> (2, 7, 6) -> Reshape(2, 42) -> BN(42): channel = (token, feature),
    #   so each feature would need 7 different scales
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"]),
        helper.make_node("Reshape", ["mm", "shape"], ["r"]),
        bn_node("r", "y"),
    ]
    inits = [init("W", _randn(rng, 5, 6)), init("shape", np.array([2, 42], np.int64))] + bn_inits(rng, 42)
    model = _model(nodes, [vi("x", [2, 7, 5])], inits)
    _refused(model, "feature 0", "channels 0 and 6", "scale/shift differ")


@st.composite
def _gemm_reshapes(draw):
    m = draw(st.sampled_from([2, 3, 4]))
    features = draw(st.sampled_from([4, 6, 8, 12]))
    total = m * features
    channels = draw(st.sampled_from([d for d in range(1, total + 1) if total % d == 0 and d <= 24]))
    rest = total // channels
    batch = draw(st.sampled_from([d for d in range(1, rest + 1) if rest % d == 0]))
    return m, features, channels, batch, rest // batch, draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(_gemm_reshapes())
def test_fold_gemm_reshape_property(case):
    #   x (M, K) -> Gemm -> (M, F) -> Reshape(B, C, R) -> BN(C): whatever the fold decides, results
    #   never change; when each row of F features holds whole channels (C*R divides F), it folds
    m, features, channels, batch, rest, seed = case
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gemm", ["x", "B"], ["g"]),
        helper.make_node("Reshape", ["g", "shape"], ["r"]),
        bn_node("r", "y"),
    ]
    inits = [init("B", _randn(rng, 5, features)), init("shape", np.array([batch, channels, rest], np.int64))]
    model = _model(nodes, [vi("x", [m, 5])], inits + bn_inits(rng, channels))
    folded, records = fold_batchnorm(model)
    feeds = {"x": _randn(rng, m, 5)}
    np.testing.assert_allclose(ort_run(folded, feeds)[0], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)
    if features % (channels * rest) == 0:  # each row holds whole channels: feature f -> one channel
        assert records[0].folded, records[0].reason


# -- unsorted graphs ----------------------------------------------------------------------------
def test_fold_unsorted_graph_is_sorted(rng):
    #   x -> Conv -> Transpose -> Transpose -> BN -> Relu -> y, nodes listed in reverse
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Transpose", ["c"], ["t1"], perm=[0, 2, 3, 1], name="t1"),
        helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 3, 1, 2], name="t2"),
        bn_node("t2", "n"),
        helper.make_node("Relu", ["n"], ["y"], name="relu"),
    ]
    sorted_model = _model(nodes, [vi("x", [1, 3, 4, 4])], [init("w", _randn(rng, 4, 3, 1, 1))] + bn_inits(rng, 4))
    model = onnx.ModelProto()
    model.CopyFrom(sorted_model)
    model.graph.node.sort(key=lambda n: -[m.name for m in nodes].index(n.name))
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)
    folded, _ = check_fold(model, {"x": _randn(rng, 1, 3, 4, 4)}, folded_bns=1)
    assert [n.name for n in folded.graph.node] == ["conv", "t1", "t2", "relu"]


# -- Shape readers ------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Conv", "MatMul"])
def test_fold_shape_reader_of_the_bn_input_follows_it(rng, op):
    #   x -> Conv / MatMul -> {BN -> y, Shape -> shape}: the Shape reads the renamed tensor
    if op == "Conv":
        linear, w, x_shape = helper.make_node("Conv", ["x", "w"], ["c"]), _randn(rng, 4, 3, 1, 1), [1, 3, 4, 4]
    else:
        linear, w, x_shape = helper.make_node("MatMul", ["x", "w"], ["c"]), _randn(rng, 3, 4), [5, 3]
    nodes = [linear, bn_node("c", "y"), helper.make_node("Shape", ["c"], ["shape"])]
    model = _model(nodes, [vi("x", x_shape)], [init("w", w)] + bn_inits(rng, 4), outputs=("y", "shape"))
    folded, _ = check_fold(model, {"x": _randn(rng, *x_shape)}, folded_bns=1)
    (shape,) = [n for n in folded.graph.node if n.op_type == "Shape"]
    assert shape.input[0] == "y"


def test_fold_into_several_readers_notes_them(rng):
    _, records = fold_batchnorm(_vit_block(rng, "aaa"))
    assert records[0].target == "MatMul#0"
    assert records[0].notes == ("also folded into MatMul 'MatMul#1', MatMul 'MatMul#2'",)
