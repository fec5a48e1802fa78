"""Pure numpy maths for BatchNormalization: moments, fold formulas, drift, health, errors.

Everything here computes in float64; callers cast once to the model dtype at the end.
This module imports only numpy and the standard library.

Moments (per channel, over all values that share a channel). ``Moments`` holds the count
``n``, the mean and ``M2 = sum((x - mean)^2)``; population variance is ``M2 / n``. Two sets
merge with Chan et al.'s parallel formula, which adds only non-negative terms:
    delta = mean_b - mean_a;  n = n_a + n_b
    mean = mean_a + delta * n_b / n;  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n
Sums taken by a runtime in float32 are shifted first: with ``c`` near the mean (the stored
running mean), ``s1 = sum(x - c)``, ``s2 = sum((x - c)^2)`` give, in float64,
``mean = c + s1 / n`` and ``M2 = max(s2 - s1^2 / n, 0)``. Without the shift, float32
``E[x^2] - E[x]^2`` loses everything once ``|mean| / std`` reaches about 1e3.

Folding (ONNX BatchNormalization, spec default epsilon 1e-5):
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

Drift of batch statistics (b) against running statistics (r), per channel, with
``vb = var_b + eps`` and ``vr = var_r + eps``:
    d = (mu_b - mu_r) / sqrt(vr);  log_r = 0.5 * log(vb / vr)
    kl = KL(N(mu_b, vb) || N(mu_r, vr)) = 0.5 * (vb / vr - 1 - log(vb / vr)) + 0.5 * d^2
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

_F64 = np.float64


def _vec(x) -> np.ndarray:
    """Returns ``x`` as a 1-D float64 array (a scalar becomes shape (1,))."""
    return np.atleast_1d(np.asarray(x, dtype=_F64)).reshape(-1)


@dataclass
class Moments:
    """Count, mean and sum of squared deviations (M2) per channel, mergeable.

    Attributes:
        count: Number of values reduced per channel (the same for every channel).
        mean: Per-channel mean, float64, shape (C,).
        m2: Per-channel ``sum((x - mean)^2)``, float64, shape (C,).
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def __post_init__(self) -> None:
        self.count = int(self.count)
        self.mean, self.m2 = _vec(self.mean), _vec(self.m2)
        if self.count < 0 or self.mean.shape != self.m2.shape:
            raise ValueError(
                f"bad moments: count {self.count}, mean {self.mean.shape}, m2 {self.m2.shape}"
            )

    @property
    def channels(self) -> int:
        """Number of channels."""
        return self.mean.shape[0]

    def variance(self, ddof: int = 0) -> np.ndarray:
        """Per-channel variance ``M2 / (count - ddof)``; NaN when ``count <= ddof``.

        Args:
            ddof: Delta degrees of freedom. Defaults to 0 (population, what BN uses);
                1 gives the unbiased estimate.
        """
        if self.count <= ddof:
            return np.full(self.channels, np.nan)
        return self.m2 / (self.count - ddof)

    def merge(self, other: Moments) -> Moments:
        """Combines two disjoint sets of values with Chan et al.'s parallel formula."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {self.channels} and {other.channels} channels")
        if other.count == 0 or self.count == 0:
            src = self if other.count == 0 else other
            return Moments(src.count, src.mean.copy(), src.m2.copy())
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @classmethod
    def empty(cls, channels: int) -> Moments:
        """Returns the identity of ``merge``: count 0, zero mean and M2."""
        return cls(0, np.zeros(channels), np.zeros(channels))

    @classmethod
    def from_shifted_sums(cls, count: int, s1, s2, shift) -> Moments:
        """Builds moments from shifted sums, typically float32 reductions from the runtime.

        Args:
            count: Values summed per channel.
            s1: Per-channel ``sum(x - shift)``.
            s2: Per-channel ``sum((x - shift)^2)``.
            shift: Per-channel (or scalar) shift ``c``; the closer to the mean, the more exact.
        """
        s1, s2 = _vec(s1), _vec(s2)
        if count == 0:
            return cls.empty(s1.shape[0])
        shift = np.broadcast_to(np.asarray(shift, dtype=_F64), s1.shape)
        m2 = np.maximum(s2 - s1 * s1 / count, 0.0)
        return cls(count, shift + s1 / count, m2)

    @classmethod
    def from_array(cls, x, channel_axis: int = 1) -> Moments:
        """Exact two-pass float64 moments of ``x`` per channel (a reference for small data).

        Args:
            x: Array holding the channels on ``channel_axis``.
            channel_axis: Axis of the channels. Defaults to 1 (NCHW).
        """
        flat = np.moveaxis(np.asarray(x, dtype=_F64), channel_axis, 0)
        flat = flat.reshape(flat.shape[0], -1)
        if flat.shape[1] == 0:
            return cls.empty(flat.shape[0])
        mean = flat.mean(axis=1)
        return cls(flat.shape[1], mean, ((flat - mean[:, None]) ** 2).sum(axis=1))

    def to_dict(self) -> dict:
        """Returns ``{"count", "mean", "m2"}`` with plain lists, for JSON."""
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> Moments:
        """Inverse of ``to_dict``."""
        return cls(data["count"], data["mean"], data["m2"])


def merge_all(moments: Iterable[Moments], channels: int | None = None) -> Moments:
    """Merges many moments by pairwise tree reduction (error grows with log of their number).

    Args:
        moments: Moments over disjoint data, all with the same channels.
        channels: Channels of the result when ``moments`` is empty. Defaults to None
            (an empty input then raises ValueError).
    """
    items = list(moments)
    if not items:
        if channels is None:
            raise ValueError("merge_all of nothing needs channels")
        return Moments.empty(channels)
    while len(items) > 1:
        pairs = [items[i].merge(items[i + 1]) for i in range(0, len(items) - 1, 2)]
        items = pairs + ([items[-1]] if len(items) % 2 else [])
    return items[0]


@dataclass
class BatchSpread:
    """Streaming Welford accumulator over per-batch means: how noisy BN batch statistics are.

    Each batch counts once, whatever its size. Memory is O(C).

    Attributes:
        moments: Moments over batch means (``count`` is the number of batches).
    """

    moments: Moments

    @classmethod
    def empty(cls, channels: int) -> BatchSpread:
        """Returns an accumulator that has seen no batch."""
        return cls(Moments.empty(channels))

    def update(self, batch_mean) -> None:
        """Adds one batch's per-channel mean (Welford's step, Chan's formula with n_b = 1)."""
        one = Moments(1, batch_mean, np.zeros_like(_vec(batch_mean)))
        self.moments = self.moments.merge(one)

    def merge(self, other: BatchSpread) -> BatchSpread:
        """Combines two accumulators over disjoint sets of batches."""
        return BatchSpread(self.moments.merge(other.moments))

    @property
    def batches(self) -> int:
        """Number of batches seen."""
        return self.moments.count

    def std(self, ddof: int = 1) -> np.ndarray:
        """Per-channel standard deviation of batch means; NaN with ``batches <= ddof``.

        Args:
            ddof: Delta degrees of freedom. Defaults to 1 (unbiased variance).
        """
        return np.sqrt(self.moments.variance(ddof))


