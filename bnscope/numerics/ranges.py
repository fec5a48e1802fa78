"""Weight ranges before and after a fold: growth of max|W| and imbalance between channels (what
per-tensor int8 quantisation suffers from).
"""

from __future__ import annotations

import numpy as np

from bnscope.numerics.moments import F64, as_vector


def _max_abs(a) -> float:
    # max|a| = max(|max a|, |min a|): two reductions in the native dtype, no float64 copy of the
    # whole tensor (weights reach GBs). Widening to float64 is exact, so the result is the same;
    # np.fmax is not used because a NaN must propagate as np.abs(a).max() would.
    a = np.asarray(a)
    if not a.size:
        return 0.0
    return float(np.maximum(np.abs(F64(a.max())), np.abs(F64(a.min()))))


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
    hi, lo = (np.asarray(r, dtype=F64) for r in (w.max(axis=others), w.min(axis=others)))
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
    after = before * np.abs(as_vector(scale))
    return _growth(float(before.max()), float(after.max())), _imbalance(after)
