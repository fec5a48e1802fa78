"""One meaning of "fail" for CI, asked by ``stats --fail-on-drift`` and ``check`` alike.

A layer *fails* when its drift is decided: beyond the threshold by more than the noise (the point
estimate minus ``confidence.Z`` standard errors is still beyond it, as the verdicts decide drift).
A layer that is beyond the threshold only within its noise is *unsure*: it passes, with one warning
line naming it and the samples that would decide it, unless ``strict`` (then it fails too).
Everything else passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bnscope.numerics import confidence
from bnscope.stats.verdict import VERDICT_TABLE

PASS, UNSURE, FAIL = "pass", "unsure", "fail"


@dataclass(frozen=True)
class Call:
    """One layer's outcome at the gate, and for ``unsure`` the samples that would decide it."""

    outcome: str
    samples_to_decide: int | None = None

    def fails(self, strict: bool) -> bool:
        return fails(self.outcome, strict)


def fails(outcome: str, strict: bool = False) -> bool:
    """The gate: a decided failure fails; ``unsure`` fails only when ``strict``."""
    return outcome == FAIL or (strict and outcome == UNSURE)


def verdict_call(layer) -> Call:
    """``stats``: a layer's verdict at the gate (:data:`bnscope.stats.verdict.VERDICT_TABLE` says
    which verdicts fail)."""
    return Call(VERDICT_TABLE[layer.verdict].gate, layer.samples_to_decide if layer.verdict == "unsure" else None)


def limit_call(values, se, limit: float, samples: int) -> Call:
    """``check``: a layer's channels (``values``, their standard errors ``se``) against one limit.

    Fails when a channel is beyond ``limit`` by more than ``Z`` standard errors, or is not finite;
    unsure when a channel is beyond it only within them (then the samples that would decide the
    nearest one, if its estimate holds: samples * (Z se / (|value| - limit))^2); else passes."""
    values = np.abs(np.asarray(values, np.float64))
    if values.size == 0:
        return Call(PASS)
    if not np.all(np.isfinite(values)):
        return Call(FAIL)
    se = np.asarray(se, np.float64) if se is not None else np.full(values.shape, np.inf)
    if confidence.sure_over(values, se, limit).any():
        return Call(FAIL)
    over = values > limit
    if not over.any():
        return Call(PASS)
    with np.errstate(all="ignore"):
        need = samples * (confidence.Z * se[over] / (values[over] - limit)) ** 2
    need = need[np.isfinite(need)]
    return Call(UNSURE, max(samples + 1, math.ceil(float(need.min()))) if need.size and samples else None)


def unsure_warning(unsure: dict[str, int | None], strict: bool) -> str | None:
    """The one warning line for the unsure layers that pass (layer -> samples that would decide it);
    none under ``strict``, where they fail and the report lists them."""
    if not unsure or strict:
        return None
    shown = [f"{name} (about {n} samples decide)" if n else name for name, n in list(unsure.items())[:6]]
    more = f" and {len(unsure) - 6} more" if len(unsure) > 6 else ""
    return (
        f"unsure: {len(unsure)} layer(s) the data cannot decide, so they pass (--strict fails them): "
        f"{', '.join(shown)}{more}"
    )
