"""Ranges cut at HardSwish's knee: found only where every reader is one HardSwish, exact there, and
written through onnxruntime's TensorQuantOverrides.

    x -> Conv(w, b) -> y -> Add(y, 3) -> a -> Clip(a, 0, 6) -> c -> Mul(y, c) -> m -> Div(m, 6) -> out
                       (variants: y also read by Relu; Clip's low bound 1; the ONNX HardSwish op)
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import init, make_model, ref_run, vi
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from bnscope.quant.knee import knee_ranges
from bnscope.quant.ort_quant import Quantizer


def _model(variant: str = "paddle", w=None) -> onnx.ModelProto:
    w = np.full((2, 1, 1, 1), 40.0, np.float32) if w is None else w
    inits = [init("w", w), init("b", np.array([-20.0, 5.0], np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"])]
    outputs = [vi("out", [1, 2, 4, 4])]
    if variant == "native":
        nodes.append(helper.make_node("HardSwish", ["y"], ["out"]))
    else:
        low = 1.0 if variant == "clip_low_1" else 0.0
        inits += [init(n, np.float32(v)) for n, v in (("three", 3), ("low", low), ("six", 6))]
        nodes += [
            helper.make_node("Add", ["y", "three"], ["a"]),
            helper.make_node("Clip", ["a", "low", "six"], ["c"]),
            helper.make_node("Mul", ["y", "c"], ["m"]),
            helper.make_node("Div", ["m", "six"], ["out"]),
        ]
        if variant == "second_reader":
            nodes.append(helper.make_node("Relu", ["y"], ["r"]))
            outputs.append(vi("r", [1, 2, 4, 4]))
    return make_model(nodes, [vi("x", [1, 1, 4, 4])], outputs, inits, opset=14)


@pytest.mark.parametrize(
    ("variant", "cut"), [("paddle", True), ("native", True), ("second_reader", False), ("clip_low_1", False)]
)
def test_knee_cut_only_where_every_reader_is_one_hardswish(variant, cut):
    got = knee_ranges(_model(variant), {"y": (-50.0, 40.0), "x": (-1.0, 1.0)})
    assert got == ({"y": (-3.0, 40.0)} if cut else {})


def test_knee_range_already_inside_is_left_alone():
    assert knee_ranges(_model(), {"y": (-2.0, 40.0)}) == {}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-500, 500, width=32), min_size=32, max_size=32))
def test_values_below_the_knee_give_the_same_output_as_the_knee(values):
    """onnx.reference as the oracle: the detected pattern's output is unchanged when y is clamped at the knee
    (the identity Conv passes x through as y)."""
    model = _model(w=np.ones((2, 1, 1, 1), np.float32))
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros(2, np.float32), "b"))
    ((lo, _),) = knee_ranges(model, {"y": (-500.0, 500.0)}).values()
    x = np.array(values, np.float32).reshape(1, 1, 4, 8)[..., :4]
    raw = ref_run(model, {"x": x})[0]
    clamped = ref_run(model, {"x": np.maximum(x, np.float32(lo))})[0]
    np.testing.assert_array_equal(raw, clamped)


def test_quantizer_writes_the_cut_range_into_the_qdq_model(tmp_path):
    model = _model()
    path = tmp_path / "float.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.uniform(-1, 1, (1, 1, 4, 4)).astype(np.float32)} for _ in range(3)]
    hi = 50.0  # any range: the override replaces what onnxruntime calibrated
    out = Quantizer(path, feeds, tmp_path).quantize(tmp_path / "q.onnx", ranges={"y": (-3.0, hi)})
    q = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    (node,) = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "y"]
    scale, zero = float(inits[node.input[1]]), int(inits[node.input[2]])
    assert scale == pytest.approx((hi + 3.0) / 255, rel=1e-5)
    assert zero == round(3.0 / scale)
