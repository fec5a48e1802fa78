"""Drift of batch statistics (b) against running statistics (r), per channel, with
``vb = var_b + eps`` and ``vr = var_r + eps``:
    d = (mu_b - mu_r) / sqrt(vr);  log_r = 0.5 * log(vb / vr)
    kl = KL(N(mu_b, vb) || N(mu_r, vr)) = 0.5 * (vb / vr - 1 - log(vb / vr)) + 0.5 * d^2

"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnscope.numerics.moments import F64


@dataclass(frozen=True)
class DriftMetrics:
    """Per-channel drift of batch statistics against running statistics (float64, (C,)).

    Attributes:
        d: Mean shift in running standard deviations, ``(mu_b - mu_r) / sqrt(var_r + eps)``.
        log_r: Log ratio of standard deviations, ``0.5 * log((var_b + eps) / (var_r + eps))``.
        kl: ``KL(N(mu_b, var_b + eps) || N(mu_r, var_r + eps))`` in nats: the cost of
            describing the observed (batch) distribution with the stored (running) one.
    """

    d: np.ndarray
    log_r: np.ndarray
    kl: np.ndarray


def drift_metrics(batch_mean, batch_var, running_mean, running_var, eps: float) -> DriftMetrics:
    """Computes ``DriftMetrics``; NaN in gives NaN out, without warnings."""
    stats = (batch_mean, batch_var, running_mean, running_var)
    mu_b, var_b, mu_r, var_r = (np.asarray(a, dtype=F64) for a in stats)
    with np.errstate(all="ignore"):
        vr = var_r + F64(eps)
        d = (mu_b - mu_r) / np.sqrt(vr)
        log_r = 0.5 * np.log((var_b + F64(eps)) / vr)
        kl = 0.5 * (np.expm1(2 * log_r) - 2 * log_r) + 0.5 * d * d
    return DriftMetrics(d, log_r, kl)
