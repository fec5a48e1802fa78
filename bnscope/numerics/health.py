"""Per-channel parameter health of a BN layer: non-finite values, negative or collapsed variances,
dead channels, scales that blow up folded weight ranges.
"""

from __future__ import annotations

import numpy as np

from bnscope.numerics.foldmath import bn_scale_shift
from bnscope.numerics.moments import F64


def nonfinite_channels(*arrays) -> np.ndarray:
    """Indices of channels where any of the (C,) arrays is NaN or infinite."""
    bad = np.zeros(np.shape(arrays[0]), dtype=bool)
    for a in arrays:
        bad |= ~np.isfinite(np.asarray(a, dtype=F64))
    return np.flatnonzero(bad)


def negative_variance_channels(var) -> np.ndarray:
    """Indices of channels whose variance is negative."""
    return np.flatnonzero(np.asarray(var, dtype=F64) < 0)


def never_updated(mean, var) -> bool:
    """True when every mean is exactly 0 and every variance exactly 1 (initial values)."""
    return bool(np.all(np.asarray(mean) == 0) and np.all(np.asarray(var) == 1))


def uniform_statistics(mean, var, min_channels: int) -> bool:
    """True when a layer of at least ``min_channels`` channels holds one running mean and one running
    variance in every channel: no trained network measures that; an initialiser or a placeholder does."""
    m, v = np.asarray(mean, dtype=F64).reshape(-1), np.asarray(var, dtype=F64).reshape(-1)
    return m.size >= min_channels and bool(np.all(m == m[0]) and np.all(v == v[0]))


def dead_channels(gamma, rel_tol: float = 1e-6) -> np.ndarray:
    """Indices of channels with ``|gamma| <= rel_tol * max(1, max finite |gamma|)``.

    Such a channel outputs ``beta`` whatever its input. Defaults to rel_tol 1e-6.
    """
    g = np.abs(np.asarray(gamma, dtype=F64))
    finite = g[np.isfinite(g)]
    top = max(1.0, float(finite.max())) if finite.size else 1.0
    return np.flatnonzero(g <= rel_tol * top)


def collapsed_variance_channels(var, eps: float, factor: float = 1e-3) -> np.ndarray:
    """Indices of channels with ``0 <= var <= factor * eps``: epsilon, not data, sets the scale.

    Negative variances are left to ``negative_variance_channels``. Defaults to factor 1e-3.
    """
    v = np.asarray(var, dtype=F64)
    return np.flatnonzero((v >= 0) & (v <= factor * eps))


def huge_scale_channels(gamma, var, eps: float, threshold: float = 100.0) -> np.ndarray:
    """Indices of channels with ``|gamma| / sqrt(var + eps) > threshold`` (NaN is not flagged).

    Folding multiplies the weight by that factor. Defaults to threshold 100.
    """
    scale, _ = bn_scale_shift(gamma, 0.0, 0.0, var, eps)
    with np.errstate(invalid="ignore"):
        return np.flatnonzero(np.abs(scale) > threshold)
