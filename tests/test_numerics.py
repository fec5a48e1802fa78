"""Tests for bnscope.numerics: moments, fold maths, drift, health, error metrics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from bnscope import numerics as nm
from bnscope.numerics import Moments

FAST = settings(max_examples=50, deadline=None)
SLOW = settings(max_examples=25, deadline=None)


def _bn(x, scale, shift, axis=1):
    """float64 BN in its folded form ``scale * x + shift`` along ``axis``."""
    shape = [1] * x.ndim
    shape[axis] = -1
    return x * scale.reshape(shape) + shift.reshape(shape)


def _random_bn(rng, c):
    gamma, beta, mean = rng.standard_normal((3, c))
    var = np.abs(rng.standard_normal(c)) + 0.1
    return nm.bn_scale_shift(gamma, beta, mean, var, 1e-5)


def _assert_moments_close(got: Moments, want: Moments, scale: float):
    assert got.count == want.count
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(got.m2, want.m2, rtol=1e-12, atol=1e-12 * want.count * scale**2)


# --- moments ---------------------------------------------------------------------------

data_2d = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 40), st.integers(1, 4)),
    elements=st.floats(-1e4, 1e4, allow_nan=False),
)


@FAST
@given(data_2d, st.lists(st.integers(0, 40), max_size=4))
def test_merge_any_split_equals_numpy_on_the_whole(x, cuts):
    pieces = np.split(x, sorted({c % (x.shape[0] + 1) for c in cuts}))
    parts = [Moments.from_array(p, channel_axis=1) for p in pieces]
    scale = max(1.0, float(np.abs(x).max()))
    mean = x.mean(axis=0)  # the oracle: numpy's two-pass float64 moments of the whole, not Moments.from_array
    want = Moments(x.shape[0], mean, ((x - mean) ** 2).sum(axis=0))
    _assert_moments_close(nm.merge_all(parts), want, scale)
    running = Moments.empty(x.shape[1])
    for p in parts:
        running = running.merge(p)
    _assert_moments_close(running, want, scale)


@FAST
@given(data_2d, data_2d, data_2d)
def test_merge_commutative_and_associative(x, y, z):
    c = min(x.shape[1], y.shape[1], z.shape[1])
    a, b, d = (Moments.from_array(t[:, :c]) for t in (x, y, z))
    scale = max(1.0, *(float(np.abs(t).max()) for t in (x, y, z)))
    _assert_moments_close(a.merge(b), b.merge(a), scale)
    _assert_moments_close(a.merge(b).merge(d), a.merge(b.merge(d)), scale)


def test_moments_variance_ddof_and_empty():
    m = Moments.from_array(np.array([[1.0], [3.0]]))
    np.testing.assert_allclose(m.variance(), [1.0])
    np.testing.assert_allclose(m.variance(ddof=1), [2.0])
    assert np.isnan(Moments.from_array(np.array([[1.0]])).variance(ddof=1)).all()
    assert np.isnan(Moments.empty(3).variance()).all()
    assert Moments.empty(2).merge(Moments.empty(2)).count == 0


def test_moments_merge_with_empty_is_identity():
    m = Moments.from_array(np.arange(12.0).reshape(2, 3, 2), channel_axis=1)
    for got in (m.merge(Moments.empty(3)), Moments.empty(3).merge(m)):
        np.testing.assert_array_equal(got.mean, m.mean)
        np.testing.assert_array_equal(got.m2, m.m2)
        assert got.count == 4


def test_moments_merge_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="channels"):
        Moments.empty(2).merge(Moments.empty(3))


def test_merge_all_empty_needs_channels():
    assert nm.merge_all([], channels=3).channels == 3
    with pytest.raises(ValueError):
        nm.merge_all([])


def test_moments_dict_round_trip():
    m = Moments.from_array(np.random.default_rng(0).standard_normal((5, 3, 2)))
    back = Moments.from_dict(m.to_dict())
    assert isinstance(m.to_dict()["mean"], list)
    np.testing.assert_array_equal(back.mean, m.mean)
    np.testing.assert_array_equal(back.m2, m.m2)
    assert back.count == m.count


def test_moments_from_array_channel_axis():
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 5))
    m = Moments.from_array(x, channel_axis=1)
    np.testing.assert_allclose(m.mean, x.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(m.variance(), x.var(axis=(0, 2, 3)))
    assert m.count == 40


def _float32_sum(v: np.ndarray, lanes: int = 8) -> np.float32:
    """Emulates a vectorised runtime reduction: sequential float32 per SIMD lane, then lanes.

    numpy's own np.sum is pairwise and more exact than what a runtime does; cumsum is sequential.
    """
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    v = np.concatenate([v, np.zeros(-len(v) % lanes, np.float32)]).reshape(-1, lanes)
    per_lane = np.cumsum(v, axis=0, dtype=np.float32)[-1]
    return np.cumsum(per_lane, dtype=np.float32)[-1]


def _runtime_sums(x32: np.ndarray, c32: np.ndarray):
    centred = (x32 - c32[None, :]).astype(np.float32)
    s1 = np.array([_float32_sum(centred[:, k]) for k in range(x32.shape[1])])
    s2 = np.array([_float32_sum(centred[:, k] * centred[:, k]) for k in range(x32.shape[1])])
    return s1, s2


def _far_from_zero_data(seed: int, n: int, c: int = 3, ratio: float = 1e4):
    rng = np.random.default_rng(seed)
    std = 10.0 ** rng.uniform(-2, 2, c)
    mean = ratio * std * rng.choice([-1, 1], c)
    return (mean + std * rng.standard_normal((n, c))).astype(np.float32), std, rng


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(256, 4096), st.floats(-0.5, 0.5))
def test_from_shifted_sums_float32_recovers_variance(seed, n, offset):
    x32, std, _ = _far_from_zero_data(seed, n)
    ref = Moments.from_array(x32, channel_axis=1)  # float64 two-pass over the same float32 data
    shift = (ref.mean + offset * std).astype(np.float32)  # a running mean near the batch mean
    s1, s2 = _runtime_sums(x32, shift)
    got = Moments.from_shifted_sums(n, s1, s2, shift)
    np.testing.assert_allclose(got.variance(), ref.variance(), rtol=1e-5)
    assert np.all(np.abs(got.mean - ref.mean) <= 1e-5 * std)


def test_naive_float32_moments_fail_far_from_zero():
    x32, _, _ = _far_from_zero_data(seed=7, n=2048)
    ref = Moments.from_array(x32, channel_axis=1)
    s1, s2 = _runtime_sums(x32, np.zeros(3, np.float32))  # E[x^2] - E[x]^2, no shift
    naive = Moments.from_shifted_sums(2048, s1, s2, 0.0)
    rel = np.abs(naive.variance() - ref.variance()) / ref.variance()
    assert rel.min() > 0.5


def test_from_shifted_sums_zero_count_is_empty():
    m = Moments.from_shifted_sums(0, np.zeros(2), np.zeros(2), np.zeros(2))
    assert m.count == 0 and m.channels == 2


def test_batch_spread_matches_std_of_batch_means():
    rng = np.random.default_rng(3)
    means = rng.standard_normal((9, 4)) * 5 + 100
    acc = nm.BatchSpread.empty(4)
    for m in means[:5]:
        acc.update(m)
    other = nm.BatchSpread.empty(4)
    for m in means[5:]:
        other.update(m)
    both = acc.merge(other)
    assert both.batches == 9
    np.testing.assert_allclose(both.std(), means.std(axis=0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(both.moments.mean, means.mean(axis=0), rtol=1e-14)
    single = nm.BatchSpread.empty(4)
    single.update(means[0])
    assert np.isnan(single.std()).all()


# --- fold maths ---------------------------------------------------------------------------


def _run(node, inputs: dict, out_shape=None):
    """Runs one float64 node with onnx.reference; inputs in node order."""
    vi = [helper.make_tensor_value_info(k, TensorProto.DOUBLE, v.shape) for k, v in inputs.items()]
    out = [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, None)]
    graph = helper.make_graph([node], "g", vi, out)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ReferenceEvaluator(model).run(None, inputs)[0]


def test_bn_scale_shift_matches_reference_batchnorm():
    #   X -> BatchNormalization(scale, B, mean, var, eps=1e-3) -> Y
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4))
    gamma, beta, mean = rng.standard_normal((3, 3))
    var = np.abs(rng.standard_normal(3)) + 0.1
    node = helper.make_node("BatchNormalization", ["X", "s", "b", "m", "v"], ["Y"], epsilon=1e-3)
    want = _run(node, dict(X=x, s=gamma, b=beta, m=mean, v=var))
    eps = node.attribute[0].f  # ONNX stores epsilon as float32: pass the stored value
    scale, shift = nm.bn_scale_shift(gamma, beta, mean, var, eps)
    np.testing.assert_allclose(_bn(x, scale, shift), want, rtol=1e-12, atol=1e-12)


conv_cfg = st.fixed_dictionaries(
    dict(
        group=st.sampled_from([1, 2, 3]),
        cin_g=st.integers(1, 3),
        cout_g=st.integers(1, 3),
        k=st.integers(1, 3),
        stride=st.integers(1, 2),
        pad=st.integers(0, 1),
        bias=st.booleans(),
        seed=st.integers(0, 2**31),
    )
)


@SLOW
@given(conv_cfg)
def test_fold_into_weight_conv_matches_conv_then_bn(cfg):
    #   X -> Conv(W, B) -> BN  ==  X -> Conv(W', B')
    rng = np.random.default_rng(cfg["seed"])
    g, k = cfg["group"], cfg["k"]
    cin, cout = g * cfg["cin_g"], g * cfg["cout_g"]
    x = rng.standard_normal((2, cin, 5, 4))
    w = rng.standard_normal((cout, cfg["cin_g"], k, k))
    b = rng.standard_normal(cout) if cfg["bias"] else None
    attrs = dict(group=g, strides=[cfg["stride"]] * 2, pads=[cfg["pad"]] * 4)
    conv = helper.make_node("Conv", ["X", "W", "B"], ["Y"], **attrs)
    scale, shift = _random_bn(rng, cout)
    want = _bn(_run(conv, dict(X=x, W=w, B=np.zeros(cout) if b is None else b)), scale, shift)
    w2, b2 = nm.fold_into_weight(w, b, scale, shift, axis=0)
    np.testing.assert_allclose(_run(conv, dict(X=x, W=w2, B=b2)), want, rtol=1e-10, atol=1e-10)


@FAST
@given(st.integers(1, 5), st.integers(1, 5), st.booleans(), st.integers(0, 2**31))
def test_fold_into_weight_gemm_matches_gemm_then_bn(k, n, trans_b, seed):
    #   X (3, K) -> Gemm(W, b, transB) -> BN over N
    rng = np.random.default_rng(seed)
    x, b = rng.standard_normal((3, k)), rng.standard_normal(n)
    w = rng.standard_normal((n, k) if trans_b else (k, n))
    mat = w.T if trans_b else w
    scale, shift = _random_bn(rng, n)
    w2, b2 = nm.fold_into_weight(w, b, scale, shift, axis=0 if trans_b else 1)
    mat2 = w2.T if trans_b else w2
    np.testing.assert_allclose(x @ mat2 + b2, (x @ mat + b) * scale + shift, rtol=1e-12, atol=1e-12)


def _conv_transpose(x, w, b, group, stride):
    """Grouped ConvTranspose as one group-1 onnx.reference ConvTranspose per group.

    onnx 1.23's reference ConvTranspose mishandles group > 1 (it slices W by output channels
    and writes one channel per group), so the groups are split here, as the spec defines them.
    """
    node = helper.make_node("ConvTranspose", ["X", "W"], ["Y"], strides=[stride] * 2)
    xs, ws = np.split(x, group, axis=1), np.split(w, group, axis=0)
    y = np.concatenate([_run(node, dict(X=xg, W=wg)) for xg, wg in zip(xs, ws)], axis=1)
    return y if b is None else y + b[None, :, None, None]


@SLOW
@given(conv_cfg)
def test_fold_grouped_transpose_matches_convtranspose_then_bn(cfg):
    #   X -> ConvTranspose(W (C_in, C_out/g, k, k), B, group) -> BN  ==  ConvTranspose(W', B')
    rng = np.random.default_rng(cfg["seed"])
    g, k, stride = cfg["group"], cfg["k"], cfg["stride"]
    cin, cout = g * cfg["cin_g"], g * cfg["cout_g"]
    x = rng.standard_normal((2, cin, 3, 4))
    w = rng.standard_normal((cin, cfg["cout_g"], k, k))
    b = rng.standard_normal(cout) if cfg["bias"] else None
    scale, shift = _random_bn(rng, cout)
    want = _bn(_conv_transpose(x, w, b, g, stride), scale, shift)
    w2, b2 = nm.fold_into_weight_grouped_transpose(w, b, scale, shift, group=g)
    np.testing.assert_allclose(_conv_transpose(x, w2, b2, g, stride), want, rtol=1e-10, atol=1e-10)


def test_conv_transpose_helper_matches_reference_for_group1():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, 3, 3, 4)), rng.standard_normal((3, 2, 2, 2))
    b = rng.standard_normal(2)
    node = helper.make_node("ConvTranspose", ["X", "W", "B"], ["Y"], strides=[2, 2])
    want = _run(node, dict(X=x, W=w, B=b))
    np.testing.assert_allclose(_conv_transpose(x, w, b, 1, 2), want, rtol=1e-12)


def test_fold_grouped_transpose_group1_equals_axis1_fold():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 3, 2, 2))
    scale, shift = _random_bn(rng, 3)
    got = nm.fold_into_weight_grouped_transpose(w, None, scale, shift, group=1)
    want = nm.fold_into_weight(w, None, scale, shift, axis=1)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], shift)


@SLOW
@given(conv_cfg)
def test_fold_before_linear_conv_matches_bn_then_conv(cfg):
    #   X -> BN -> Conv(W, B, pads 0, group)  ==  X -> Conv(W', B')
    rng = np.random.default_rng(cfg["seed"])
    g, k = cfg["group"], cfg["k"]
    cin, cout = g * cfg["cin_g"], g * cfg["cout_g"]
    x = rng.standard_normal((2, cin, 5, 4))
    w = rng.standard_normal((cout, cfg["cin_g"], k, k))
    b = rng.standard_normal(cout) if cfg["bias"] else None
    conv = helper.make_node("Conv", ["X", "W", "B"], ["Y"], group=g, strides=[cfg["stride"]] * 2)
    scale, shift = _random_bn(rng, cin)
    want = _run(conv, dict(X=_bn(x, scale, shift), W=w, B=np.zeros(cout) if b is None else b))
    w2, b2 = nm.fold_before_linear(w, b, scale, shift, in_axis=1, out_axis=0, group=g)
    np.testing.assert_allclose(_run(conv, dict(X=x, W=w2, B=b2)), want, rtol=1e-10, atol=1e-10)


@FAST
@given(st.integers(1, 5), st.integers(1, 5), st.booleans(), st.integers(0, 2**31))
def test_fold_before_linear_gemm_matches_bn_then_gemm(k, n, trans_b, seed):
    #   X (3, K) -> BN over K -> Gemm(W, b, transB)
    rng = np.random.default_rng(seed)
    x, b = rng.standard_normal((3, k)), rng.standard_normal(n)
    w = rng.standard_normal((n, k) if trans_b else (k, n))
    scale, shift = _random_bn(rng, k)
    mat = w.T if trans_b else w
    axes = dict(in_axis=1, out_axis=0) if trans_b else dict(in_axis=0, out_axis=1)
    w2, b2 = nm.fold_before_linear(w, b, scale, shift, **axes)
    mat2 = w2.T if trans_b else w2
    np.testing.assert_allclose(x @ mat2 + b2, (x * scale + shift) @ mat + b, rtol=1e-12, atol=1e-12)
    if not trans_b:
        # b + shift @ w can cancel to near 0: its summation order then shows at rtol 1e-14, so an atol too
        np.testing.assert_allclose(
            b2, b + shift @ w, rtol=1e-14, atol=1e-14 * float(np.max(np.abs(b) + np.abs(shift) @ np.abs(w)))
        )


def test_fold_rejects_channel_mismatch():
    three = np.ones(3)
    with pytest.raises(ValueError):
        nm.fold_into_weight(np.ones((3, 2)), None, three[:2], three[:2], axis=0)
    with pytest.raises(ValueError):
        nm.fold_into_weight_grouped_transpose(np.ones((4, 2)), None, three, three, group=2)
    with pytest.raises(ValueError):
        nm.fold_before_linear(np.ones((4, 2)), None, three, three, group=2)


# --- drift -----------------------------------------------------------------------------------


def test_drift_identical_is_zero():
    mean, var = np.array([0.5, -3.0]), np.array([2.0, 1e-9])
    m = nm.drift_metrics(mean, var, mean, var, 1e-5)
    for field in (m.d, m.log_r, m.kl):
        np.testing.assert_array_equal(field, 0.0)


def test_drift_closed_form():
    # batch N(1, 4), running N(0, 1) (eps folded in): d=1, log_r=log 2, KL=0.5*(4-1-log 4)+0.5
    m = nm.drift_metrics([1.0], [4.0 - 1e-5], [0.0], [1.0 - 1e-5], 1e-5)
    np.testing.assert_allclose(m.d, [1.0], rtol=1e-12)
    np.testing.assert_allclose(m.log_r, [np.log(2.0)], rtol=1e-12)
    np.testing.assert_allclose(m.kl, [2.0 - np.log(2.0)], rtol=1e-12)


def test_drift_kl_matches_numerical_integral():
    mb, vb, mr, vr = 0.3, 0.5, -0.2, 2.0
    x = np.linspace(-15, 15, 200001)
    p = np.exp(-((x - mb) ** 2) / (2 * vb)) / np.sqrt(2 * np.pi * vb)
    q = np.exp(-((x - mr) ** 2) / (2 * vr)) / np.sqrt(2 * np.pi * vr)
    kl = np.sum(p * np.log(p / q)) * (x[1] - x[0])
    np.testing.assert_allclose(nm.drift_metrics([mb], [vb], [mr], [vr], 0.0).kl, [kl], rtol=1e-6)


def test_drift_nan_in_nan_out_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean_b, var_b = [np.nan, 0.0, 0.0], [1.0, -5.0, 1.0]
        m = nm.drift_metrics(mean_b, var_b, np.zeros(3), [1.0, 1.0, np.nan], 1e-5)
    assert np.isnan(m.d[0]) and np.isnan(m.kl[0])
    assert np.isnan(m.log_r[1]) and np.isnan(m.kl[1])
    assert np.isnan(m.d[2]) and np.isnan(m.log_r[2])


# --- parameter health ----------------------------------------------------------------------


def test_health_helpers_flag_and_pass():
    assert nm.nonfinite_channels([1.0, np.nan, 2.0], [np.inf, 0.0, 1.0]).tolist() == [0, 1]
    assert nm.nonfinite_channels(np.ones(3)).tolist() == []
    assert nm.negative_variance_channels([1.0, -1e-9, 0.0]).tolist() == [1]
    assert nm.never_updated(np.zeros(4), np.ones(4))
    assert not nm.never_updated(np.zeros(4), [1.0, 1.0, 1.0, 0.9])
    assert nm.dead_channels([1.0, 0.0, 1e-7, -2e-6]).tolist() == [1, 2]
    assert nm.dead_channels([1e3, 1e-4, np.nan]).tolist() == [1]
    assert nm.dead_channels([1e-9, 1e-9]).tolist() == [0, 1]
    assert nm.collapsed_variance_channels([1e-9, 0.0, 1e-7, -1.0, 1.0], 1e-5).tolist() == [0, 1]
    gamma, var = [1.0, 1.0, 0.0, np.nan], [1e-9, 1.0, 1e-9, 1.0]
    assert nm.huge_scale_channels(gamma, var, 1e-5).tolist() == [0]


def test_weight_range_growth_and_imbalance():
    w = np.ones((4, 2, 3, 3))
    scale = np.array([1.0, 1.0, 1.0, 300.0])
    w2, _ = nm.fold_into_weight(w, None, scale, np.zeros(4), axis=0)
    assert nm.weight_range_growth(w, w2) == pytest.approx(300.0)
    assert nm.channel_range_imbalance(w2, axis=0) == pytest.approx(300.0)
    assert nm.channel_range_imbalance(w, axis=0) == 1.0
    assert nm.weight_range_growth(np.zeros(2), np.zeros(2)) == 1.0
    assert nm.weight_range_growth(np.zeros(2), np.ones(2)) == np.inf


# --- error metrics ---------------------------------------------------------------------------


def test_max_abs_rel_diff_basic_and_floor():
    assert nm.max_abs_rel_diff([1.0, 2.0], [1.0, 2.0]) == (0.0, 0.0)
    abs_, rel = nm.max_abs_rel_diff([1.1, 100.0], [1.0, 100.0])
    assert abs_ == pytest.approx(0.1) and rel == pytest.approx(0.1)
    # near-zero reference: denominator floored at 1e-3 * max|b| = 0.1
    abs_, rel = nm.max_abs_rel_diff([1e-6, 100.0], [0.0, 100.0])
    assert rel == pytest.approx(1e-5)
    assert nm.max_abs_rel_diff([1e-6], [0.0], floor=1e-6)[1] == pytest.approx(1.0)
    assert nm.max_abs_rel_diff(np.zeros(0), np.zeros(0)) == (0.0, 0.0)


def test_max_abs_rel_diff_nan_and_inf():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nm.max_abs_rel_diff([np.nan, 1.0], [np.nan, 1.0]) == (0.0, 0.0)
        assert nm.max_abs_rel_diff([np.nan, 1.0], [0.0, 1.0]) == (np.inf, np.inf)
        assert nm.max_abs_rel_diff([1.0], [np.nan]) == (np.inf, np.inf)
        assert nm.max_abs_rel_diff([np.inf], [np.inf]) == (0.0, 0.0)
        assert nm.max_abs_rel_diff([1.0], [np.inf]) == (np.inf, np.inf)
        assert nm.relative_error([np.nan, 2.0], [np.nan, 4.0]) == pytest.approx(0.5)
        assert nm.relative_error([np.nan], [1.0]) == np.inf
    with pytest.raises(ValueError, match="shapes"):
        nm.max_abs_rel_diff(np.zeros(2), np.zeros(3))


@settings(max_examples=200, deadline=None)
@given(
    w=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=4, max_side=5),
        elements=st.floats(-1e3, 1e3, width=32) | st.just(0.0),
    ),
    data=st.data(),
)
def test_scaled_range_metrics_equal_the_metrics_of_the_folded_weight(w, data):
    axis = data.draw(st.integers(0, w.ndim - 1))
    scale = np.array(
        data.draw(st.lists(st.floats(-1e3, 1e3) | st.just(0.0), min_size=w.shape[axis], max_size=w.shape[axis]))
    )
    folded = w.astype(np.float64) * scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    want = (nm.weight_range_growth(w, folded), nm.channel_range_imbalance(folded, axis))
    assert nm.scaled_range_metrics(w, scale, axis) == want  # bit for bit, zeros and infs alike
