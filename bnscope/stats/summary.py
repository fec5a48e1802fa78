"""Turn collected moments into drift metrics and verdicts per BN layer: ``summarize``.

d = (mu_b - mu_r) / sqrt(var_r + eps); log r = 0.5 log((var_b + eps) / (var_r + eps)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnscope import numerics
from bnscope.data.spec import (
    DataSource,
)
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.nodes import bn_attributes
from bnscope.schema import SCHEMA_VERSION
from bnscope.stats.collect import CollectedMoments, LayerMoments

# -- from moments to a report -------------------------------------------------------------------


VERDICTS = ("ok", "drift", "stale", "dead", "broken")


@dataclass(frozen=True)
class Thresholds:
    """When a channel drifts, and when a layer's verdict changes. Defaults suit fp32 CNNs.

    A channel drifts when |d| > max_d or |log r| > max_log_r; a layer drifts when more than
    max_fraction of its channels do. A layer is stale when its median channel is beyond
    stale_d or stale_log_r (its running statistics match no batch), dead when most channels'
    batch variance is zero.
    """

    max_d: float = 0.5
    max_log_r: float = 0.25
    max_fraction: float = 0.05
    stale_d: float = 3.0
    stale_log_r: float = 1.0
    per_layer_max_d: dict = field(default_factory=dict)
    per_layer_max_log_r: dict = field(default_factory=dict)


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

    def to_dict(self, per_channel: bool = True) -> dict:
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
            ):
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

    def counts(self) -> dict[str, int]:
        return {v: sum(layer.verdict == v for layer in self.layers) for v in VERDICTS}

    @property
    def passed(self) -> bool:
        return all(layer.verdict == "ok" for layer in self.layers)

    def to_dict(self, per_channel: bool = True) -> dict:
        first = next((layer.name for layer in self.layers if layer.verdict != "ok"), None)
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "mode": self.mode,
            "data": self.data,
            "thresholds": dict(self.thresholds.__dict__.items()),
            "layers": [layer.to_dict(per_channel) for layer in self.layers],
            "skipped": [{"name": k, "reason": v} for k, v in self.skipped.items()],
            "summary": {
                "layers": len(self.layers),
                "verdicts": self.counts(),
                "first_not_ok": first,
                "reading": list(self.reading),
            },
        }


def _nanmax(a: np.ndarray) -> float:
    return float(np.nanmax(a)) if a.size and not np.all(np.isnan(a)) else float("nan")


def _nanmean(a: np.ndarray) -> float:
    return float(np.nanmean(a)) if a.size and not np.all(np.isnan(a)) else float("nan")


@dataclass(frozen=True)
class LayerReference:
    """What a layer's batch statistics are compared with: its stored running statistics."""

    index: int
    running_mean: np.ndarray
    running_var: np.ndarray
    epsilon: float

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "running_mean": self.running_mean.tolist(),
            "running_var": self.running_var.tolist(),
            "epsilon": self.epsilon,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LayerReference:
        return cls(
            int(d["index"]),
            np.asarray(d["running_mean"], np.float64),
            np.asarray(d["running_var"], np.float64),
            float(d["epsilon"]),
        )


def layer_references(view: GraphView) -> dict[str, LayerReference]:
    """Running statistics of every BN whose statistics are constants, by layer name."""
    refs = {}
    for k, idx in enumerate(view.bn_indices()):
        node = view.nodes[idx]
        mean, var = view.constant(node.input[3]), view.constant(node.input[4])
        if mean is None or var is None:
            continue
        eps = bn_attributes(node, view.opset).epsilon
        refs[view.node_name(idx)] = LayerReference(
            k, mean.value.astype(np.float64).reshape(-1), var.value.astype(np.float64).reshape(-1), eps
        )
    return refs


def layer_stats(name: str, collected: LayerMoments, ref: LayerReference, thresholds: Thresholds) -> LayerStats:
    eps, running_mean, running_var = ref.epsilon, ref.running_mean, ref.running_var
    batch_mean, batch_var = collected.moments.mean, collected.moments.variance()
    drift = numerics.drift_metrics(batch_mean, batch_var, running_mean, running_var, eps)
    max_d = thresholds.per_layer_max_d.get(name, thresholds.max_d)
    max_log_r = thresholds.per_layer_max_log_r.get(name, thresholds.max_log_r)
    with np.errstate(invalid="ignore"):
        over = (np.abs(drift.d) > max_d) | (np.abs(drift.log_r) > max_log_r)
        score = np.nan_to_num(np.abs(drift.d), nan=np.inf) + np.nan_to_num(np.abs(drift.log_r), nan=np.inf)
    worst = tuple(int(i) for i in np.argsort(-score, kind="stable")[:5])
    fraction = float(over.mean()) if over.size else 0.0
    verdict, why = _verdict(batch_mean, batch_var, running_mean, running_var, eps, drift, fraction, thresholds)
    return LayerStats(
        name,
        ref.index,
        batch_mean.shape[0],
        collected.moments.count,
        collected.strategy,
        eps,
        batch_mean,
        batch_var,
        running_mean,
        running_var,
        drift.d,
        drift.log_r,
        drift.kl,
        collected.spread.std(),
        collected.spread.batches,
        fraction,
        worst,
        verdict,
        why,
    )


