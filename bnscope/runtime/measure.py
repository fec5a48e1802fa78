"""Timing and output comparison of onnxruntime sessions.

Timing uses ``time.perf_counter`` around ``InferenceSession.run``; comparison follows
``np.allclose`` with the second argument as the reference: ``|a - b| <= atol + rtol * |b|``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnscope.errors import BnscopeError
from bnscope.runtime.sessions import Session

MAX_TIMED_RUNS = 10_000_000
"""The most timed runs: their times are kept in memory (8 bytes each)."""


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of ``InferenceSession.run`` over ``runs`` calls after ``warmup``."""

    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    runs: int
    warmup: int
    batch_size: int
    throughput_samples_per_s: float


def time_session(
    session: Session, feeds: Mapping[str, Any], warmup: int = 5, runs: int = 50, *, batch_size: int | None = None
) -> LatencyStats:
    """Time ``session`` on ``feeds`` with ``time.perf_counter``.

    Args:
        session: The session to time.
        feeds: One batch of inputs (checked once, then run unchanged).
        warmup: Untimed runs first. Defaults to 5.
        runs: Timed runs. Defaults to 50.
        batch_size: Samples per run for throughput. Defaults to None (the first input's
            leading dimension, or 1 for a scalar input).
    """
    if warmup < 0 or not 1 <= runs <= MAX_TIMED_RUNS:
        raise BnscopeError(
            f"need warmup >= 0 and runs >= 1 (at most {MAX_TIMED_RUNS}), got warmup={warmup}, runs={runs}. "
            "Hint: use e.g. warmup=5, runs=50"
        )
    arrays = session.check_feeds(feeds)
    session.run(arrays)  # turns a first-run error into a BnscopeError; counts as warm-up
    for _ in range(max(warmup - 1, 0)):
        session.inner.run(None, arrays)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        session.inner.run(None, arrays)
        times[i] = time.perf_counter() - start
    times_ms = times * 1e3
    if batch_size is None:
        first = next(iter(arrays.values()), np.empty(()))
        batch_size = int(first.shape[0]) if first.ndim else 1
    median = float(np.median(times_ms))
    return LatencyStats(
        median_ms=median,
        p90_ms=float(np.percentile(times_ms, 90)),
        min_ms=float(times_ms.min()),
        mean_ms=float(times_ms.mean()),
        runs=runs,
        warmup=warmup,
        batch_size=batch_size,
        throughput_samples_per_s=batch_size / (median / 1e3) if median > 0 else float("inf"),
    )


@dataclass(frozen=True)
class OutputDiff:
    """How one output of run ``a`` differs from the reference run ``b``.

    ``max_abs`` and ``max_rel`` cover the elements finite in both; a NaN/inf mismatch makes
    them ``inf``. ``reason`` says why a comparison failed beyond tolerance (shape, NaN).
    """

    name: str
    max_abs: float
    max_rel: float
    passed: bool
    shape: tuple[int, ...]
    dtype: str
    atol: float = 0.0
    rtol: float = 0.0
    reason: str | None = None
    floor: float | None = None
    ratio: float | None = None
    judged_by: str | None = None  # "floor" or "tolerance" where a verification judged it

    def to_dict(self, *, tolerances: bool = True) -> dict:
        """The JSON form; ``tolerances=False`` leaves out atol, rtol and reason."""
        d = {"name": self.name, "max_abs": self.max_abs, "max_rel": self.max_rel, "passed": self.passed}
        if tolerances:
            d.update(atol=self.atol, rtol=self.rtol, reason=self.reason)
        if self.judged_by is not None:
            d.update(floor=self.floor, ratio=self.ratio, judged_by=self.judged_by)
        return d


