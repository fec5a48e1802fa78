"""The findings of the diagnosis in plain words, with the numbers behind them and what to do.

:mod:`bnscope.stats.diagnosis` decides which layers are root causes; each function here turns one
cause into a :class:`Finding` (``cause``, ``layers``, ``evidence``, ``action``, ``message``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

DRIFTING = ("drift", "stale")
RECALIBRATE = "bnscope recalibrate MODEL --data DATA -o OUT"


@dataclass(frozen=True)
class Finding:
    """One cause: the layers it names (root causes only), the numbers behind it, what to do."""

    cause: str
    layers: tuple[str, ...]
    evidence: dict
    action: str
    message: str

    def to_dict(self) -> dict:
        return {
            "cause": self.cause,
            "layers": list(self.layers),
            "evidence": self.evidence,
            "action": self.action,
            "message": self.message,
        }


@dataclass(frozen=True)
class Evidence:
    names: list[str]
    eval: dict
    train: dict
    upstream: Mapping[str, set[str]]

    def drifts(self, name: str, mode: str) -> bool:
        layer = getattr(self, mode).get(name)
        return layer is not None and layer.verdict in DRIFTING

    def inherits(self, name: str) -> bool:
        """Drifts in eval mode, or is unsure there while train mode (isolated) finds it ok: what a
        layer after a root cause shows."""
        layer, alone = self.eval.get(name), self.train.get(name)
        unsure_only = layer is not None and layer.verdict == "unsure" and alone is not None and alone.verdict == "ok"
        return self.drifts(name, "eval") or unsure_only

    def primary(self, name: str):
        return self.eval.get(name) or self.train.get(name)

    @cached_property
    def _name_set(self) -> frozenset[str]:
        return frozenset(self.names)

    def before(self, name: str) -> set[str]:
        return self.upstream.get(name, set()) & self._name_set

    def numbers(self, name: str) -> dict:
        out = {"layer": name}
        for mode in ("eval", "train"):
            layer = getattr(self, mode).get(name)
            if layer is not None:
                out[f"{mode}_max_abs_d"] = layer.max_abs_d
                out[f"{mode}_max_abs_log_r"] = layer.max_abs_log_r
        return out


def _consequences(ev: Evidence, causes: set[str], mine: list[str]) -> list[str]:
    """Layers after ``mine`` that drift in eval mode (or are unsure there only) but not on their own."""
    return [n for n in ev.names if n not in causes and ev.inherits(n) and ev.before(n) & set(mine)]


def _max(ev: Evidence, names, mode: str, attr: str = "max_abs_d") -> float:
    values = [getattr(getattr(ev, mode)[n], attr) for n in names if n in getattr(ev, mode)]
    finite = [v for v in values if np.isfinite(v)]
    return max(finite) if finite else float("nan")


def _both(ev: Evidence, names, mode: str, how: str) -> str:
    d, r = _max(ev, names, mode), _max(ev, names, mode, "max_abs_log_r")
    how = f"{how} " if how else ""
    return f"max|d| {how}{d:.2f}, max|log r| {how}{r:.2f}"


def _verb(names: list[str]) -> str:
    return "drifts" if len(names) == 1 else "drift"


def _list(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _downstream_note(after: list[str]) -> str:
    if not after:
        return ""
    return f" {len(after)} layer(s) after them ({_list(after, 3)}) drift in eval mode only as a consequence."


def never_updated_finding(ev: Evidence, never: list[str], causes: set[str]) -> Finding:
    after = _consequences(ev, causes, never)
    message = (
        f"{_list(never)}: running mean 0 and variance 1 in every channel, never updated; the data give "
        f"max|d| {_max(ev, never, 'eval' if ev.eval else 'train'):.2f}." + _downstream_note(after)
    )
    evidence = {"layers": [ev.numbers(n) for n in never], "downstream": after}
    action = f"re-export from the trained checkpoint, or re-estimate the statistics: {RECALIBRATE}"
    return Finding("never_updated", tuple(never), evidence, action, message)


def input_shift_finding(ev: Evidence, first: list[str], behind: list[str]) -> Finding:
    layer = ev.primary(first[0])
    kind = "scale" if layer.mean_abs_log_r > 0.5 * layer.mean_abs_d and layer.mean_abs_log_r > 0.1 else "offset"
    message = (
        f"the data differ from training before the first BN: {_list(first)} {_verb(first)} with no BN before "
        f"(max|d| {layer.max_abs_d:.2f}, max|log r| {layer.max_abs_log_r:.2f}, mostly in {kind})."
    )
    later = [n for n in ev.names if n not in first]
    if ev.train and not behind and later:
        message += (
            f" In train mode, which isolates each layer, every later layer matches (max|d| "
            f"<= {_max(ev, later, 'train'):.2f}): a change of input scale or offset."
        )
    elif behind:
        message += (
            f" {len(behind)} later layer(s) drift in train mode too (max|d| up to {_max(ev, behind, 'train'):.2f}): "
            "the data differ beyond a scale and offset."
        )
    evidence = {
        "layers": [ev.numbers(n) for n in first],
        "downstream": [n for n in ev.names if n not in first and ev.inherits(n) and ev.before(n) & set(first)],
        "first_layer": ev.numbers(first[0]),
        "mostly": kind,
        "later_train_max_abs_d": _max(ev, later, "train") if ev.train else None,
        "later_drifting_in_train_mode": behind,
    }
    message += " (Statistics alone cannot tell this from stale statistics in the first layer.)"
    action = (
        "check the preprocessing (scaling to [0,1], mean/std normalisation, colour order, brightness); "
        f"if it is right, or the data really look like this, re-estimate the statistics on them: {RECALIBRATE}"
    )
    return Finding("input_shift", tuple(first), evidence, action, message)


def stale_finding(ev: Evidence, stale: list[str], causes: set[str]) -> Finding:
    after = _consequences(ev, causes, stale)
    upstream = set().union(*(ev.before(n) for n in stale)) - causes
    before = sorted((n for n in upstream if not ev.inherits(n)), key=ev.names.index)  # not the consequences
    parts = [f"eval {_both(ev, stale, 'eval', '')}"] if ev.eval else []
    if ev.train:
        parts.append(f"in train mode, where the layers before cannot be the cause, {_both(ev, stale, 'train', '')}")
    else:
        parts.append("without a train-mode pass a stale layer and a train/eval mismatch look alike")
    message = f"{_list(stale)}: running statistics do not describe this data ({'; '.join(parts)})."
    if before:
        message += f" The layers before them match (max|d| <= {_max(ev, before, 'eval' if ev.eval else 'train'):.2f})."
    message += _downstream_note(after)
    evidence = {"layers": [ev.numbers(n) for n in stale], "before": before, "downstream": after}
    action = f"re-estimate them ({RECALIBRATE}), or re-export from the checkpoint the weights came from"
    return Finding("stale_layers", tuple(stale), evidence, action, message)


def mismatch_finding(ev: Evidence, mismatch: list[str], thresholds) -> Finding:
    profile = [(n, max(ev.eval[n].max_abs_d, ev.eval[n].max_abs_log_r)) for n in ev.names if n in ev.eval]
    start = next(i for i, (n, _) in enumerate(profile) if n == mismatch[0])
    growth = [round(v, 4) for _, v in profile[start:]]
    message = (
        f"{_list(mismatch)} {_verb(mismatch)} in eval mode ({_both(ev, mismatch, 'eval', 'up to')}) but not in "
        f"train mode ({_both(ev, mismatch, 'train', '')}; {_rule(thresholds)}), and no layer before them has "
        "wrong statistics: the running statistics describe the network normalising with batch statistics "
        f"(small or unrepresentative training batches), not as deployed. Drift begins at {mismatch[0]}"
    )
    message += _trend(growth)
    evidence = {
        "layers": [ev.numbers(n) for n in mismatch],
        "begins_at": mismatch[0],
        "eval_max_drift_by_depth": growth,
    }
    action = f"re-estimate the statistics on representative data, as deployed: {RECALIBRATE}"
    return Finding("train_eval_mismatch", tuple(mismatch), evidence, action, message)


def _rule(t) -> str:
    """When a layer drifts, in the words of its thresholds."""
    return (
        f"a layer drifts when more than {t.max_fraction:.0%} of its channels are beyond |d| {t.max_d:g} or "
        f"|log r| {t.max_log_r:g} by 2 standard errors"
    )


def undecided_finding(ev: Evidence, undecided: list[str], thresholds) -> Finding:
    """Layers whose train-mode evidence cannot tell stale statistics from a train/eval mismatch."""
    unsure = [n for n in undecided if ev.train[n].verdict == "unsure"]
    drifting = [n for n in undecided if ev.drifts(n, "train")]
    first = ev.train[undecided[0]]
    batch = round(first.samples / max(first.batches, 1)) if first.samples else None
    need = max((ev.train[n].samples_to_decide or 0 for n in unsure), default=0)
    parts = []
    if drifting:
        parts.append(
            f"in train mode {_list(drifting)} {_verb(drifting)} too ({_both(ev, drifting, 'train', 'up to')}) but by "
            "no clear step over the layers before them, as a mismatch does at another batch size than training's"
        )
    if unsure:
        parts.append(f"train mode is unsure for {_list(unsure)} ({_both(ev, unsure, 'train', '')})")
    settle = []
    if drifting or not unsure:
        settle.append(
            f"a pass at the batch size the model was trained with (this one: {batch}), where a train/eval "
            "mismatch matches in train mode and stale statistics do not"
        )
    if unsure:
        settle.append(f"about {need} samples" if need else "more samples")
    message = (
        f"{_list(undecided)} {_verb(undecided)} in eval mode ({_both(ev, undecided, 'eval', 'up to')}); "
        + "; ".join(parts or ["the layers before them are undecided"])
        + f" ({_rule(thresholds)}): stale statistics or a train/eval mismatch, these data cannot tell. "
        f"What settles it: {' or '.join(settle)}."
    )
    evidence = {
        "layers": [ev.numbers(n) for n in undecided],
        "train_unsure": unsure,
        "train_drifting": drifting,
        "batch_size": batch,
        "samples_needed": need or None,
    }
    action = f"either way, re-estimate the statistics on representative data: {RECALIBRATE}"
    return Finding("stale_or_mismatch", tuple(undecided), evidence, action, message)


def _trend(values: list[float]) -> str:
    """How the largest of max|d| and max|log r| moves with depth from where drift begins."""
    if len(values) < 2:
        return "."
    way = "grows" if values[-1] > 1.2 * values[0] else "shrinks" if values[-1] < 0.8 * values[0] else "stays"
    shown = ", ".join(f"{v:.2f}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
    return f" and {way} with depth (max of |d| and |log r| by layer: {shown})."


def insufficient_finding(unsure: list, thresholds) -> Finding:
    budget = max((x.samples_to_decide or 0 for x in unsure), default=0)
    samples = max(x.samples for x in unsure)
    resolution = 2 * max(x.max_se_d for x in unsure)
    message = (
        f"{_list([x.name for x in unsure])}: {samples} samples cannot decide ({_list([x.why for x in unsure], 2)}; "
        f"|d| known to +-{resolution:.2f});"
    )
    if budget > 100 * samples:
        message += f" they sit on a threshold: only about {budget} samples would decide, so the verdict hardly matters."
    else:
        message += f" if the estimates hold, about {budget} samples decide."
    evidence = {"samples": samples, "resolution_d": resolution, "samples_needed": budget}
    action = f"collect more data (about {budget} samples) and run again"
    return Finding("insufficient_data", tuple(x.name for x in unsure), evidence, action, message)
