"""The precision plan: the fewest 16-bit activation tensors, in risk order, that reach a target SQNR.

The units (a layer's chain of tensors, or one tensor) are ordered riskiest first. The search
measures, never only predicts: it quantises with the first ``n`` units at 16 bits and measures the
held-out SQNR, for ``n = 0, 1, 2, 4, ...`` until the target is reached (or every unit is at 16 bits),
then bisects between the last ``n`` that missed and the first that reached it. Every step is one
``quantize_static`` with the calibration reused, so the search costs ``O(log units)`` quantisations.
The SQNR is not monotone in ``n`` in general; the search returns the smallest ``n`` it *measured*
reaching the target, never one it assumed. :func:`prune` then hands units back to 8 bits, least risky
first, in halving chunks, keeping every hand-back after which the target is still measured: damage
concentrates in few tensors (on PicoDet one concatenation alone costs 20 dB), so a prefix in any
predicted order holds many units that do not need 16 bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    units: int
    tensors: int
    sqnr_db: float


@dataclass(frozen=True)
class PlanSearch:
    chosen: int  # units at 16 bits
    reached: bool
    steps: tuple[Step, ...]


def tensors_of(units: Sequence[Sequence[str]], n: int) -> list[str]:
    """The distinct tensors of the first ``n`` units, in order."""
    seen: dict[str, None] = {}
    for unit in units[:n]:
        seen.update(dict.fromkeys(unit))
    return list(seen)


def search(units: Sequence[Sequence[str]], measure: Callable[[list[str]], float], target_db: float) -> PlanSearch:
    """Smallest measured ``n`` with ``measure(tensors_of(units, n)) >= target_db``, by doubling then bisection."""
    steps: dict[int, Step] = {}

    def sqnr(n: int) -> float:
        if n not in steps:
            tensors = tensors_of(units, n)
            steps[n] = Step(n, len(tensors), measure(tensors))
        return steps[n].sqnr_db

    total = len(units)
    if sqnr(0) >= target_db or total == 0:
        return PlanSearch(0, sqnr(0) >= target_db, tuple(steps.values()))
    low, high = 0, 1
    while sqnr(high) < target_db:
        if high == total:
            best = max(steps.values(), key=lambda s: s.sqnr_db)
            return PlanSearch(best.units, False, tuple(sorted(steps.values(), key=lambda s: s.units)))
        low, high = high, min(high * 2, total)
    while high - low > 1:
        middle = (low + high) // 2
        if sqnr(middle) >= target_db:
            high = middle
        else:
            low = middle
    return PlanSearch(high, True, tuple(sorted(steps.values(), key=lambda s: s.units)))


def prune(
    units: Sequence[Sequence[str]], measure: Callable[[list[str]], float], target_db: float
) -> tuple[list[Sequence[str]], list[Step]]:
    """Units of a plan that reaches ``target_db`` handed back to 8 bits (in halving chunks from the least
    risky end) wherever the target is still measured after. Returns the units kept and the steps."""
    keep, steps = list(units), []
    size = len(keep) // 2
    while size >= 1:
        end = len(keep)
        while end > 0:
            start = max(0, end - size)
            trial = keep[:start] + keep[end:]
            tensors = tensors_of(trial, len(trial))
            sqnr = measure(tensors)
            steps.append(Step(len(trial), len(tensors), sqnr))
            if sqnr >= target_db:
                keep = trial
            end = start
        size //= 2
    return keep, steps
