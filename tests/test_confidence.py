"""Standard errors of d and log r against Monte Carlo: repeat the measurement many times on fresh
data and compare the spread of the estimates with the predicted standard error.

Data: per channel, samples of shape (spatial,) whose values share a per-sample offset (so values
within a sample are correlated, the case where counting values overstates the information).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnscope.numerics import Moments, confidence
from bnscope.numerics.moments import BatchSpread


def _experiment(rng, batches: int, batch: int, spatial: int, channels: int, rho: float):
    """One measurement: pooled moments and the spread of batch means (per channel)."""
    moments, spread = Moments.empty(channels), BatchSpread.empty(channels)
    for _ in range(batches):
        shared = rng.normal(0.0, math.sqrt(rho), (batch, channels, 1))
        x = shared + rng.normal(0.0, math.sqrt(1 - rho), (batch, channels, spatial))
        m = Moments.from_array(x, channel_axis=1)
        moments, _ = moments.merge(m), spread.update(m.mean)
    return moments, spread


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_drift_errors_match_monte_carlo_with_many_batches(rho):
    rng = np.random.default_rng(1)
    batches, batch, spatial, channels = 16, 8, 16, 40
    d_values, predicted = [], []
    for _ in range(60):
        moments, spread = _experiment(rng, batches, batch, spatial, channels, rho)
        var = moments.variance()
        errors = confidence.drift_errors(
            var, np.ones(channels), 0.0, spread.std(), spread.batches, batches * batch, moments.count
        )
        d_values.append(moments.mean)  # running mean 0, var 1: d is the mean
        predicted.append(errors.se_d)
    observed = np.std(np.array(d_values), axis=0).mean()
    assert np.mean(predicted) == pytest.approx(observed, rel=0.2)


def test_drift_errors_with_few_batches_are_conservative():
    rng = np.random.default_rng(2)
    d_values, predicted = [], []
    for _ in range(200):
        moments, spread = _experiment(rng, 1, 32, 16, 20, 0.5)
        errors = confidence.drift_errors(moments.variance(), np.ones(20), 0.0, spread.std(), 1, 32, moments.count)
        d_values.append(moments.mean)
        predicted.append(errors.se_d)
    observed = np.std(np.array(d_values), axis=0).mean()
    assert np.mean(predicted) >= observed * 0.9  # never much below the truth


def test_log_r_error_matches_monte_carlo_for_iid_values():
    rng = np.random.default_rng(3)
    n, log_r = 12, []
    for _ in range(4000):
        x = rng.normal(size=n)
        log_r.append(0.5 * math.log(x.var(ddof=1)))
    errors = confidence.drift_errors(np.ones(1), np.ones(1), 0.0, np.full(1, 1 / math.sqrt(n)), 8, n, n)
    assert errors.se_log_r[0] == pytest.approx(np.std(log_r), rel=0.1)


def test_trigamma_known_values():
    got = confidence.trigamma([0.5, 1.0, 2.0, 50.0])
    want = [math.pi**2 / 2, math.pi**2 / 6, math.pi**2 / 6 - 1, 0.020201333226697125]
    np.testing.assert_allclose(got, want, rtol=1e-8)


@given(st.floats(1e-3, 10), st.integers(1, 10_000), st.floats(0.01, 2))
@settings(max_examples=50, deadline=None)
def test_samples_to_resolve_scales_as_inverse_square(se, samples, resolution):
    need = confidence.samples_to_resolve(se, samples, resolution)
    exact = samples * (confidence.Z * se / resolution) ** 2
    assert need == max(1, math.ceil(exact))
    assert confidence.samples_to_resolve(float("nan"), samples, resolution) is None


def test_sure_over_and_unresolved():
    value, se = np.array([1.0, 0.7, -1.2, 0.2]), np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_array_equal(confidence.sure_over(value, se, 0.5), [True, False, True, False])
    np.testing.assert_array_equal(confidence.unresolved(se, 0.5), [False, False, True, True])


def test_samples_to_decide_lets_max_fraction_of_channels_stay_coarse_as_the_verdict_does():
    from types import SimpleNamespace

    from bnscope.stats.verdict import Thresholds, channel_calls, samples_to_decide

    # 20 channels measured to se_d 0.3 (2 se = 0.6 > max_d 0.5: too coarse), one outlier at 5.0
    se_d = np.array([0.3] * 19 + [5.0])
    errors = confidence.DriftErrors(se_d, np.full(20, 0.05), np.full(20, 100.0))
    drift = SimpleNamespace(d=np.zeros(20), log_r=np.zeros(20))
    t = Thresholds()  # max_fraction 0.05: one channel of 20 may stay coarse
    calls = channel_calls(drift, errors, t.max_d, t.max_log_r)
    assert samples_to_decide(drift, errors, calls, t.max_d, t.max_log_r, 100, t) == math.ceil(100 * (0.6 / 0.5) ** 2)


@pytest.mark.parametrize("batches", [4, 6, 12])
def test_z_standard_errors_cover_about_95_percent_with_few_batches(batches):
    # The spread of few batch means is itself uncertain; "Z standard errors" must still mean ~95%.
    # Unwidened, 2 standard errors of 4 batch means cover about 86% (t with 3 degrees of freedom).
    rng = np.random.default_rng(batches)
    channels, covered = 4000, []
    for _ in range(5):
        moments, spread = _experiment(rng, batches, 8, 4, channels, 0.5)
        errors = confidence.drift_errors(
            moments.variance(), np.ones(channels), 0.0, spread.std(), spread.batches, batches * 8, moments.count
        )
        covered.append(np.abs(moments.mean) <= 1.959964 * errors.se_d)  # true mean 0, running var 1
    assert np.mean(covered) == pytest.approx(0.95, abs=0.015)


def test_t_quantile_975_known_values():
    # Standard tables: 3 -> 3.182, 30 -> 2.042, 40 -> 2.021, 60 -> 2.000, 120 -> 1.980; infinity -> 1.960.
    for df, want in ((3, 3.182), (30, 2.042), (40, 2.021), (60, 2.000), (120, 1.980), (10**6, 1.960)):
        assert confidence.t_quantile_975(df) == pytest.approx(want, abs=6e-4)
    with pytest.raises(ValueError):
        confidence.t_quantile_975(0)
