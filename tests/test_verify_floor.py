"""Fold verification judged against the original's own float floor (issue 18), non-finite outputs
and dead layers (issue 19).

Oracles: float64 numpy for the folded weights and for the premises (what a fixed 1e-4 tolerance
would have said), ``np.spacing`` for the one-ulp nudge, onnxruntime ORT_DISABLE_ALL for outputs.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import bn_arrays, bn_node, init, make_model, ort_run, vi
from helpers import cli
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from bnscope.numerics.compare import FLOOR_MULTIPLE, floor_ratio, nudge
from bnscope.onnxio.model_io import load_model
from bnscope.runtime.floor import judge_outputs, measure_floor
from bnscope.workflows.check.config import CheckConfig
from bnscope.workflows.check.rules import check_model
from bnscope.workflows.options import FoldSettings
from bnscope.workflows.verify import verify_fold


def conv_bn(rng, eps: float = 1e-5, params: dict | None = None):
    """x[N,3,8,8] -> Conv(W, 3x3, pad 1) -> BN -> Relu -> y; returns the model and its arrays."""
    p = params or bn_arrays(rng, 8)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        bn_node("c", "b", epsilon=eps, name="bn"),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    inits = [init("W", w)] + [init(f"bn_{k}", v) for k, v in p.items()]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 8, 8, 8])], inits), w, p


def hand_folded(w, p, eps: float, scale_error: float = 0.0):
    """The fold computed here in float64 (W' = W g / sqrt(v + e), b' = beta - m g / sqrt(v + e)),
    rounded once; ``scale_error`` makes it wrong by that relative amount."""
    s = p["scale"].astype(np.float64) / np.sqrt(p["var"].astype(np.float64) + eps) * (1 + scale_error)
    w2 = (w.astype(np.float64) * s[:, None, None, None]).astype(np.float32)
    b2 = (p["B"].astype(np.float64) - p["mean"].astype(np.float64) * s).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 8, 8, 8])], [init("W", w2), init("b", b2)])


def cancelling(rng):
    """An amplifying network: big activations, then the difference of two nearly equal products.

    x[N,16] -> MatMul W1 -> BN(gamma 1e3) -> z; y = z @ Wa - z @ Wb with Wb = Wa + 1e-5 noise.
    |z @ Wa| ~ 1e4 while |y| ~ 1, so float32 rounding alone moves y by ~1e-3 (above a fixed 1e-4).
    """
    p = bn_arrays(rng, 64)
    p["scale"] = (1e3 * (1 + np.abs(p["scale"]))).astype(np.float32)
    p["var"] = (16 * p["var"]).astype(np.float32)
    wa = rng.standard_normal((64, 4)).astype(np.float32)
    wb = (wa + 1e-5 * rng.standard_normal((64, 4))).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        bn_node("h", "z", name="bn"),
        helper.make_node("MatMul", ["z", "Wa"], ["za"]),
        helper.make_node("MatMul", ["z", "Wb"], ["zb"]),
        helper.make_node("Sub", ["za", "zb"], ["y"]),
    ]
    w1 = rng.standard_normal((16, 64)).astype(np.float32)
    inits = [init("W1", w1), init("Wa", wa), init("Wb", wb)] + [init(f"bn_{k}", v) for k, v in p.items()]
    return make_model(nodes, [vi("x", ["N", 16])], [vi("y", ["N", 4])], inits)


def _verify(tmp_path, original, candidate, **settings):
    onnx.save(original, tmp_path / "original.onnx")
    onnx.save(candidate, tmp_path / "candidate.onnx")
    fold = FoldSettings(output=None, dry_run=True, **settings)
    return verify_fold(load_model(tmp_path / "original.onnx"), tmp_path / "candidate.onnx", fold)[0]


def test_verify_fold_passes_a_correct_fold_and_fails_one_wrong_by_1e_5(tmp_path, rng):
    model, w, p = conv_bn(rng)
    right = _verify(tmp_path, model, hand_folded(w, p, 1e-5))
    wrong_model = hand_folded(w, p, 1e-5, scale_error=1e-5)
    wrong = _verify(tmp_path, model, wrong_model)
    # premise: a fixed atol = rtol = 1e-4 cannot tell the wrong fold from the original
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    assert np.allclose(ort_run(wrong_model, {"x": x})[0], ort_run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)
    assert right.passed and right.outputs[0].judged_by == "floor"
    assert right.outputs[0].ratio <= FLOOR_MULTIPLE
    assert not wrong.passed
    assert wrong.outputs[0].ratio > FLOOR_MULTIPLE and "float floor" in wrong.outputs[0].reason


def test_verify_fold_explicit_atol_judges_instead_of_the_floor(tmp_path, rng):
    model, w, p = conv_bn(rng)
    wrong = _verify(tmp_path, model, hand_folded(w, p, 1e-5, scale_error=1e-5), atol=1e-3, rtol=1e-3)
    assert wrong.passed and wrong.outputs[0].judged_by == "tolerance"
    assert wrong.outputs[0].ratio > FLOOR_MULTIPLE  # still reported


def test_fold_cli_passes_a_correct_fold_of_an_amplifying_network(tmp_path):
    model = cancelling(np.random.default_rng(3))
    onnx.save(model, tmp_path / "m.onnx")
    result = cli("fold", tmp_path / "m.onnx", "-o", tmp_path / "f.onnx", "--format", "json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)["verification"]["outputs"][0]
    # premise: the fold differs by more than a fixed atol 1e-4 + rtol 1e-4 allows
    x = np.random.default_rng(9).standard_normal((32, 16)).astype(np.float32)
    got, ref = ort_run(onnx.load(tmp_path / "f.onnx"), {"x": x})[0], ort_run(model, {"x": x})[0]
    assert not np.allclose(got, ref, rtol=1e-4, atol=1e-4)
    # and it is right: no further from the float64 truth than the original itself
    truth = _cancelling_float64(model, x)
    assert np.abs(got - truth).max() <= 10 * np.abs(ref - truth).max()
    assert out["judged_by"] == "floor" and out["ratio"] <= FLOOR_MULTIPLE
    assert out["ratio"] == pytest.approx(out["max_abs"] / out["floor"])


def _cancelling_float64(model, x):
    a = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    h = x.astype(np.float64) @ a["W1"]
    z = (h - a["bn_mean"]) / np.sqrt(a["bn_var"] + 1e-5) * a["bn_scale"] + a["bn_B"]
    return z @ a["Wa"] - z @ a["Wb"]


def test_fold_cli_explicit_atol_keeps_its_meaning(tmp_path):
    onnx.save(cancelling(np.random.default_rng(3)), tmp_path / "m.onnx")
    result = cli("fold", tmp_path / "m.onnx", "-o", tmp_path / "f.onnx", "--atol", "1e-6", "--rtol", "0")
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "f.onnx").exists()
    assert "atol 1e-06, rtol 0" in result.stdout


def test_fold_markdown_and_json_carry_floor_difference_and_ratio(tmp_path, rng):
    model, _, _ = conv_bn(rng)
    onnx.save(model, tmp_path / "m.onnx")
    data = json.loads(cli("fold", tmp_path / "m.onnx", "--dry-run", "--format", "json").stdout)["verification"]
    out = data["outputs"][0]
    assert out["floor"] > 0 and out["ratio"] == pytest.approx(out["max_abs"] / out["floor"])
    assert data["floor"]["seeds"] >= 2 and data["floor"]["seconds"] > 0
    assert "random" in data["note"] and "--data" in data["note"]
    md = cli("fold", tmp_path / "m.onnx", "--dry-run", "--format", "markdown").stdout
    assert "| output | max abs | floor | x floor |" in md
    assert f"{out['floor']:.3g}" in md and "poor witness" in md


def test_fold_with_data_has_no_random_witness_note(tmp_path, rng):
    model, _, _ = conv_bn(rng)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    result = cli("fold", tmp_path / "m.onnx", "--dry-run", "--data", tmp_path / "d.npz", "--format", "json")
    assert json.loads(result.stdout)["verification"]["note"] is None


@pytest.mark.parametrize(
    "case",
    [
        {"eps": 0.0, "var": (1, 0.0)},  # var + eps = 0: inf/NaN
        {"eps": -1.0, "var": (slice(None), 0.5)},  # var + eps < 0: NaN
        {"eps": 1e-5, "var": (2, np.nan)},
    ],
    ids=["eps0_var0", "eps_negative", "var_nan"],
)
def test_fold_never_passes_when_the_outputs_are_not_finite(tmp_path, rng, case):
    p = bn_arrays(rng, 8)
    p["var"][case["var"][0]] = case["var"][1]
    model, _, _ = conv_bn(rng, eps=case["eps"], params=p)
    assert not np.isfinite(ort_run(model, {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)})[0]).all()
    onnx.save(model, tmp_path / "m.onnx")
    result = cli("fold", tmp_path / "m.onnx", "-o", tmp_path / "f.onnx", "--atol", "1e9")
    assert result.exit_code == 1, result.output
    assert "NaN/inf" in result.stdout and "verification failed" in result.stdout
    assert not (tmp_path / "f.onnx").exists()


def test_judge_fails_nonfinite_where_the_original_is_finite():
    ref = [{"y": np.array([1.0, 2.0], np.float32)}]
    got = [{"y": np.array([1.0, np.inf], np.float32)}]
    for atol in (None, 1e30):
        (d,) = judge_outputs(got, ref, {"y": 1e-6}, atol=atol)
        assert not d.passed and "where the original's are finite" in d.reason


def test_check_fold_rule_uses_the_floor_judgement(tmp_path):
    onnx.save(cancelling(np.random.default_rng(3)), tmp_path / "m.onnx")
    result = cli("check", tmp_path / "m.onnx", "--enable", "fold_verified", "--format", "json")
    assert result.exit_code == 0, result.output
    (rule,) = [r for r in json.loads(result.stdout)["results"] if r["rule"] == "fold_verified"]
    assert rule["passed"] and "x the original's float floor" in rule["message"], rule


def test_check_fails_a_layer_stats_calls_dead(tmp_path, rng):
    """Conv with zero weights: the BN's input is constant, its running mean 0 and var 0, so |d| = 0
    and log r = 0, and stats calls the layer dead; check passed it."""
    p = bn_arrays(rng, 8)
    p["mean"][:], p["var"][:] = 0.0, 0.0
    model, _, _ = conv_bn(rng, params=p)
    model.graph.initializer[0].CopyFrom(init("W", np.zeros((8, 3, 3, 3), np.float32)))
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    stats = json.loads(cli("stats", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--format", "json").stdout)
    assert stats["layers"][0]["verdict"] == "dead"
    result = cli("check", tmp_path / "m.onnx", "--data", tmp_path / "d.npz")
    assert result.exit_code == 1, result.output
    assert "verdict dead" in result.stdout


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32), min_size=1, max_size=50),
    st.integers(0, 2**32 - 1),
)
def test_nudge_moves_every_element_by_at_most_one_ulp(values, seed):
    w = np.array(values, np.float32)
    moved = nudge(w, np.random.default_rng(seed))
    assert moved.dtype == np.float32
    step = np.abs(moved.astype(np.float64) - w.astype(np.float64))
    ulp_below = np.abs(w).astype(np.float64) - np.nextafter(np.abs(w), np.float32(0)).astype(np.float64)
    one_ulp = (step == np.spacing(np.abs(w)).astype(np.float64)) | (step == ulp_below)
    assert np.all(one_ulp[w != 0]) and np.all(moved[w == 0] == 0)


@given(st.floats(0, 1e6), st.floats(0, 1e6), st.floats(0, 1e6))
def test_floor_ratio_is_at_least_one_ulp_of_the_output(diff, floor, ref_max):
    eps = float(np.finfo(np.float32).eps)
    used, ratio = floor_ratio(diff, floor, ref_max, eps)
    assert used == max(floor, eps * ref_max)
    if diff == 0:
        assert ratio == 0
    elif used > 0:
        assert ratio == pytest.approx(diff / used)
    else:
        assert ratio == float("inf")


def test_verify_fold_floor_ignores_weights_stored_coarser_than_the_outputs(tmp_path, rng):
    """conv's weight is an fp16 Constant Cast to float32 (as in sample_models/weights_as_constants):
    one fp16 ulp is 8192 float32 ulps, and a floor from it let a fold wrong by 1e-5 pass."""
    model, w, p = conv_bn(rng)
    w16 = w.astype(np.float16)
    model.graph.initializer.remove(model.graph.initializer[0])
    cast = [
        helper.make_node("Constant", [], ["W16"], value=onnx.numpy_helper.from_array(w16, "W16")),
        helper.make_node("Cast", ["W16"], ["W"], to=onnx.TensorProto.FLOAT),
    ]
    for i, node in enumerate(cast):
        model.graph.node.insert(i, node)
    w32 = w16.astype(np.float32)
    assert _verify(tmp_path, model, hand_folded(w32, p, 1e-5)).passed
    wrong = _verify(tmp_path, model, hand_folded(w32, p, 1e-5, scale_error=1e-5))
    assert not wrong.passed and wrong.outputs[0].ratio > FLOOR_MULTIPLE


def test_check_fold_rule_verifies_on_the_data_given(tmp_path, rng):
    model, _, _ = conv_bn(rng)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    result = check_model(tmp_path / "m.onnx", CheckConfig(rules={"fold_verified": True}), data=tmp_path / "d.npz")
    verification = result.fold.verification[0]
    assert "d.npz" in verification.data and verification.note is None
    assert result.passed


@pytest.mark.parametrize("gain", [1.0, 4.0, 2.0**20])
def test_measure_floor_of_a_scaling_is_exactly_one_ulp_times_the_gain(rng, gain):
    """y = x * W with x = gain, a power of two: every product is exact, so a weight nudged by one
    ulp moves its output by exactly gain * spacing(w) (W in [1.1, 1.9): the ulp is the same both
    ways), and the floor is gain * max spacing(W)."""
    w = rng.uniform(1.1, 1.9, size=(4, 6)).astype(np.float32)
    model = make_model(
        [helper.make_node("Mul", ["x", "W"], ["y"])], [vi("x", ["N", 4, 6])], [vi("y", ["N", 4, 6])], [init("W", w)]
    )
    batches = [{"x": np.full((2, 4, 6), gain, np.float32)} for _ in range(4)]
    expected = [{"y": ort_run(model, b)[0]} for b in batches]
    floor = measure_floor(model.SerializeToString(), {"W": w}, batches, expected)
    assert floor["y"] == gain * float(np.spacing(w).max())


def test_judge_on_another_provider_also_accepts_the_default_tolerance():
    """The floor is measured on the CPU; a GPU's kernels round differently, so there an output within
    the dtype's default tolerance (1e-4 for float32) passes too; on the CPU only the floor judges."""
    ref = [{"y": np.array([1.0, 2.0, 3.0], np.float32)}]
    got = [{"y": np.array([1.0, 2.0 + 5e-5, 3.0], np.float32)}]
    (cpu,) = judge_outputs(got, ref, {"y": 1e-6})
    (gpu,) = judge_outputs(got, ref, {"y": 1e-6}, other_kernels=True)
    assert not cpu.passed and cpu.judged_by == "floor"
    assert gpu.passed and gpu.judged_by == "tolerance" and gpu.ratio == cpu.ratio
    far = [{"y": np.array([1.0, 2.01, 3.0], np.float32)}]
    assert not judge_outputs(far, ref, {"y": 1e-6}, other_kernels=True)[0].passed