def _verdict(bm, bv, rm, rv, eps, drift, fraction, t: Thresholds) -> tuple[str, str]:
    stats = np.stack([bm, bv, rm, rv])
    if not np.all(np.isfinite(stats)):
        bad = np.flatnonzero(~np.isfinite(stats).all(axis=0))
        return "broken", f"NaN/Inf in {bad.size} channel(s) of batch or running statistics"
    if np.mean(bv <= 1e-6 * (rv + eps)) >= 0.5:
        return "dead", "most channels have (near) zero batch variance: the input is constant"
    if numerics.never_updated(rm, rv):
        return "stale", "running statistics were never updated (mean 0, var 1)"
    med_d, med_r = float(np.median(np.abs(drift.d))), float(np.median(np.abs(drift.log_r)))
    if med_d > t.stale_d or med_r > t.stale_log_r:
        return "stale", f"median |d| {med_d:.2f}, median |log r| {med_r:.2f}: running statistics match no batch"
    if fraction > t.max_fraction:
        return "drift", f"{fraction:.0%} of channels beyond |d| > {t.max_d:g} or |log r| > {t.max_log_r:g}"
    return "ok", ""


def reading(layers: tuple[LayerStats, ...], is_random: bool) -> tuple[str, ...]:
    """Plain-words interpretation of the verdicts, the usual suspects first."""
    notes = []
    if is_random:
        notes.append("RANDOM DATA: these statistics say nothing about real data; pass --data to measure drift")
    bad = [layer for layer in layers if layer.verdict != "ok"]
    if not layers:
        return tuple(notes + ["no BatchNormalization layer had statistics to compare"])
    if not bad:
        return tuple(notes + ["batch statistics agree with the running statistics in every layer"])
    first = bad[0]
    if first.index == layers[0].index and first.verdict == "drift":
        if first.mean_abs_log_r > 0.5 * first.mean_abs_d and first.mean_abs_log_r > 0.1:
            notes.append(
                "inputs look shifted in scale (r far from 1 in the first layer): check the preprocessing "
                "(scaling to [0,1], mean/std normalisation)"
            )
        else:
            notes.append(
                "inputs look shifted in offset (d far from 0 in the first layer): check mean subtraction, "
                "colour order or brightness"
            )
    elif first.verdict == "drift":
        notes.append(
            f"drift starts at layer {first.index} ({first.name}), not the first: the data differ from "
            "training in features the early layers ignore, or the layers before were changed"
        )
    stale = [layer.name for layer in layers if layer.verdict == "stale"]
    if stale:
        notes.append(
            f"{len(stale)} layer(s) have running statistics that match no batch (stale or never updated): "
            "re-estimate them with bnscope recalibrate"
        )
    if any(layer.verdict == "broken" for layer in layers):
        notes.append("NaN/Inf in statistics: check the data for NaN and the model's parameters (bnscope inspect)")
    drifting = sum(layer.verdict == "drift" for layer in layers)
    notes.append(f"{drifting} of {len(layers)} layers drift")
    return tuple(notes)


def summarize(
    model: str,
    collected: CollectedMoments,
    references: dict[str, LayerReference],
    data: dict,
    mode: str,
    thresholds: Thresholds = Thresholds(),
) -> StatsResult:
    """Moments + references -> drift metrics, verdicts and the reading. Needs no model."""
    names = sorted(collected.layers, key=lambda n: references[n].index)
    layers = tuple(layer_stats(n, collected.layers[n], references[n], thresholds) for n in names)
    data = {
        **data,
        "samples": collected.samples,
        "batches": collected.batches,
        "nonfinite_values": collected.nonfinite_inputs,
    }
    return StatsResult(
        model, mode, data, layers, collected.skipped, thresholds, reading(layers, bool(data.get("random")))
    )


def data_description(source: DataSource) -> dict:
    return {"source": source.description, "random": source.is_random}
