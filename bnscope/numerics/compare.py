"""Comparing outputs: max absolute and relative differences, relative error."""

from __future__ import annotations

import numpy as np

from bnscope.numerics.moments import F64


def _abs_diff(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise ``|a - b|`` in float64 where equal values (NaN with NaN too) give 0 and a
    NaN on one side gives inf; also returns ``|b|``."""
    a, b = np.asarray(a, dtype=F64), np.asarray(b, dtype=F64)
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
    floor = max(floor, np.finfo(F64).tiny)
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
    return 0.0 if err == 0 else err / max(top, np.finfo(F64).tiny)


FLOOR_MULTIPLE = 4.0
"""A transformed model passes when every output differs from the original's by at most this many
times the original's own float floor (:func:`floor_ratio`); see docs/fold.md for the measurements."""


def nudge(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Returns ``values`` with every nonzero finite element moved one unit in the last place of its
    dtype, away from or towards zero at random: about ``w * (1 +- eps)``, a different but equally
    valid rounding of each weight. Zeros stay zero (a zero weight is exact, not rounded), and so do
    infinities, NaN and the largest finite values' step to infinity.

    One step of an IEEE float's bit pattern, read as an integer, is one ulp of its magnitude, so
    this is an integer add (``np.nextafter`` in both directions took 4 s on ResNet-18's 11.7M weights).
    """
    ints = np.dtype(f"i{values.dtype.itemsize}")
    bits = np.ascontiguousarray(values).view(ints)
    step = (np.frombuffer(rng.bytes(values.size), np.uint8) & 1).astype(np.int8) * 2 - 1
    moved = (bits + step.reshape(values.shape)).astype(ints).view(values.dtype)
    keep = (values == 0) | ~np.isfinite(values) | ~np.isfinite(moved)
    return np.where(keep, values, moved)


def floor_ratio(diff: float, floor: float, reference_max: float, eps: float) -> tuple[float, float]:
    """Returns ``(floor used, diff / floor used)`` for one output.

    The floor used is at least ``eps * reference_max`` (one unit in the last place of the output's
    largest value), so an output that no weight reaches (floor 0) still allows the rounding of one
    reordered operation, and nothing more. A NaN/inf difference gives an infinite ratio.

    Args:
        diff: The largest absolute difference of the output under test.
        floor: The largest absolute difference the original's own nudged runs showed.
        reference_max: The largest finite absolute value of the reference output.
        eps: Machine epsilon of the output's dtype.
    """
    used = max(floor, eps * reference_max)
    if not np.isfinite(diff):
        return used, float("inf")
    if diff == 0:
        return used, 0.0
    return used, (diff / used if used > 0 else float("inf"))