def bn_scale_shift(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns float64 ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``."""
    gamma, beta, mean, var = (np.asarray(a, dtype=_F64) for a in (gamma, beta, mean, var))
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = gamma / np.sqrt(var + _F64(eps))
        return scale, beta - mean * scale


def _along(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Reshapes 1-D ``v`` to broadcast along ``axis`` of an ``ndim``-D array."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _bias(bias, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    b = np.zeros_like(scale) if bias is None else _vec(bias)
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
    scale, shift = _vec(scale), _vec(shift)
    return scaled_along(weight, scale, axis), _bias(bias, scale, shift)


def scaled_along(weight, scale, axis: int = 0) -> np.ndarray:
    """A float64 copy of ``weight`` scaled by ``scale`` along ``axis``, made with one temporary
    (weights reach GBs)."""
    w, scale = np.array(weight, dtype=_F64), _vec(scale)
    if w.shape[axis] != scale.shape[0]:
        raise ValueError(f"weight axis {axis} has {w.shape[axis]} channels, BN {scale.shape[0]}")
    w *= _along(scale, w.ndim, axis)
    return w


def fold_into_weight_grouped_transpose(
    weight, bias, scale, shift, group: int = 1
) -> tuple[np.ndarray, np.ndarray]:
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
    w, scale, shift = np.asarray(weight, dtype=_F64), _vec(scale), _vec(shift)
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
    w, scale, shift = np.asarray(weight, dtype=_F64), _vec(scale), _vec(shift)
    wt = np.moveaxis(w, (out_axis, in_axis), (0, 1))
    c_out, c_in_g = wt.shape[:2]
    if c_out % group or c_in_g * group != scale.shape[0]:
        raise ValueError(f"weight {w.shape}, group {group} mismatch {scale.shape[0]} channels")
    idx = (np.arange(c_out) // (c_out // group))[:, None] * c_in_g + np.arange(c_in_g)[None, :]
    tail = (1,) * (wt.ndim - 2)
    folded = wt * scale[idx].reshape(c_out, c_in_g, *tail)
    extra = (wt * shift[idx].reshape(c_out, c_in_g, *tail)).reshape(c_out, -1).sum(axis=1)
    b = np.zeros(c_out) if bias is None else _vec(bias)
    return np.moveaxis(folded, (0, 1), (out_axis, in_axis)), b + extra


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
    mu_b, var_b, mu_r, var_r = (np.asarray(a, dtype=_F64) for a in stats)
    with np.errstate(all="ignore"):
        vr = var_r + _F64(eps)
        d = (mu_b - mu_r) / np.sqrt(vr)
        log_r = 0.5 * np.log((var_b + _F64(eps)) / vr)
        kl = 0.5 * (np.expm1(2 * log_r) - 2 * log_r) + 0.5 * d * d
    return DriftMetrics(d, log_r, kl)


def nonfinite_channels(*arrays) -> np.ndarray:
    """Indices of channels where any of the (C,) arrays is NaN or infinite."""
    bad = np.zeros(np.shape(arrays[0]), dtype=bool)
    for a in arrays:
        bad |= ~np.isfinite(np.asarray(a, dtype=_F64))
    return np.flatnonzero(bad)


def negative_variance_channels(var) -> np.ndarray:
    """Indices of channels whose variance is negative."""
    return np.flatnonzero(np.asarray(var, dtype=_F64) < 0)


def never_updated(mean, var) -> bool:
    """True when every mean is exactly 0 and every variance exactly 1 (initial values)."""
    return bool(np.all(np.asarray(mean) == 0) and np.all(np.asarray(var) == 1))


def dead_channels(gamma, rel_tol: float = 1e-6) -> np.ndarray:
    """Indices of channels with ``|gamma| <= rel_tol * max(1, max finite |gamma|)``.

    Such a channel outputs ``beta`` whatever its input. Defaults to rel_tol 1e-6.
    """
    g = np.abs(np.asarray(gamma, dtype=_F64))
    finite = g[np.isfinite(g)]
    top = max(1.0, float(finite.max())) if finite.size else 1.0
    return np.flatnonzero(g <= rel_tol * top)


def collapsed_variance_channels(var, eps: float, factor: float = 1e-3) -> np.ndarray:
    """Indices of channels with ``0 <= var <= factor * eps``: epsilon, not data, sets the scale.

    Negative variances are left to ``negative_variance_channels``. Defaults to factor 1e-3.
    """
    v = np.asarray(var, dtype=_F64)
    return np.flatnonzero((v >= 0) & (v <= factor * eps))


def huge_scale_channels(gamma, var, eps: float, threshold: float = 100.0) -> np.ndarray:
    """Indices of channels with ``|gamma| / sqrt(var + eps) > threshold`` (NaN is not flagged).

    Folding multiplies the weight by that factor. Defaults to threshold 100.
    """
    scale, _ = bn_scale_shift(gamma, 0.0, 0.0, var, eps)
    with np.errstate(invalid="ignore"):
        return np.flatnonzero(np.abs(scale) > threshold)


def _max_abs(a) -> float:
    # max|a| = max(|max a|, |min a|): two reductions in the native dtype, no float64 copy of the
    # whole tensor (weights reach GBs). Widening to float64 is exact, so the result is the same;
    # np.fmax is not used because a NaN must propagate as np.abs(a).max() would.
    a = np.asarray(a)
    if not a.size:
        return 0.0
    return float(np.maximum(np.abs(_F64(a.max())), np.abs(_F64(a.min()))))


def weight_range_growth(w, w_folded, axis: int | None = None) -> float:
    """Returns ``max|W'| / max|W|``: how folding widened the weight range (for quantisers).

    ``axis`` is accepted for call symmetry and ignored: the range is over the whole tensor.
    Returns 1.0 when both are all zero and inf when only ``W`` is.
    """
    return _growth(_max_abs(w), _max_abs(w_folded))


def channel_max_abs(w, axis: int = 0) -> np.ndarray:
    """Returns per-channel ``max|W|`` along ``axis`` (float64), without a float64 copy of ``W``.

    For ``W' = W * scale`` along ``axis`` it is exact that ``channel_max_abs(W') ==
    channel_max_abs(W) * |scale|`` (float64 rounding is monotone), so a fold can get both range
    metrics from the original weight.
    """
    w = np.asarray(w)
    others = tuple(i for i in range(w.ndim) if i != axis % max(w.ndim, 1))
    hi, lo = (np.asarray(r, dtype=_F64) for r in (w.max(axis=others), w.min(axis=others)))
    return np.maximum(np.abs(hi), np.abs(lo))


def channel_range_imbalance(w_folded, axis: int = 0) -> float:
    """Returns max over channels of per-channel ``max|W'|`` divided by their median.

    A per-tensor quantiser loses the small channels when this is large.

    Args:
        w_folded: Folded weight.
        axis: Output-channel axis. Defaults to 0 (Conv).
    """
    return _imbalance(channel_max_abs(w_folded, axis))


def _imbalance(per_channel: np.ndarray) -> float:
    top, median = float(per_channel.max()), float(np.median(per_channel))
    if median == 0:
        return 1.0 if top == 0 else float("inf")
    return top / median


def _growth(before: float, after: float) -> float:
    if before == 0:
        return 1.0 if after == 0 else float("inf")
    return after / before


def scaled_range_metrics(w, scale, axis: int = 0) -> tuple[float, float]:
    """``weight_range_growth`` and ``channel_range_imbalance`` of ``W * scale`` along ``axis``,
    from ``W`` and ``scale`` alone (no pass over the float64 folded weight).

    Exact, not an estimate: ``channel_max_abs(W * scale) == channel_max_abs(W) * |scale|``.
    """
    before = channel_max_abs(w, axis)
    after = before * np.abs(_vec(scale))
    return _growth(float(before.max()), float(after.max())), _imbalance(after)


def _abs_diff(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise ``|a - b|`` in float64 where equal values (NaN with NaN too) give 0 and a
    NaN on one side gives inf; also returns ``|b|``."""
    a, b = np.asarray(a, dtype=_F64), np.asarray(b, dtype=_F64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    with np.errstate(invalid="ignore"):
        diff = np.where((a == b) | (np.isnan(a) & np.isnan(b)), 0.0, np.abs(a - b))
    return np.where(np.isnan(diff), np.inf, diff), np.abs(b)


def max_abs_rel_diff(a, b, floor: float | None = None) -> tuple[float, float]:
    """Returns ``(max |a - b|, max |a - b| / max(|b|, floor))`` over all elements, float64.

    ``b`` is the reference. The floor keeps near-zero reference values from dominating the
    relative error. NaN in both at the same place is equal; NaN in one only is an infinite
    difference; equal infinities are equal.

    Args:
        a: Values under test.
        b: Reference values, same shape.
        floor: Smallest denominator. Defaults to None: 1e-3 times the largest finite
            ``|b|`` (at least the smallest normal float64).
    """
    diff, ref = _abs_diff(a, b)
    if diff.size == 0:
        return 0.0, 0.0
    if floor is None:
        finite = ref[np.isfinite(ref)]
        floor = 1e-3 * (float(finite.max()) if finite.size else 0.0)
    floor = max(floor, np.finfo(_F64).tiny)
    with np.errstate(invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.maximum(ref, floor))
    rel = np.where(np.isnan(rel), np.inf, rel)  # inf / inf: a NaN or inf on one side only
    return float(diff.max()), float(rel.max())


def relative_error(a, b) -> float:
    """Returns the tensor-wise ``max |a - b| / max |b|`` (NaN rules as in ``max_abs_rel_diff``)."""
    diff, ref = _abs_diff(a, b)
    if diff.size == 0:
        return 0.0
    top = float(ref[np.isfinite(ref)].max()) if np.isfinite(ref).any() else 0.0
    err = float(diff.max())
    return 0.0 if err == 0 else err / max(top, np.finfo(_F64).tiny)
