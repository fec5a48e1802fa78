"""The switchable-Q/DQ simulator against hand-built QDQ graphs run by onnxruntime (optimisations off).

x -> Conv(w) -> h -> Relu -> y        (h switchable)
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import init, make_model, ort_run, vi
from onnx import helper

from bnscope.quant.simulate import Simulator


def _model(w):
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    return make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 2, 4, 4])], [init("w", w)], opset=13)


def _sqnr(ref, got):
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return 10 * np.log10((ref**2).sum() / ((ref - got) ** 2).sum())


def test_simulator_matches_hand_built_qdq_graphs():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((2, 3, 1, 1)).astype(np.float32) * np.array([1.0, 40.0], np.float32)[:, None, None, None]
    model = _model(w)
    feed = {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    reference = ort_run(model, feed)
    lo, hi = -60.0, 70.0
    sim = Simulator(model, {"h": (lo, hi)}, ["h"], [feed], [reference], per_channel=True)
    # the oracle's int8 weights: symmetric per output channel, by hand
    scales = np.abs(w).reshape(2, -1).max(axis=1) / 127
    wq = (np.round(w / scales[:, None, None, None]) * scales[:, None, None, None]).astype(np.float32)
    assert sim.sqnr_db(set()) == pytest.approx(
        _sqnr(reference[0], ort_run(_model(wq), feed)[0]), abs=1e-3
    )  # float32 summation order differs between sessions
    scale = np.float32((hi - lo) / 255)
    zero = np.uint8(np.round(-lo / float(scale)))
    qdq = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["h"]),
            helper.make_node("QuantizeLinear", ["h", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
            helper.make_node("Relu", ["d"], ["y"]),
        ],
        [vi("x", [1, 3, 4, 4])],
        [vi("y", [1, 2, 4, 4])],
        [init("w", wq), init("s", scale), init("z", zero)],
        opset=13,
    )
    assert sim.sqnr_db({"h"}) == pytest.approx(
        _sqnr(reference[0], ort_run(qdq, feed)[0]), abs=1e-3
    )  # float32 summation order differs between sessions
    assert sim.sqnr_db({"h"}) < sim.sqnr_db(set())
