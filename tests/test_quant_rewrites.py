"""Exact rewrites before quantisation: cross-layer equalisation keeps the float outputs, never touches
a padded conv's bias, and refuses activations that are not positively homogeneous; the chains and
knees the risk report reads; the opset/Constant preparation.

Graphs (drawn)::

    x -> Conv1(3->C, pad 1) -> [act] -> Conv2(depthwise C, pad 1, bias) -> y
    x -> Conv1(group 1) -> Relu -> Conv2(C->4, group 1) -> y
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import init, make_model, ort_run, vi
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from bnscope.onnxio.graph import GraphView
from bnscope.quant.chains import follow_chain, run_chain
from bnscope.quant.equalize import equalize
from bnscope.quant.prepare import prepare_for_quantization


def _pair_model(rng, act: str | None, depthwise: bool, c: int = 6, scales=None):
    scales = np.ones(c) if scales is None else np.asarray(scales)
    w1 = (rng.standard_normal((c, 3, 3, 3)) * scales[:, None, None, None]).astype(np.float32)
    b1 = (rng.standard_normal(c) * scales).astype(np.float32)
    w2 = rng.standard_normal((c, 1, 3, 3) if depthwise else (4, c, 3, 3)).astype(np.float32)
    b2 = rng.standard_normal(w2.shape[0]).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1])]
    mid = "h"
    inits = [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2)]
    if act == "PRelu":
        inits.append(init("slope", (np.abs(rng.standard_normal((c, 1, 1))) * 0.2).astype(np.float32)))
        nodes.append(helper.make_node("PRelu", ["h", "slope"], ["a"]))
        mid = "a"
    elif act == "Clip6":
        inits += [init("lo", np.array(0, np.float32)), init("hi", np.array(6, np.float32))]
        nodes.append(helper.make_node("Clip", ["h", "lo", "hi"], ["a"]))
        mid = "a"
    elif act is not None:
        nodes.append(helper.make_node(act, ["h"], ["a"]))
        mid = "a"
    group = {"group": c} if depthwise else {}
    nodes.append(helper.make_node("Conv", [mid, "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1], **group))
    return make_model(nodes, [vi("x", [2, 3, 8, 8])], [vi("y", None)], inits, opset=17)


def _weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("act", [None, "Relu", "LeakyRelu", "PRelu", "Identity"])
@pytest.mark.parametrize("depthwise", [False, True])
def test_equalize_keeps_float_outputs(act, depthwise):
    rng = np.random.default_rng(3)
    model = _pair_model(rng, act, depthwise, scales=[0.01, 1, 30, 5, 0.2, 100])
    feeds = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    equalized, pairs = equalize(model)
    assert [(p.first, p.second, p.depthwise) for p in pairs] == [("conv1", "conv2", depthwise)]
    before, after = ort_run(model, feeds)[0], ort_run(equalized, feeds)[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    w = _weights(equalized)
    r1 = np.abs(w["w1"]).reshape(6, -1).max(axis=1)
    r2 = np.abs(w["w2"]).reshape(6, -1).max(axis=1) if depthwise else np.abs(w["w2"]).max(axis=(0, 2, 3))
    np.testing.assert_allclose(r1, r2, rtol=1e-5)  # each channel's range is shared equally


def test_equalize_never_absorbs_bias_into_a_padded_depthwise_conv():
    """AIMET's high-bias absorption moves a constant into the next conv's bias; across zero padding the
    border pixels do not carry it. bnscope's equalisation must leave that bias exactly as it was."""
    rng = np.random.default_rng(5)
    model = _pair_model(rng, "Relu", depthwise=True, scales=[50, 1, 1, 1, 1, 0.02])
    equalized, pairs = equalize(model)
    assert pairs
    np.testing.assert_array_equal(_weights(equalized)["b2"], _weights(model)["b2"])
    feeds = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32) + 3.0}  # a large mean: borders differ
    before, after = ort_run(model, feeds)[0], ort_run(equalized, feeds)[0]
    border = np.zeros(before.shape, bool)
    border[..., 0, :] = border[..., -1, :] = border[..., :, 0] = border[..., :, -1] = True
    np.testing.assert_allclose(after[border], before[border], rtol=1e-4, atol=1e-4 * np.abs(before).max())