def default_tolerances(dtype: Any) -> tuple[float, float]:
    """``(atol, rtol)`` for comparing two runs of the same model computed in ``dtype``.

    Two correct runs differ by rounding: a fold, a layout change or another kernel reorders
    sums of length K (hundreds to thousands in Conv/Gemm), costing up to about K * eps
    relative, compounded over layers.
    - float64 (eps 2.2e-16): (1e-9, 1e-7), far above rounding, far below any real error.
    - float32 (eps 1.2e-7): (1e-4, 1e-4), about 1000 eps.
    - float16 (eps 9.8e-4): (1e-2, 1e-2), about 10 eps; mean relative errors of fp16 models
      against an fp32 twin measure 3e-4 to 6e-4, and the max over elements is larger.
    - bfloat16 (eps 7.8e-3): (5e-2, 5e-2), about 6 eps.
    - float8 types: (1.25e-1, 1.25e-1). Integers, bool and strings: (0, 0), exact.
    """
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    table = {"float64": (1e-9, 1e-7), "float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2), "bfloat16": (5e-2, 5e-2)}
    if name in table:
        return table[name]
    if name.startswith("float8"):
        return 1.25e-1, 1.25e-1
    return 0.0, 0.0


def compare_outputs(
    a: Mapping[str, np.ndarray],
    b: Mapping[str, np.ndarray],
    atol: float | Mapping[str, float] | None = None,
    rtol: float | Mapping[str, float] | None = None,
) -> list[OutputDiff]:
    """Compare outputs of ``a`` with the reference ``b``, output by output, in ``a``'s order.

    An element passes when ``|a - b| <= atol + rtol * |b|`` (``np.allclose``); NaN matches
    NaN in the same place, an infinity matches the same infinity, anything else non-finite
    fails. Computed in float64.

    Args:
        a: Output name to array (e.g. the folded model).
        b: Output name to array (the reference); must have the same names.
        atol: A number, a per-output mapping, or None for ``default_tolerances`` of ``b``'s dtype.
        rtol: Likewise.

    Raises:
        BnscopeError: the two sets of outputs have different names.
    """
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise BnscopeError(
            f"the outputs differ: only in the first {only_a}, only in the reference "
            f"{only_b}. Hint: compare models with the same output names"
        )
    return [_compare_one(name, np.asarray(a[name]), np.asarray(b[name]), atol, rtol) for name in a]


def _pick(value: float | Mapping[str, float] | None, name: str, default: float) -> float:
    if isinstance(value, Mapping):
        value = value.get(name)
    return default if value is None else float(value)


def _compare_one(name: str, x: np.ndarray, ref: np.ndarray, atol: Any, rtol: Any) -> OutputDiff:
    default_atol, default_rtol = default_tolerances(ref.dtype)
    at, rt = _pick(atol, name, default_atol), _pick(rtol, name, default_rtol)
    base = dict(name=name, shape=tuple(ref.shape), dtype=ref.dtype.name, atol=at, rtol=rt)
    if x.shape != ref.shape:
        return OutputDiff(
            max_abs=float("inf"),
            max_rel=float("inf"),
            passed=False,
            reason=f"shape {x.shape} != reference {ref.shape}",
            **base,
        )
    if x.dtype.kind in "OSU" or ref.dtype.kind in "OSU":
        same = bool(np.array_equal(x, ref))
        return OutputDiff(
            max_abs=0.0 if same else float("inf"),
            max_rel=0.0 if same else float("inf"),
            passed=same,
            reason=None if same else "non-numeric values differ",
            **base,
        )
    x64, r64 = x.astype(np.float64), ref.astype(np.float64)
    finite = np.isfinite(x64) & np.isfinite(r64)
    diff = np.abs(np.subtract(x64, r64, out=np.zeros_like(x64), where=finite))
    scale = np.abs(np.where(finite, r64, 0.0))
    ok = np.where(finite, diff <= at + rt * scale, _same_nonfinite(x64, r64))
    rel = np.divide(diff, scale, out=np.where(diff > 0, np.inf, 0.0), where=scale > 0)
    bad_nonfinite = int(np.count_nonzero(~finite & ~ok))
    max_abs = float(diff.max(initial=0.0)) if not bad_nonfinite else float("inf")
    max_rel = float(rel.max(initial=0.0)) if not bad_nonfinite else float("inf")
    passed = bool(ok.all())
    reason = None
    if bad_nonfinite:
        reason = f"{bad_nonfinite} NaN/inf element(s) do not match the reference"
    elif not passed:
        reason = f"{int(np.count_nonzero(~ok))} of {ok.size} element(s) outside tolerance"
    return OutputDiff(max_abs=max_abs, max_rel=max_rel, passed=passed, reason=reason, **base)


def _same_nonfinite(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return (np.isnan(x) & np.isnan(ref)) | (np.isinf(x) & (x == ref))


def merge_diffs(per_batch: list[list[OutputDiff]]) -> list[OutputDiff]:
    """Worst case over batches, per output."""
    merged = []
    for diffs in zip(*per_batch):
        worst = max(diffs, key=lambda d: (not d.passed, d.max_abs))
        merged.append(
            OutputDiff(
                **{
                    **worst.__dict__,
                    "max_abs": max(d.max_abs for d in diffs),
                    "max_rel": max(d.max_rel for d in diffs),
                    "passed": all(d.passed for d in diffs),
                }
            )
        )
    return merged
