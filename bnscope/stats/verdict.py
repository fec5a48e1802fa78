"""A verdict per BN layer from its drift metrics and their standard errors, and short notes.

Verdicts, first match wins: ``broken`` (NaN/Inf in batch or running statistics, or in epsilon), ``dead`` (most
channels have zero batch variance), ``stale`` (running mean 0 / var 1 everywhere, or the median
channel beyond ``stale_d`` / ``stale_log_r`` by two standard errors: the running statistics match no
batch), ``drift``
(more than ``max_fraction`` of the channels beyond ``max_d`` or ``max_log_r`` by more than two
standard errors: not noise), ``unsure`` (more than ``max_fraction`` of the channels beyond a
threshold but within two standard errors of it, or measured too coarsely to tell |d| = 0 from
``max_d``: more data decide), else ``ok``. The standard errors keep noise from being called drift.
Then the diagnosis names causes (:func:`bnscope.stats.diagnosis.cause_verdicts`): a root cause's
layer gets its cause's verdict (``stale`` for stale or never-updated statistics, else ``drift``),
and a layer that drifts only because of one before it gets ``inherited``. :data:`VERDICT_TABLE`
defines them all, and what the CI gate does with each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bnscope import numerics
from bnscope.numerics import confidence


@dataclass(frozen=True)
class Verdict:
    """What a verdict means, and what the CI gate (:mod:`bnscope.stats.gate`) does with it."""

    meaning: str
    gate: str  # "pass", "unsure" (passes unless --strict, with a warning) or "fail"


VERDICT_TABLE = {
    "ok": Verdict("batch statistics agree with the running statistics (within the thresholds or the noise)", "pass"),
    "drift": Verdict(
        "a cause of its own: more than max_fraction of the channels beyond a threshold by more than 2 standard "
        "errors (the diagnosis names the cause)",
        "fail",
    ),
    "stale": Verdict(
        "a cause of its own: the running statistics match no batch of the data (median channel far beyond the "
        "thresholds, never updated, or the diagnosis's stale_layers / never_updated)",
        "fail",
    ),
    "inherited": Verdict(
        "drifts only because a layer before it is a cause (its cause reads 'after X'): fixing X fixes it",
        "fail",
    ),
    "unsure": Verdict(
        "beyond a threshold only within the noise, or measured too coarsely: more samples decide", "unsure"
    ),
    "dead": Verdict("most channels have zero batch variance: the layer's input is constant", "fail"),
    "broken": Verdict("NaN/Inf in the batch or running statistics, or in epsilon", "fail"),
}
"""Every verdict a layer can get, defined once: the renderers, the gate and docs/stats.md read it."""
VERDICTS = tuple(VERDICT_TABLE)


@dataclass(frozen=True)
class Thresholds:
    """When a channel drifts, and when a layer's verdict changes. Defaults suit fp32 CNNs.

    A channel drifts when |d| > max_d or |log r| > max_log_r; a layer drifts when more than
    max_fraction of its channels do (by more than two standard errors). A layer is stale when
    its median channel is beyond stale_d or stale_log_r (its running statistics match no batch),
    dead when most channels' batch variance is zero.
    """

    max_d: float = 0.5
    max_log_r: float = 0.25
    max_fraction: float = 0.05
    stale_d: float = 3.0
    stale_log_r: float = 1.0
    per_layer_max_d: dict = field(default_factory=dict)
    per_layer_max_log_r: dict = field(default_factory=dict)

    def limits(self, name: str) -> tuple[float, float]:
        """This layer's (max_d, max_log_r)."""
        return self.per_layer_max_d.get(name, self.max_d), self.per_layer_max_log_r.get(name, self.max_log_r)


@dataclass(frozen=True)
class ChannelCalls:
    """Per-channel comparisons with the thresholds: point estimate, sure, too coarse."""

    over: np.ndarray
    sure: np.ndarray
    coarse: np.ndarray


def channel_calls(drift, errors: confidence.DriftErrors, max_d: float, max_log_r: float) -> ChannelCalls:
    with np.errstate(invalid="ignore"):
        over = (np.abs(drift.d) > max_d) | (np.abs(drift.log_r) > max_log_r)
    sure = confidence.sure_over(drift.d, errors.se_d, max_d) | confidence.sure_over(
        drift.log_r, errors.se_log_r, max_log_r
    )
    return ChannelCalls(over, sure, confidence.unresolved(errors.se_d, max_d))


