"""Why the statistics drift: causes, most important first, from eval- and train-mode evidence.

In eval mode every BN normalises with its running statistics, so a layer's input depends on the
running statistics of every BN before it: one wrong layer makes all layers after it drift. In
train mode every BN normalises with its batch's own statistics, which isolates each layer from
the running statistics before it: a layer that drifts in train mode (and as deployed, in eval
mode) drifts *on its own*. From that:

- ``never_updated``: a layer that drifts on its own with running mean 0 / variance 1 everywhere.
- ``input_shift``: a layer that drifts on its own with no BN before it: the data differ from
  training before the first BN (preprocessing). Train-mode drift deeper down, behind it, is
  counted with it (the data may differ beyond a scale and offset).
- ``stale_layers``: any other layer that drifts on its own: its statistics do not describe this
  data. Layers after a root cause that drift in eval mode only are its consequences, not causes.
- ``train_eval_mismatch``: layers that drift in eval mode but not in train mode, with no root
  cause before them: the running statistics describe the network normalising with batch statistics
  (small or unrepresentative training batches), not the network as deployed.
- ``stale_or_mismatch``: layers that drift in eval mode where the train-mode pass cannot separate
  the two causes above: train mode is ``unsure`` there (more samples decide), or the layer drifts in
  train mode too but by no clear step (``STEP`` thresholds) over the layers before it, and layers
  after such a one. Train-mode statistics depend on the batch size: running statistics collected in
  train mode with batches of 2 describe train mode at batch 2, not at 16, so at another batch size a
  train/eval mismatch also drifts a little in train mode, growing with depth like its eval drift.
  A stale layer's own statistics make a step. A train-mode pass at the training batch size (or more
  data, where train mode was unsure) settles it; the action (re-estimate) is the same either way.
- ``insufficient_data``: layers whose verdict is ``unsure``: more samples decide; not a layer after a
  root cause that is unsure in eval mode only (train mode finds it ok): that is a consequence.

Without the train-mode pass (``merge``, or ``--diagnose never``), a layer drifts on its own when it
drifts and no layer before it does; a stale layer and a train/eval mismatch then look alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from bnscope import numerics
from bnscope.stats.findings import (
    Evidence,
    Finding,
    input_shift_finding,
    insufficient_finding,
    mismatch_finding,
    never_updated_finding,
    stale_finding,
    undecided_finding,
)

CAUSES = (
    "never_updated",
    "input_shift",
    "stale_layers",
    "train_eval_mismatch",
    "stale_or_mismatch",
    "insufficient_data",
)
# A layer drifts on its own in train mode when its drift there, in threshold units (max of max|d| /
# max_d and max|log r| / max_log_r), exceeds that of every layer before it (causes excepted) by this.
STEP = 1.0


def diagnose(eval_layers, train_layers, upstream: Mapping[str, set[str]] | None, thresholds) -> tuple[Finding, ...]:
    """Causes of the drift, most important first; empty when the statistics match.

    Args:
        eval_layers: LayerStats in eval mode (as deployed), or None.
        train_layers: LayerStats of the same data in train mode, or None.
        upstream: Layer -> the layers its input depends on. None: every earlier layer.
        thresholds: The Thresholds the verdicts used.
    """
    primary = list(eval_layers or train_layers or ())
    if not primary:
        return ()
    names = [layer.name for layer in primary]
    up = upstream if upstream is not None else {n: set(names[:i]) for i, n in enumerate(names)}
    ev = Evidence(names, {x.name: x for x in eval_layers or ()}, {x.name: x for x in train_layers or ()}, up)
    never = [n for n in names if _never_updated(ev.primary(n)) and (ev.drifts(n, "eval") or ev.drifts(n, "train"))]
    own, undecided = _own_drift(ev, set(never), thresholds)
    roots = [n for n in names if n in own and n not in never]
    first = [n for n in roots if not ev.before(n)]
    behind_first = [n for n in roots if n not in first and ev.before(n) & set(first)]
    stale = [n for n in roots if n not in first and n not in behind_first]
    causes = set(never) | set(roots)
    findings = []
    if never:
        findings.append(never_updated_finding(ev, never, causes))
    if first:
        findings.append(input_shift_finding(ev, first, behind_first))
    if stale:
        findings.append(stale_finding(ev, stale, causes))
    mismatch = [
        n for n in names if ev.drifts(n, "eval") and n not in own and n not in undecided and not ev.before(n) & causes
    ]
    if mismatch and ev.train:
        findings.append(mismatch_finding(ev, mismatch, thresholds))
    if undecided:
        findings.append(undecided_finding(ev, undecided, thresholds))
    inherited = {n for f in findings for n in f.evidence.get("downstream", ())}
    unsure = [x for x in primary if x.verdict == "unsure" and x.name not in inherited]
    if unsure:
        findings.append(insufficient_finding(unsure, thresholds))
    profile = _profile(ev)
    return tuple(Finding(f.cause, f.layers, {**f.evidence, "profile": profile}, f.action, f.message) for f in findings)


def _profile(ev: Evidence) -> dict:
    """The depth profile every finding shares: the first layer, where eval-mode drift begins, and
    max(max|d|, max|log r|) per layer in each mode."""
    begins = next((n for n in ev.names if ev.drifts(n, "eval") or ev.drifts(n, "train")), None)
    by_depth = {
        mode: [round(max(layer.max_abs_d, layer.max_abs_log_r), 4) for layer in getattr(ev, mode).values()]
        for mode in ("eval", "train")
        if getattr(ev, mode)
    }
    return {"first_layer": ev.numbers(ev.names[0]), "drift_begins_at": begins, "max_drift_by_depth": by_depth}


def _own_drift(ev: Evidence, never: set[str], thresholds) -> tuple[set[str], list[str]]:
    """Layers that drift on their own, and those whose evidence cannot tell (``stale_or_mismatch``).

    With both modes: a layer drifts on its own when it drifts as deployed and in train mode, by a
    clear step over the layers before it (no BN before: any train-mode drift). A layer that drifts as
    deployed but not by such a step is undecided when train mode is unsure or drifts there, or when
    an undecided layer is before it, unless a cause is before it (then it is a consequence). Eval
    only: first on its path. A never-updated layer is always a cause of its own."""
    if not ev.train:
        drifting = {n for n in ev.names if ev.drifts(n, "eval")}
        return never | {n for n in drifting if not ev.before(n) & drifting}, []
    if not ev.eval:
        return never | {n for n in ev.names if ev.drifts(n, "train")}, []
    own, undecided = set(never), []
    for n in ev.names:
        if n in own or not ev.drifts(n, "eval"):
            continue
        before, alone = ev.before(n), ev.train.get(n)
        if ev.drifts(n, "train") and (not before or _step(ev, n, before - own, thresholds) > STEP):
            own.add(n)
        elif before & own or alone is None:
            continue  # a consequence of a cause before it
        elif alone.verdict != "ok" or before & set(undecided):
            undecided.append(n)
    return own, undecided


def _score(layer, thresholds) -> float:
    """Drift in threshold units: the larger of max|d| / max_d and max|log r| / max_log_r."""
    max_d, max_log_r = thresholds.limits(layer.name)
    return float(np.nan_to_num(max(layer.max_abs_d / max_d, layer.max_abs_log_r / max_log_r), nan=np.inf))


def _step(ev: Evidence, name: str, before: set[str], thresholds) -> float:
    """How far this layer's train-mode drift exceeds that of the layers before it (threshold units)."""
    base = max((_score(ev.train[n], thresholds) for n in before if n in ev.train), default=0.0)
    return _score(ev.train[name], thresholds) - base


