"""Turn collected moments into drift metrics, verdicts and a diagnosis per BN layer: ``summarize``.

d = (mu_b - mu_r) / sqrt(var_r + eps); log r = 0.5 log((var_b + eps) / (var_r + eps)), each with
its standard error (:mod:`bnscope.numerics.confidence`); verdicts in :mod:`bnscope.stats.verdict`,
causes in :mod:`bnscope.stats.diagnosis`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from bnscope import numerics
from bnscope.data.spec import DataSource
from bnscope.numerics import confidence
from bnscope.schema import SCHEMA_VERSION
from bnscope.stats.collect import CollectedMoments, LayerMoments
from bnscope.stats.diagnosis import Finding, cause_verdicts, diagnose, layer_causes, sample_budget
from bnscope.stats.gate import UNSURE, verdict_call
from bnscope.stats.references import LayerReference, layer_references
from bnscope.stats.verdict import VERDICTS, Thresholds, channel_calls, layer_verdict, reading, samples_to_decide

__all__ = [
    "VERDICTS",
    "LayerReference",
    "LayerStats",
    "StatsResult",
    "Thresholds",
    "layer_references",
    "summarize",
]

# -- from moments to a report -------------------------------------------------------------------


@dataclass(frozen=True)
class LayerStats:
    name: str
    index: int
    channels: int
    count: int
    strategy: str
    epsilon: float
    batch_mean: np.ndarray
    batch_var: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    d: np.ndarray
    log_r: np.ndarray
    kl: np.ndarray
    batch_mean_spread: np.ndarray  # std over batches of the per-batch mean, per channel
    batches: int
    fraction_over: float
    worst_channels: tuple[int, ...]
    verdict: str
    why: str
    se_d: np.ndarray | None = None  # standard error of d per channel
    se_log_r: np.ndarray | None = None
    samples: int = 0
    fraction_sure: float = 0.0  # channels beyond a threshold by more than 2 standard errors
    samples_to_decide: int | None = None  # for an unsure layer: samples that would decide it

    @property
    def max_se_d(self) -> float:
        """The largest standard error of d over the channels: how finely the data resolve |d|."""
        return _nanmax(self.se_d) if self.se_d is not None else float("nan")

    def samples_to_resolve(self, resolution: float) -> int | None:
        """Samples that know every channel's |d| to within ``resolution`` (2 standard errors)."""
        return confidence.samples_to_resolve(self.max_se_d, self.samples, resolution)

    @property
    def max_abs_d(self) -> float:
        return _nanmax(np.abs(self.d))

    @property
    def mean_abs_d(self) -> float:
        return _nanmean(np.abs(self.d))

    @property
    def max_abs_log_r(self) -> float:
        return _nanmax(np.abs(self.log_r))

    @property
    def mean_abs_log_r(self) -> float:
        return _nanmean(np.abs(self.log_r))

    @property
    def noise(self) -> float:
        """Median over channels of batch-mean spread / batch std: BN's own noise at this batch size."""
        if self.batches < 2:
            return float("nan")
        with np.errstate(all="ignore"):
            ratio = self.batch_mean_spread / np.sqrt(self.batch_var + self.epsilon)
        finite = ratio[np.isfinite(ratio)]
        return float(np.median(finite)) if finite.size else float("nan")

    def to_dict(self, per_channel: bool = False) -> dict:
        d = {
            "name": self.name,
            "index": self.index,
            "channels": self.channels,
            "count": self.count,
            "strategy": self.strategy,
            "verdict": self.verdict,
            "why": self.why,
            "max_abs_d": self.max_abs_d,
            "mean_abs_d": self.mean_abs_d,
            "max_abs_log_r": self.max_abs_log_r,
            "mean_abs_log_r": self.mean_abs_log_r,
            "max_kl": _nanmax(self.kl),
            "fraction_over": self.fraction_over,
            "worst_channels": list(self.worst_channels),
            "batch_mean_noise": self.noise,
            "max_se_d": self.max_se_d,
            "max_se_log_r": _nanmax(self.se_log_r) if self.se_log_r is not None else float("nan"),
            "fraction_sure": self.fraction_sure,
            "samples_to_decide": self.samples_to_decide,
        }
        if per_channel:
            for key in (
                "batch_mean",
                "batch_var",
                "running_mean",
                "running_var",
                "d",
                "log_r",
                "kl",
                "batch_mean_spread",
                "se_d",
                "se_log_r",
            ):
                if getattr(self, key) is None:
                    continue
                d[key] = getattr(self, key).tolist()
        return d


