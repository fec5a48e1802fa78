"""Quantisation arithmetic against onnx.reference's QuantizeLinear/DequantizeLinear, rank correlation
against Pearson on hand-computed ranks, and the plan search against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import init, make_model, ref_run, vi
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from bnscope.numerics import quantmath as qm
from bnscope.quant.plan import search, tensors_of


@settings(max_examples=30, deadline=None)
@given(st.floats(-50, 0), st.floats(0.01, 500), st.integers(0, 2**31 - 1))
def test_fake_quant_matches_onnx_qdq(lo, hi, seed):
    rng = np.random.default_rng(seed)
    x = (rng.uniform(lo, hi, 64)).astype(np.float32)
    scale = np.float32(qm.activation_scale(lo, hi))
    zero = np.uint8(np.round(-lo / float(scale)))
    model = make_model(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        [vi("x", [64])],
        [vi("y", [64])],
        [init("s", scale), init("z", zero)],
        opset=21,
    )
    expected = ref_run(model, {"x": x})[0]
    np.testing.assert_allclose(qm.fake_quant_activation(x, lo, hi), expected, rtol=1e-5, atol=float(scale) * 1e-3)


def test_weight_sqnr_per_channel_beats_per_tensor_on_unbalanced_channels():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)) * np.array([1e-3, 1, 1, 1, 1, 1, 1, 300])[:, None, None, None]
    per_tensor, per_channel = qm.weight_sqnr_db(w, False), qm.weight_sqnr_db(w, True)
    # independent: symmetric int8 by hand, channel by channel
    scales = np.abs(w).reshape(8, -1).max(axis=1) / 127
    q = np.round(w / scales[:, None, None, None]) * scales[:, None, None, None]
    assert per_channel == pytest.approx(10 * np.log10((w**2).sum() / ((w - q) ** 2).sum()))
    assert per_channel > per_tensor


def test_bias_overflow_counts_channels_past_int32():
    assert qm.bias_overflows(np.array([1.0, 3e5, -3e5]), 1e-3, np.array([1e-4, 1e-4, 1.0])) == 1


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=30, unique=True), st.integers(0, 1000))
def test_spearman_is_pearson_of_ranks(values, seed):
    a = np.array(values)
    b = np.random.default_rng(seed).standard_normal(len(a)) + 0.5 * a  # continuous: no ties
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731 (tie-free: unique values)
    assert qm.spearman(a, b) == pytest.approx(np.corrcoef(ranks(a), ranks(b))[0, 1], abs=1e-9)


def test_spearman_gives_average_ranks_to_ties():
    assert qm.rank(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 5), min_size=1, max_size=40), st.floats(0, 60))
def test_search_finds_the_smallest_prefix_for_a_monotone_measure(gains, target):
    units = [(f"t{i}",) for i in range(len(gains))]
    measure_calls = []

    def measure(tensors):
        measure_calls.append(len(tensors))
        return float(sum(gains[: len(tensors)]))  # monotone in the number of 16-bit units

    found = search(units, measure, target)
    brute = next((n for n in range(len(units) + 1) if sum(gains[:n]) >= target), None)
    assert found.reached == (brute is not None)
    if brute is not None:
        assert found.chosen == brute
    assert len(measure_calls) <= 2 * (int(np.log2(len(units) + 1)) + 2)


def test_tensors_of_counts_shared_tensors_once():
    assert tensors_of([("a", "b"), ("b", "c"), ("d",)], 2) == ["a", "b", "c"]


def test_weight_sqnr_handles_all_zero_channels():
    w = np.zeros((2, 3, 1, 1))
    w[1] = 1.0
    assert np.isinf(qm.weight_sqnr_db(w, True))