def _never_updated(layer) -> bool:
    return layer is not None and numerics.never_updated(layer.running_mean, layer.running_var)


STALE_CAUSES = ("never_updated", "stale_layers")


def cause_verdicts(layers, findings) -> tuple:
    """The layers with verdicts that agree with the diagnosis: a root cause's layer that drifts gets
    ``stale`` (stale or never-updated statistics) or ``drift`` (any other cause), whatever its own
    numbers said; a layer that drifts only because of a cause before it gets ``inherited``."""
    roots = {n: f.cause for f in findings for n in f.layers}
    after = {n: f.layers for f in findings for n in f.evidence.get("downstream", ())}
    out = []
    for layer in layers:
        verdict, why = layer.verdict, layer.why
        if verdict in ("drift", "stale") and layer.name in roots:
            verdict = "stale" if roots[layer.name] in STALE_CAUSES else "drift"
        elif verdict in ("drift", "stale") and layer.name in after:
            verdict, why = "inherited", f"drifts because of {', '.join(after[layer.name])} before it ({why})"
        out.append(layer if verdict == layer.verdict else replace(layer, verdict=verdict, why=why))
    return tuple(out)


def layer_causes(findings) -> dict[str, str]:
    """Layer -> the cause it is a root of, or "after X, Y" when it drifts only because of them."""
    out = {}
    for finding in findings:
        for name in finding.evidence.get("downstream", ()):
            out.setdefault(name, "after " + ", ".join(finding.layers))
        for name in finding.layers:
            out[name] = finding.cause
    return out


def sample_budget(layers, thresholds) -> dict:
    """How finely these samples resolve |d| (2 standard errors, worst layer) and what finer takes, over
    the layers more samples could change (``ok``, ``unsure``): for a layer whose drift is decided the
    budget is moot (none when every layer's is)."""
    finite = [x for x in layers if x.verdict in ("ok", "unsure") and np.isfinite(x.max_se_d)]
    if not finite:
        return {"resolution_d": None, "samples_needed": []}
    resolutions = sorted({thresholds.max_d, thresholds.max_d / 2, 0.1}, reverse=True)
    return {
        "resolution_d": 2 * max(x.max_se_d for x in finite),
        "samples_needed": [
            {"abs_d": r, "samples": max(x.samples_to_resolve(r) or 0 for x in finite)} for r in resolutions
        ],
    }
