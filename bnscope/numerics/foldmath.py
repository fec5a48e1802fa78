"""Folding (ONNX BatchNormalization, spec default epsilon 1e-5):
    y = gamma * (x - mean) / sqrt(var + eps) + beta = scale * x + shift
    scale = gamma / sqrt(var + eps);  shift = beta - mean * scale
BN after a linear op (output channels on ``axis`` of W: 0 for Conv ``(C_out, C_in/g, k...)``,
1 for Gemm with transB=0 or MatMul ``(K, N)``, 0 for Gemm with transB=1 ``(N, K)``):
    W' = W * scale (along axis)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta = b * scale + shift
ConvTranspose ``(C_in, C_out/g, k...)``: output channel ``o = g * (C_out/g) + j`` is slice ``j``
of axis 1 in the rows of group ``g``. BN before a linear op, ``y = W (scale * x + shift) + b``:
    W'[o, i, k...] = W[o, i, k...] * scale[i]
    b'[o] = b[o] + sum_{i, k...} W[o, i, k...] * shift[i]
exact for Gemm/MatMul and for Conv without padding (zero padding of BN(x) is not zero padding
of x; callers must check pads).
"""

from __future__ import annotations

import numpy as np

from bnscope.numerics.moments import F64, as_vector


def bn_scale_shift(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns float64 ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``."""
    gamma, beta, mean, var = (np.asarray(a, dtype=F64) for a in (gamma, beta, mean, var))
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = gamma / np.sqrt(var + F64(eps))
        return scale, beta - mean * scale


def _along(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Reshapes 1-D ``v`` to broadcast along ``axis`` of an ``ndim``-D array."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _bias(bias, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    b = np.zeros_like(scale) if bias is None else as_vector(bias)
    return b * scale + shift


def fold_into_weight(weight, bias, scale, shift, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Folds a BN that follows a linear op into its weight and bias (float64).

    Args:
        weight: Weight of the linear op.
        bias: Its bias, shape (C,), or None for zeros.
        scale: BN scale from ``bn_scale_shift``, shape (C,).
        shift: BN shift from ``bn_scale_shift``, shape (C,).
        axis: Output-channel axis of ``weight``. Defaults to 0 (Conv; use 1 for
            Gemm with transB=0 and for MatMul).

    Returns:
        ``(W * scale along axis, bias * scale + shift)``.
    """
    scale, shift = as_vector(scale), as_vector(shift)
    return scaled_along(weight, scale, axis), _bias(bias, scale, shift)


def scaled_along(weight, scale, axis: int = 0) -> np.ndarray:
    """A float64 copy of ``weight`` scaled by ``scale`` along ``axis``, made with one temporary
    (weights reach GBs)."""
    w, scale = np.array(weight, dtype=F64), as_vector(scale)
    if w.shape[axis] != scale.shape[0]:
        raise ValueError(f"weight axis {axis} has {w.shape[axis]} channels, BN {scale.shape[0]}")
    w *= _along(scale, w.ndim, axis)
    return w


def fold_into_weight_grouped_transpose(weight, bias, scale, shift, group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Folds a BN that follows a ConvTranspose with weight ``(C_in, C_out/group, k...)``.

    Output channel ``o = g * (C_out/group) + j`` is slice ``j`` of axis 1 within the
    rows ``g * (C_in/group) ... (g+1) * (C_in/group) - 1`` of axis 0.

    Args:
        weight: ConvTranspose weight.
        bias: Its bias, shape (C_out,), or None for zeros.
        scale: BN scale, shape (C_out,).
        shift: BN shift, shape (C_out,).
        group: The ConvTranspose ``group`` attribute. Defaults to 1.
    """
    w, scale, shift = np.asarray(weight, dtype=F64), as_vector(scale), as_vector(shift)
    c_in, c_out_g = w.shape[:2]
    if c_in % group or c_out_g * group != scale.shape[0]:
        raise ValueError(f"weight {w.shape}, group {group} mismatch {scale.shape[0]} channels")
    grouped = w.reshape(group, c_in // group, *w.shape[1:])
    factor = scale.reshape(group, 1, c_out_g, *([1] * (w.ndim - 2)))
    return (grouped * factor).reshape(w.shape), _bias(bias, scale, shift)


def fold_before_linear(
    weight, bias, scale, shift, in_axis: int = 1, out_axis: int = 0, group: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Folds a BN that precedes a linear op: ``W (scale * x + shift) + b = W' x + b'``.

    Exact for Gemm/MatMul and for Conv without padding. With ``group`` g, input channel
    ``i`` belongs to group ``i // (C_in/g)`` and is index ``i % (C_in/g)`` of ``in_axis``;
    output channel ``o`` belongs to group ``o // (C_out/g)``.

    Args:
        weight: Weight of the linear op; every axis but ``out_axis`` is summed over.
        bias: Its bias, shape (C_out,), or None for zeros.
        scale: BN scale, shape (C_in,).
        shift: BN shift, shape (C_in,).
        in_axis: Input-channel axis. Defaults to 1 (Conv; use 0 for Gemm transB=0 / MatMul
            ``(K, N)``, 1 for Gemm transB=1 ``(N, K)``).
        out_axis: Output-channel axis. Defaults to 0 (Conv).
        group: Conv ``group`` attribute. Defaults to 1.

    Returns:
        ``(W * scale[i] along in_axis, b + sum over all axes but out_axis of W * shift[i])``.
    """
    w, scale, shift = np.asarray(weight, dtype=F64), as_vector(scale), as_vector(shift)
    wt = np.moveaxis(w, (out_axis, in_axis), (0, 1))
    c_out, c_in_g = wt.shape[:2]
    if c_out % group or c_in_g * group != scale.shape[0]:
        raise ValueError(f"weight {w.shape}, group {group} mismatch {scale.shape[0]} channels")
    idx = (np.arange(c_out) // (c_out // group))[:, None] * c_in_g + np.arange(c_in_g)[None, :]
    tail = (1,) * (wt.ndim - 2)
    folded = wt * scale[idx].reshape(c_out, c_in_g, *tail)
    extra = (wt * shift[idx].reshape(c_out, c_in_g, *tail)).reshape(c_out, -1).sum(axis=1)
    b = np.zeros(c_out) if bias is None else as_vector(bias)
    return np.moveaxis(folded, (0, 1), (out_axis, in_axis)), b + extra
