"""How well the data pin down a drift: standard errors of d and log r, and a sample budget.

The batch mean of a channel averages ``count`` values, but values of one sample are correlated
(neighbouring pixels), so ``count`` overstates the information. Batches are independent draws:
with B >= ``MIN_BATCHES`` batches, the standard error of the pooled mean is the spread of the
batch means over sqrt(B),
    se_mean = std(batch means) / sqrt(B);
with fewer batches it is bounded by treating every sample as one value,
    se_mean = sqrt(var_b / samples)
(a sample's spatial mean varies at most as much as its values). The effective number of
independent values is then ``n_eff = var_b / se_mean^2`` (at most ``count``), and for Gaussian
data the log standard deviation has standard error ``1 / sqrt(2 (n_eff - 1))``:
    se_d = se_mean / sqrt(var_r + eps);  se_log_r = 1 / sqrt(2 (n_eff - 1)).
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
        else:
            se_mean = np.sqrt(var_b / max(samples, 1))
        n_eff = np.clip(var_b / (se_mean * se_mean), 2.0, max(count, 2))
        n_eff = np.where(np.isfinite(n_eff), n_eff, max(min(samples, count), 2))
        se_d = se_mean / np.sqrt(var_r + F64(eps))
        se_log_r = 1.0 / np.sqrt(2.0 * (n_eff - 1.0))
    return DriftErrors(se_d, se_log_r, n_eff)


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