@dataclass(frozen=True)
class StatsResult:
    model: str
    mode: str
    data: dict
    layers: tuple[LayerStats, ...]
    skipped: dict
    thresholds: Thresholds
    reading: tuple[str, ...]
    diagnosis: tuple[Finding, ...] = ()
    companion_mode: str | None = None  # the mode of the second pass behind the diagnosis, if any
    companion: tuple[LayerStats, ...] = ()

    def companion_of(self, name: str) -> LayerStats | None:
        """This layer measured in the other mode, when the diagnosis ran a second pass."""
        return next((layer for layer in self.companion if layer.name == name), None)

    def counts(self) -> dict[str, int]:
        return {v: sum(layer.verdict == v for layer in self.layers) for v in VERDICTS}

    @property
    def passed(self) -> bool:
        """:meth:`passes` without ``strict``: ``unsure`` (the data cannot tell) does not fail."""
        return self.passes()

    def passes(self, strict: bool = False) -> bool:
        """Every BN measured (none ``skipped``: in a control-flow subgraph, parameters not constant) and
        no layer fails the gate (:mod:`bnscope.stats.gate`); ``strict``: no layer is ``unsure`` either."""
        return not self.skipped and not any(verdict_call(layer).fails(strict) for layer in self.layers)

    def unsure(self) -> dict[str, int | None]:
        """The ``unsure`` layers and the samples that would decide each (the gate's warning)."""
        return {layer.name: layer.samples_to_decide for layer in self.layers if verdict_call(layer).outcome == UNSURE}

    def to_dict(self, per_channel: bool = False) -> dict:
        """Summary and per-layer figures; ``per_channel`` adds every layer's per-channel arrays."""
        first = next((layer.name for layer in self.layers if layer.verdict != "ok"), None)
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "mode": self.mode,
            "data": self.data,
            "thresholds": dict(self.thresholds.__dict__.items()),
            "layers": [self._layer_dict(layer, per_channel) for layer in self.layers],
            "skipped": [{"name": k, "reason": v} for k, v in self.skipped.items()],
            "summary": {
                "layers": len(self.layers),
                "verdicts": self.counts(),
                "first_not_ok": first,
                "reading": list(self.reading),
                "diagnosis": [f.to_dict() for f in self.diagnosis],
                "diagnosis_basis": "eval and train" if self.companion_mode else f"{self.mode} only",
                "sample_budget": sample_budget(self.layers, self.thresholds),
            },
        }

    def causes(self) -> dict[str, str]:
        """Layer -> its cause in the diagnosis, or "after X" when it drifts only because of X."""
        return layer_causes(self.diagnosis)

    def _layer_dict(self, layer: LayerStats, per_channel: bool) -> dict:
        d = layer.to_dict(per_channel)
        d["cause"] = self.causes().get(layer.name)
        other = self.companion_of(layer.name)
        if other is not None:
            d["other_mode"] = {
                "mode": self.companion_mode,
                "verdict": other.verdict,
                "max_abs_d": other.max_abs_d,
                "max_abs_log_r": other.max_abs_log_r,
            }
        return d


def _nanmax(a: np.ndarray) -> float:
    return float(np.nanmax(a)) if a.size and not np.all(np.isnan(a)) else float("nan")


def _nanmean(a: np.ndarray) -> float:
    return float(np.nanmean(a)) if a.size and not np.all(np.isnan(a)) else float("nan")