def samples_to_decide(
    drift, errors, calls: ChannelCalls, max_d: float, max_log_r: float, samples: int, t
) -> int | None:
    """Samples that would decide an ``unsure`` layer, if the estimates hold: at least
    ``MIN_EFFECTIVE`` independent values per channel; |d| resolved to ``max_d`` in all but
    ``max_fraction`` of the channels (as the verdict asks); and, per channel
    beyond a threshold, samples * (2 se / (|value| - limit))^2 for more than ``max_fraction`` of
    the channels (only once there are ``MIN_EFFECTIVE`` values: below, |value| - limit is noise)."""
    n_eff = float(np.median(errors.n_eff)) if errors.n_eff.size else 0.0
    floor = math.ceil(samples * confidence.MIN_EFFECTIVE / max(n_eff, 1.0))
    se_d = np.sort(errors.se_d[np.isfinite(errors.se_d)])[::-1]  # largest first
    k = min(int(np.floor(t.max_fraction * se_d.size)), se_d.size - 1)  # the verdict lets k channels stay coarse
    worst = float(se_d[k]) if se_d.size else float("nan")
    needed = [floor, confidence.samples_to_resolve(worst, samples, max_d) or 0]
    if n_eff >= confidence.MIN_EFFECTIVE and (calls.over & ~calls.sure).any():
        with np.errstate(all="ignore"):
            need_d = samples * (confidence.Z * errors.se_d / (np.abs(drift.d) - max_d)) ** 2
            need_r = samples * (confidence.Z * errors.se_log_r / (np.abs(drift.log_r) - max_log_r)) ** 2
        need_d = np.where(np.abs(drift.d) > max_d, need_d, np.inf)
        need_r = np.where(np.abs(drift.log_r) > max_log_r, need_r, np.inf)
        need = np.sort(np.where(calls.sure, samples, np.minimum(need_d, need_r)))
        k = min(int(np.floor(t.max_fraction * need.size)), need.size - 1)
        needed.append(int(np.ceil(need[k])) if np.isfinite(need[k]) else 0)
    return max(needed) if max(needed) > samples else None


def layer_verdict(
    bm, bv, rm, rv, eps, drift, errors, calls: ChannelCalls, t: Thresholds, max_d: float, max_log_r: float
) -> tuple[str, str]:
    """(verdict, why) for one layer; see the module docstring for the order."""
    if not math.isfinite(eps):
        return "broken", f"epsilon {eps} is not finite: every output of the layer is NaN"
    stats = np.stack([bm, bv, rm, rv])
    if not np.all(np.isfinite(stats)):
        bad = np.flatnonzero(~np.isfinite(stats).all(axis=0))
        return "broken", f"NaN/Inf in {bad.size} channel(s) of batch or running statistics"
    if np.mean(bv <= 1e-6 * (rv + eps)) >= 0.5:
        return "dead", "most channels have (near) zero batch variance: the input is constant"
    if numerics.never_updated(rm, rv):
        return "stale", "running statistics were never updated (mean 0, var 1)"
    med_d, med_r = float(np.median(np.abs(drift.d))), float(np.median(np.abs(drift.log_r)))
    sure_d = med_d - confidence.Z * float(np.median(errors.se_d)) > t.stale_d
    sure_r = med_r - confidence.Z * float(np.median(errors.se_log_r)) > t.stale_log_r
    if sure_d or sure_r:
        return "stale", f"median |d| {med_d:.2f}, median |log r| {med_r:.2f}: running statistics match no batch"
    n_eff = float(np.median(errors.n_eff)) if errors.n_eff.size else 0.0
    if n_eff < confidence.MIN_EFFECTIVE:
        return "unsure", f"too few samples: about {n_eff:.0f} independent values per channel"
    sure, over, coarse = (float(np.mean(a)) if a.size else 0.0 for a in (calls.sure, calls.over, calls.coarse))
    if sure > t.max_fraction:
        return "drift", f"{sure:.0%} of channels beyond |d| > {max_d:g} or |log r| > {max_log_r:g} by > 2 s.e."
    if over > t.max_fraction:
        return "unsure", f"{over:.0%} of channels beyond a threshold, but within 2 standard errors: more data decide"
    if coarse > t.max_fraction:
        return "unsure", f"too few samples: 2 standard errors of d exceed {max_d:g} in {coarse:.0%} of channels"
    return "ok", ""


def reading(layers, is_random: bool) -> tuple[str, ...]:
    """Short plain-words notes on the data and the verdicts; causes are the diagnosis's job."""
    notes = []
    if is_random:
        notes.append("RANDOM DATA: these statistics say nothing about real data; pass --data to measure drift")
        notes.append("random data cannot show a cause: no diagnosis (pass --data for one)")
    if not layers:
        return tuple(notes + ["no BatchNormalization layer had statistics to compare"])
    if all(layer.verdict == "ok" for layer in layers):
        return tuple(notes + ["batch statistics agree with the running statistics in every layer"])
    if any(layer.verdict == "broken" for layer in layers):
        notes.append("NaN/Inf in statistics: check the data for NaN and the model's parameters (bnscope inspect)")
    counts = {v: sum(layer.verdict == v for layer in layers) for v in VERDICTS if v != "ok"}
    notes.append(", ".join(f"{n} of {len(layers)} layers {v}" for v, n in counts.items() if n))
    return tuple(notes)
