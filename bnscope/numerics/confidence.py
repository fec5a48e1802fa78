"""How well the data pin down a drift: standard errors of d and log r, and a sample budget.

The batch mean of a channel averages ``count`` values, but values of one sample are correlated
(neighbouring pixels), so ``count`` overstates the information. Batches are independent draws:
with B >= ``MIN_BATCHES`` batches, the standard error of the pooled mean is the spread of the
batch means over sqrt(B),
    se_mean = std(batch means) / sqrt(B);
with fewer batches it is bounded by treating every sample as one value,
    se_mean = sqrt(max(var_b, var_r) / samples)
(a sample's spatial mean varies at most as much as its values; var_r, the variance if nothing
drifted, guards against a batch variance that is itself a poor estimate from a few samples). The effective number of
independent values is then ``n_eff = var_b / se_mean^2`` (at most ``count``; ``samples`` with
fewer batches). For Gaussian data
(n - 1) s^2 / sigma^2 is chi-square with k = n - 1 degrees of freedom, whose log has variance
trigamma(k / 2), about 2 / k for large k:
    se_d = se_mean / sqrt(var_r + eps);  se_log_r = 0.5 * sqrt(trigamma((n_eff - 1) / 2)).
Below ``MIN_EFFECTIVE`` independent values per channel even that is too optimistic (one tiny
variance among a few values is likely); the verdict then says the data are too few.
The spread of B batch means is itself estimated with B - 1 degrees of freedom, so se_mean is
widened by t(0.975, B - 1) / 1.96 (Student's t): "Z standard errors" then means about 95% with 4
batches as with 400 (unwidened, 2 standard errors of 4 batch means cover about 86%).
A drift is *sure* when it exceeds its threshold by more than ``Z`` standard errors (about 95%),
and the samples needed to know |d| to within ``resolution`` scale as 1 / se^2:
    samples' = samples * (Z * se_d / resolution)^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bnscope.numerics.moments import F64

Z = 2.0  # standard errors for a sure verdict (two-sided ~95%)
MIN_BATCHES = 4  # fewer batch means say too little about their own spread
MIN_EFFECTIVE = 10  # fewer independent values per channel: no verdict on the variance


@dataclass(frozen=True)
class DriftErrors:
    """Per-channel standard errors (float64, (C,)) and the effective number of values."""

    se_d: np.ndarray
    se_log_r: np.ndarray
    n_eff: np.ndarray


def drift_errors(batch_var, running_var, eps: float, spread_std, batches: int, samples: int, count: int) -> DriftErrors:
    """Standard errors of d and log r per channel (see the module docstring); NaN when unknown."""
    var_b, var_r = np.asarray(batch_var, F64), np.asarray(running_var, F64)
    with np.errstate(all="ignore"):
        if batches >= MIN_BATCHES:
            se_mean = np.asarray(spread_std, F64) / math.sqrt(batches)
            n_eff = np.clip(var_b / (se_mean * se_mean), 2.0, max(count, 2))
            n_eff = np.where(np.isfinite(n_eff), n_eff, max(min(samples, count), 2))
            se_mean = se_mean * (t_quantile_975(batches - 1) / 1.959964)
        else:
            se_mean = np.sqrt(np.maximum(var_b, var_r) / max(samples, 1))
            n_eff = np.full(var_b.shape, float(max(min(samples, count), 2)))
        se_d = se_mean / np.sqrt(var_r + F64(eps))
        se_log_r = 0.5 * np.sqrt(trigamma((n_eff - 1.0) / 2.0))
    return DriftErrors(se_d, se_log_r, n_eff)


# Student's t, 0.975 quantile, for 1..30 degrees of freedom (standard tables).
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom: the table up to 30, then
    the Cornish-Fisher expansion z + (z^3 + z) / (4 df) + (5 z^5 + 16 z^3 + 3 z) / (96 df^2)
    (within 2e-4 of the exact value from 31 on)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def trigamma(x) -> np.ndarray:
    """psi'(x) for x > 0: recurrence psi'(x) = psi'(x + 1) + 1 / x^2 up to x >= 6, then the
    asymptotic series 1/x + 1/(2x^2) + 1/(6x^3) - 1/(30x^5) + 1/(42x^7) (error < 1e-9)."""
    x = np.array(x, dtype=F64, copy=True)
    acc = np.zeros_like(x)
    while np.any(small := x < 6.0):
        acc += np.where(small, 1.0 / (x * x), 0.0)
        x = np.where(small, x + 1.0, x)
    return acc + 1 / x + 1 / (2 * x**2) + 1 / (6 * x**3) - 1 / (30 * x**5) + 1 / (42 * x**7)


def sure_over(value, se, limit: float, z: float = Z) -> np.ndarray:
    """Channels whose |value| exceeds ``limit`` by more than ``z`` standard errors."""
    with np.errstate(invalid="ignore"):
        return np.abs(np.asarray(value, F64)) - z * np.asarray(se, F64) > limit


def unresolved(se, limit: float, z: float = Z) -> np.ndarray:
    """Channels whose uncertainty alone (``z`` standard errors) is larger than ``limit``."""
    with np.errstate(invalid="ignore"):
        return z * np.asarray(se, F64) > limit


def samples_to_resolve(se_d: float, samples: int, resolution: float, z: float = Z) -> int | None:
    """Samples that shrink ``z * se_d`` (measured with ``samples``) down to ``resolution``."""
    if not (math.isfinite(se_d) and resolution > 0 and samples > 0):
        return None
    return max(1, math.ceil(samples * (z * se_d / resolution) ** 2))
