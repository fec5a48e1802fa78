"""The arithmetic of int8/int16 quantisation, in float64 numpy, as onnxruntime's QDQ quantizer does it.

* Activations, MinMax, asymmetric (``QUInt8``/``QUInt16``): the calibrated range is widened to hold
  0, ``scale = (max - min) / (2^bits - 1)``, ``zero_point = round(-min / scale)``,
  ``q(x) = (clip(round(x / scale) + zero_point, 0, 2^bits - 1) - zero_point) * scale``.
* Weights, symmetric (``QInt8``): ``scale = max|w| / 127`` per tensor, or per output channel
  (axis 0 of a Conv weight) with per-channel quantisation; ``q(w) = clip(round(w / scale), -127, 127) * scale``.
* Bias: int32 with ``scale = input_scale * weight_scale`` (per channel); it overflows when
  ``|b| / scale > 2^31 - 1``.
* SQNR in dB: ``10 log10(sum y^2 / sum (y - y_q)^2)``.
* Data-free prediction for a BN output, channel ``c`` ~ ``beta_c +- k |gamma_c|``: its range is the union
  of those intervals; its power is ``mean_c(beta_c^2 + gamma_c^2)``; uniform rounding noise ``step^2 / 12``.
"""

from __future__ import annotations

import numpy as np

F64 = np.float64
INT32_MAX = 2**31 - 1


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """``10 log10(signal / noise)``; inf when the noise is zero, -inf when the signal is."""
    if noise_power <= 0:
        return float("inf")
    if signal_power <= 0:
        return float("-inf")
    return float(10.0 * np.log10(signal_power / noise_power))


def activation_scale(lo: float, hi: float, bits: int = 8) -> float:
    """onnxruntime's MinMax scale for an asymmetric unsigned activation of ``bits`` bits."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    return (hi - lo) / (2**bits - 1) if hi > lo else 1.0


def fake_quant_activation(x: np.ndarray, lo: float, hi: float, bits: int = 8) -> np.ndarray:
    """Quantise and dequantise ``x`` as onnxruntime's uint activations with range ``[lo, hi]``."""
    scale = activation_scale(lo, hi, bits)
    zero = np.round(-min(float(lo), 0.0) / scale)
    q = np.clip(np.round(np.asarray(x, dtype=F64) / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def weight_sqnr_db(weight: np.ndarray, per_channel: bool, bits: int = 8) -> float:
    """SQNR of symmetric int ``bits`` weights (per output channel on axis 0, or per tensor)."""
    w = np.asarray(weight, dtype=F64).reshape(weight.shape[0], -1)
    top = 2 ** (bits - 1) - 1
    peak = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.abs(w).max(keepdims=True)
    scale = np.where(peak > 0, peak / top, 1.0)
    q = np.clip(np.round(w / scale), -top, top) * scale
    return sqnr_db(float((w * w).sum()), float(((w - q) ** 2).sum()))


def bn_output_ranges(gamma: np.ndarray, beta: np.ndarray, k: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel predicted range of a BN output: ``beta -+ k |gamma|``."""
    gamma, beta = np.asarray(gamma, dtype=F64), np.asarray(beta, dtype=F64)
    return beta - k * np.abs(gamma), beta + k * np.abs(gamma)


def bn_output_power(gamma: np.ndarray, beta: np.ndarray) -> float:
    """Predicted mean square of a BN output: ``mean_c(beta_c^2 + gamma_c^2)``."""
    gamma, beta = np.asarray(gamma, dtype=F64), np.asarray(beta, dtype=F64)
    return float(np.mean(beta * beta + gamma * gamma))


def bias_overflows(bias: np.ndarray, input_scale: float, weight_scales: np.ndarray) -> int:
    """How many channels of an int32 bias overflow with ``scale = input_scale * weight_scale``."""
    scale = float(input_scale) * np.asarray(weight_scales, dtype=F64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.abs(np.asarray(bias, dtype=F64)) / scale
    return int(np.count_nonzero(~(q <= INT32_MAX)))


def weight_scales(weight: np.ndarray, per_channel: bool, bits: int = 8) -> np.ndarray:
    """Symmetric weight scales, one per output channel (equal ones for per-tensor)."""
    w = np.abs(np.asarray(weight, dtype=F64).reshape(weight.shape[0], -1))
    peak = w.max(axis=1) if per_channel else np.full(w.shape[0], w.max())
    return np.where(peak > 0, peak / (2 ** (bits - 1) - 1), 1.0)


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank."""
    values = np.asarray(values, dtype=F64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=F64)
    ranks[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        tie = values == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a, b) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); None for fewer than 3 pairs or no spread."""
    a, b = np.asarray(a, dtype=F64), np.asarray(b, dtype=F64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return None
    ra, rb = rank(a[keep]), rank(b[keep])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else None