def layer_stats(
    name: str, collected: LayerMoments, ref: LayerReference, thresholds: Thresholds, samples: int = 0
) -> LayerStats:
    """Drift metrics, their standard errors and the verdict of one layer (``samples``: data samples)."""
    eps, running_mean, running_var = ref.epsilon, ref.running_mean, ref.running_var
    moments, spread = collected.moments, collected.spread
    batch_mean, batch_var = moments.mean, moments.variance()
    drift = numerics.drift_metrics(batch_mean, batch_var, running_mean, running_var, eps)
    errors = confidence.drift_errors(
        batch_var, running_var, eps, spread.std(), spread.batches, samples or spread.batches, moments.count
    )
    max_d, max_log_r = thresholds.limits(name)
    calls = channel_calls(drift, errors, max_d, max_log_r)
    with np.errstate(invalid="ignore"):
        score = np.nan_to_num(np.abs(drift.d), nan=np.inf) + np.nan_to_num(np.abs(drift.log_r), nan=np.inf)
    worst = tuple(int(i) for i in np.argsort(-score, kind="stable")[:5])
    fraction = float(calls.over.mean()) if calls.over.size else 0.0
    verdict, why = layer_verdict(
        batch_mean, batch_var, running_mean, running_var, eps, drift, errors, calls, thresholds, max_d, max_log_r
    )
    unsure = verdict == "unsure"
    decide = samples_to_decide(drift, errors, calls, max_d, max_log_r, samples, thresholds) if unsure else None
    return LayerStats(
        name,
        ref.index,
        batch_mean.shape[0],
        moments.count,
        collected.strategy,
        eps,
        batch_mean,
        batch_var,
        running_mean,
        running_var,
        drift.d,
        drift.log_r,
        drift.kl,
        spread.std(),
        spread.batches,
        fraction,
        worst,
        verdict,
        why,
        errors.se_d,
        errors.se_log_r,
        samples,
        float(calls.sure.mean()) if calls.sure.size else 0.0,
        decide,
    )


def summarize(
    model: str,
    collected: CollectedMoments,
    references: dict[str, LayerReference],
    data: dict,
    mode: str,
    thresholds: Thresholds = Thresholds(),
    *,
    companion: CollectedMoments | None = None,
    upstream: Mapping[str, set[str]] | None = None,
) -> StatsResult:
    """Moments + references -> drift metrics, verdicts, the reading and the diagnosis. Needs no model.

    Args:
        companion: Moments of the same data collected in the other mode (eval <-> train); with
            them the diagnosis tells a layer's own drift from the drift it inherits.
        upstream: For every layer, the layers its input depends on (``stats.lineage.bn_upstream``).
            Defaults to None: every earlier layer.
    """
    layers = _layers(collected, references, thresholds)
    other = _layers(companion, references, thresholds) if companion is not None else ()
    companion_mode = ("train" if mode == "eval" else "eval") if companion is not None else None
    data = {
        **data,
        "samples": collected.samples,
        "batches": collected.batches,
        "nonfinite_values": collected.nonfinite_inputs,
    }
    by_mode = {mode: layers, companion_mode: other} if companion_mode else {mode: layers}
    # random inputs differ from training everywhere: no cause can show in them (reading says so)
    random = bool(data.get("random"))
    findings = () if random else diagnose(by_mode.get("eval"), by_mode.get("train"), upstream, thresholds)
    layers = cause_verdicts(layers, findings)
    notes = reading(layers, random)
    return StatsResult(model, mode, data, layers, collected.skipped, thresholds, notes, findings, companion_mode, other)


def _layers(collected: CollectedMoments, references: dict, thresholds: Thresholds) -> tuple[LayerStats, ...]:
    names = sorted(collected.layers, key=lambda n: references[n].index)
    return tuple(layer_stats(n, collected.layers[n], references[n], thresholds, collected.samples) for n in names)


def data_description(source: DataSource) -> dict:
    return {"source": source.description, "random": source.is_random}