@pytest.mark.parametrize("act", ["HardSwish", "Clip6", "Sigmoid"])
def test_equalize_refuses_activations_scaling_does_not_pass(act):
    model = _pair_model(np.random.default_rng(0), act, depthwise=True)
    equalized, pairs = equalize(model)
    assert pairs == []
    assert _weights(equalized)["w1"].tobytes() == _weights(model)["w1"].tobytes()


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=6, max_size=6), st.booleans())
def test_equalize_exact_for_any_channel_scales(scales, depthwise):
    rng = np.random.default_rng(11)
    model = _pair_model(rng, "Relu", depthwise, scales=scales)
    feeds = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    before, after = ort_run(model, feeds)[0], ort_run(equalize(model)[0], feeds)[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * max(np.abs(before).max(), 1e-6))


def _hardswish_model(rng, c: int = 4):
    """Paddle's HardSwish after a Conv: y * Clip(y + 3, 0, 6) / 6."""
    inits = [
        init("w", rng.standard_normal((c, 3, 1, 1)).astype(np.float32) * 4),
        init("three", np.array(3, np.float32)),
        init("six", np.array(6, np.float32)),
        init("zero", np.array(0, np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
        helper.make_node("Add", ["y", "three"], ["p"]),
        helper.make_node("Clip", ["p", "zero", "six"], ["c"]),
        helper.make_node("Mul", ["y", "c"], ["m"]),
        helper.make_node("Div", ["m", "six"], ["out"]),
    ]
    return make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("out", None)], inits, opset=17)


def test_chain_follows_paddle_hardswish_and_finds_its_knee():
    rng = np.random.default_rng(2)
    model = _hardswish_model(rng)
    chain = follow_chain(GraphView(model), "y")
    assert chain.tensors == ("y", "p", "c", "m", "out")
    assert chain.knee == (-3.0, 3.0)
    x = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    y = np.einsum("oi,nihw->nohw", numpy_helper.to_array(model.graph.initializer[0])[:, :, 0, 0], x)
    np.testing.assert_allclose(run_chain(GraphView(model), chain, y), ort_run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_chain_knee_of_hardsigmoid_after_a_scalar_affine():
    inits = [init("two", np.array(2, np.float32)), init("one", np.array(1, np.float32))]
    nodes = [
        helper.make_node("Mul", ["y", "two"], ["a"]),
        helper.make_node("Add", ["a", "one"], ["b"]),
        helper.make_node("HardSigmoid", ["b"], ["out"], alpha=0.25, beta=0.5),
    ]
    model = make_model(nodes, [vi("y", [1, 2, 3, 3])], [vi("out", None)], inits)
    # HardSigmoid bends over b in [-2, 2], i.e. y in [(-2 - 1) / 2, (2 - 1) / 2]
    assert follow_chain(GraphView(model), "y").knee == (-1.5, 0.5)


def test_prepare_moves_constant_weights_and_converts_opset():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((2, 3, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("Conv", ["x", "w"], ["y"]),
        helper.make_node("Clip", ["y"], ["z"], min=0.0, max=6.0),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("z", None)], opset=10)
    prepared = prepare_for_quantization(model)
    assert [n.op_type for n in prepared.graph.node] == ["Conv", "Clip"]
    assert {i.version for i in prepared.opset_import if i.domain in ("", "ai.onnx")} == {13}
    onnx.checker.check_model(prepared, full_check=True)
    x = {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32) * 5}
    np.testing.assert_allclose(ort_run(prepared, x)[0], ort_run(model, x)[0], rtol=1e-6)


def test_prepare_takes_weights_listed_as_inputs_out_of_the_inputs():
    """Old exporters list initializers as graph inputs: onnxruntime would quantise them as activations."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((2, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"])]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4]), vi("w", [2, 3, 1, 1])], [vi("y", None)], [init("w", w)], opset=13)
    prepared = prepare_for_quantization(model)
    assert [i.name for i in prepared.graph.input] == ["x"]
    x = {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(prepared, x)[0], ort_run(model, x)[0], rtol=1e-6)
