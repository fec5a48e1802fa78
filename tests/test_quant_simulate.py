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


def _qdq_on(model, tensor: str, lo: float, hi: float):
    """``model`` with a uint8 Q/DQ on ``tensor`` only, built by hand (the oracle)."""
    scale = np.float32((hi - lo) / 255)
    zero = np.uint8(np.round(-lo / float(scale)))
    nodes = []
    for node in model.graph.node:
        copy = helper.make_node(node.op_type, [f"{i}_dq" if i == tensor else i for i in node.input], list(node.output))
        copy.attribute.extend(node.attribute)
        nodes.append(copy)
        if tensor in node.output:
            nodes.append(helper.make_node("QuantizeLinear", [tensor, "s", "z"], [f"{tensor}_q"]))
            nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}_q", "s", "z"], [f"{tensor}_dq"]))
    inits = [*model.graph.initializer, init("s", scale), init("z", zero)]
    return make_model(nodes, list(model.graph.input), list(model.graph.output), inits, opset=13)


def test_units_rank_tensors_by_their_output_damage_alone_like_hand_built_qdq_graphs():
    """x -> Conv(w1) -> h -> Relu -> r -> Conv(w2) -> y: h's channels span 1 and 300 (a folded BN's imbalance),
    r keeps Relu's share; the order must match hand-built single-tensor QDQ graphs run by onnxruntime."""
    from bnscope.workflows.quantize import _units

    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((2, 3, 1, 1)).astype(np.float32) * np.array([1.0, 300.0], np.float32)[:, None, None, None]
    w2 = (rng.standard_normal((2, 2, 1, 1)) * np.array([1.0, 1 / 300])[None, :, None, None]).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 2, 4, 4])], [init("w1", w1), init("w2", w2)], 13)
    feed = {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    reference = ort_run(model, feed)
    ranges = {"h": (-900.0, 900.0), "r": (0.0, 40.0)}
    sim = Simulator(model, ranges, ["h", "r"], [feed], [reference], per_channel=True)
    weights = {"w1": w1, "w2": w2}
    scales = {k: np.abs(w).reshape(2, -1).max(axis=1) / 127 for k, w in weights.items()}
    quantised = make_model(
        nodes,
        [vi("x", [1, 3, 4, 4])],
        [vi("y", [1, 2, 4, 4])],
        [
            init(k, (np.round(w / scales[k][:, None, None, None]) * scales[k][:, None, None, None]).astype(np.float32))
            for k, w in weights.items()
        ],
        13,
    )
    oracle = {t: _sqnr(reference[0], ort_run(_qdq_on(quantised, t, *ranges[t]), feed)[0]) for t in ranges}
    assert oracle["h"] != pytest.approx(oracle["r"], abs=0.5)
    assert _units(sim, ("r", "h"), lambda text: None) == [(t,) for t in sorted(oracle, key=oracle.get)]
