"""``check``: the CI gate. Static lint, statistics against thresholds, optional baseline; one verdict.

Rules (name: default): ``no_nonfinite`` on, ``no_never_updated`` on, ``no_training_mode`` on,
``max_d`` on and ``max_log_r`` on (need data), ``all_foldable`` off, ``no_bn`` off,
``fold_verified`` off (fold in memory, verify, require it to pass), ``baseline`` (with a baseline
file).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from bnscope.errors import BnscopeError
from bnscope.onnxio.bn import subgraph_bns
from bnscope.onnxio.model_io import load_model
from bnscope.onnxio.outputs import writing
from bnscope.runtime.selection import distinct_providers
from bnscope.stats.collect import StatsOptions
from bnscope.stats.gate import FAIL, UNSURE, Call, limit_call
from bnscope.stats.summary import StatsResult, Thresholds
from bnscope.workflows.check.baseline import (
    compare_baseline,
    read_baseline,
    write_baseline,
)
from bnscope.workflows.check.config import CheckConfig
from bnscope.workflows.check.result import CheckResult, RuleResult
from bnscope.workflows.fold import FoldResult, fold_model
from bnscope.workflows.inspect import InspectResult, inspect_loaded
from bnscope.workflows.options import DataChoice, FoldSettings
from bnscope.workflows.outputs import check_run_outputs
from bnscope.workflows.stats import collect_stats

log = logging.getLogger(__name__)


LOADER_BATCHES = 1000
"""check's default ``max_batches`` with a ``--loader``: a generator may never end, a CI gate must."""

_LINT_RULES = {
    "no_nonfinite": ("nonfinite", "nonfinite_epsilon", "negative_variance"),
    "no_never_updated": ("never_updated", "placeholder_statistics", "placeholder_parameters"),
    "no_training_mode": ("training_mode",),
}


_FAILING_VERDICTS = ("broken", "dead")
"""Verdicts that fail the drift rules whatever the numbers say: NaN/Inf statistics, or a layer whose
input is constant (its |d| and |log r| can be 0 when the running statistics are constant too)."""


# -- running the rules -------------------------------------------------------------------------------
def check_model(
    path: str | os.PathLike,
    config: CheckConfig = CheckConfig(),
    *,
    data: DataChoice | str | os.PathLike | None = None,
    loader: str | None = None,
    baseline: str | os.PathLike | None = None,
    save_baseline: str | os.PathLike | None = None,
    provider: str = "cpu",
    fold_for_report: bool = False,
    html: str | os.PathLike | None = None,
    inputs: Mapping[str, str | os.PathLike] | None = None,
) -> CheckResult:
    """Runs the enabled rules on a model loaded once; every rule and the result share it.

    ``data`` is a :class:`DataChoice` (its batch settings override the configuration's), or a data
    path (with ``loader`` beside it). The run's outputs (``save_baseline``, ``html``, which the caller
    writes from the result) are checked once, after the load, against every input (``inputs`` adds
    e.g. the configuration files).

    The dry-run fold that ``fold_verified`` verifies is kept in the result (``fold``), for the
    HTML report; ``fold_for_report`` also folds when only ``all_foldable`` is on. The provider is
    checked first, also when no rule creates a session (an unknown one is an error, not a pass), and
    the fold is verified on the CPU and on it.
    """
    choice = DataChoice.of(data, loader=loader)
    verify_on = distinct_providers([provider], first="cpu")
    loaded = load_model(path)
    outputs = {"--save-baseline": save_baseline, "--html": html}
    others = {"the baseline": baseline, **(inputs or {})}
    check_run_outputs(loaded, outputs, data=choice.path, loader=choice.loader, others=others)
    inspected = inspect_loaded(loaded)
    _check_layer_names(config, [layer.name for layer in inspected.layers])
    reference = read_baseline(baseline) if baseline is not None and config.enabled("baseline") else None
    results: list[RuleResult] = []
    not_run: dict[str, str] = {}
    results += _lint_rules(inspected, config)
    results += _deployment_rules(inspected, config, subgraph_bns(loaded.model.graph))
    stats = None
    if choice.given:
        budget = config.max_batches or (LOADER_BATCHES if choice.loader is not None else None)
        options = StatsOptions(batch_size=config.batch_size, max_batches=budget, provider=provider)
        stats = collect_stats(loaded, choice, options=options, thresholds=Thresholds())
        if choice.loader is not None and config.max_batches is None and stats.data.get("batches", 0) >= budget:
            log.warning(
                "stopped after %d batches of the loader (check's default budget for a loader, which may not end); "
                "--max-batches N or max_batches in the config sets another",
                budget,
            )
        results += _drift_rules(stats, config)
    else:
        not_run.update({r: "needs --data" for r in ("max_d", "max_log_r") if config.enabled(r)})
    fold = None
    if config.enabled("fold_verified") or (fold_for_report and config.enabled("all_foldable")):
        witness = DataChoice(path=choice.path, loader=choice.loader, random=choice.random)  # random without data
        fold = fold_model(loaded, FoldSettings(output=None, dry_run=True, providers=verify_on, data=witness))
    if config.enabled("fold_verified"):
        results += _fold_rule(fold)
    if reference is not None:
        results += compare_baseline(reference, loaded, stats, config)
    if not results:
        more_data = "give --data, or " if stats is None and inspected.layers else ""  # data add rules on BN only
        raise BnscopeError(
            f"check ran no rule on {path}: it has {len(inspected.layers)} BatchNormalization layer(s) and no enabled "
            f"rule applies, so passing would mean nothing. Hint: {more_data}enable a rule that applies "
            "(e.g. --enable no_bn)"
        )
    if save_baseline is not None:
        with writing(save_baseline, "the baseline"):
            write_baseline(save_baseline, loaded, stats)
    return CheckResult(str(path), tuple(results), not_run, config, inspected, stats, fold)


def _check_layer_names(config: CheckConfig, names: list[str]) -> None:
    """A per-layer limit naming no BN layer is never applied: say so (a config file may serve several
    models, so this is a warning, not an error)."""
    for option, limits in (("layer_max_d", config.layer_max_d), ("layer_max_log_r", config.layer_max_log_r)):
        unknown = sorted(set(limits) - set(names))
        if unknown:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            log.warning(
                "%s names %s, which is no BatchNormalization layer of this model, so it is not applied "
                "(the BN layers are %s)",
                option,
                ", ".join(map(repr, unknown)),
                shown or "none",
            )


def _lint_rules(inspected: InspectResult, config: CheckConfig) -> list[RuleResult]:
    out = []
    for rule, codes in _LINT_RULES.items():
        if not config.enabled(rule):
            continue
        for layer in inspected.layers:
            hits = [f for f in layer.flags if f.code in codes]
            message = (
                "; ".join(f.message + (f" (channels {list(f.channels[:8])})" if f.channels else "") for f in hits)
                or "ok"
            )
            out.append(RuleResult(rule, layer.name, not hits, message))
    return out


def _deployment_rules(inspected: InspectResult, config: CheckConfig, nested: dict[str, str]) -> list[RuleResult]:
    out = []
    if config.enabled("all_foldable"):
        out += [
            RuleResult(
                "all_foldable",
                layer.name,
                layer.fold.possible,
                "foldable" if layer.fold.possible else f"not foldable: {layer.fold.reason}",
            )
            for layer in inspected.layers
        ]
    if config.enabled("no_bn"):  # BNs in If/Loop/Scan bodies are BNs left too
        n = len(inspected.layers) + len(nested)
        where = f" ({len(nested)} in control-flow subgraphs, e.g. {next(iter(nested))!r})" if nested else ""
        out.append(
            RuleResult("no_bn", None, n == 0, f"{n} BatchNormalization node(s) left{where}" if n else "no BN left")
        )
    return out


def _drift_rules(stats: StatsResult, config: CheckConfig) -> list[RuleResult]:
    """Each layer's worst channel against its limit, asked of the gate ``stats --fail-on-drift`` asks
    (:mod:`bnscope.stats.gate`): fails when beyond it by more than the noise, unsure within it."""
    out = []
    for name, reason in stats.skipped.items():  # a layer the data did not reach must not pass
        out += [
            RuleResult(r, name, False, f"not measured: {reason}") for r in ("max_d", "max_log_r") if config.enabled(r)
        ]
    for layer in stats.layers:
        for rule, values, se, limits, default in (
            ("max_d", layer.d, layer.se_d, config.layer_max_d, config.max_layer_d),
            ("max_log_r", layer.log_r, layer.se_log_r, config.layer_max_log_r, config.max_layer_log_r),
        ):
            if not config.enabled(rule):
                continue
            limit = float(limits.get(layer.name, default))
            call = limit_call(values, se, limit, layer.samples)
            if layer.verdict in _FAILING_VERDICTS:
                call = Call(FAIL)
            label = "|d|" if rule == "max_d" else "|log r|"
            value = layer.max_abs_d if rule == "max_d" else layer.max_abs_log_r
            message = f"max {label} {value:.4g} (limit {limit:g}, verdict {layer.verdict})"
            if call.outcome == UNSURE:
                decide = f"; about {call.samples_to_decide} samples decide" if call.samples_to_decide else ""
                message += f"; unsure: over the limit only within 2 standard errors{decide}"
            out.append(
                RuleResult(
                    rule,
                    layer.name,
                    not call.fails(config.strict),
                    message,
                    call.outcome == UNSURE,
                    call.samples_to_decide,
                )
            )
    return out


def _fold_rule(result: FoldResult) -> list[RuleResult]:
    """Passes when the dry-run fold's verification passed: the judgement ``fold`` uses
    (``bnscope.runtime.floor.judge_outputs``)."""
    outputs = [o for v in result.verification for o in v.outputs]
    worst = max((o.max_abs for o in outputs), default=0.0)
    ratios = [o.ratio for o in outputs if o.ratio is not None]
    floor = f" ({max(ratios):.3g}x the original's float floor)" if ratios else ""
    failed = "; ".join(f"{o.name}: {o.reason}" for o in outputs if not o.passed and o.reason)
    message = f"{result.bn_before - result.bn_after}/{result.bn_before} BN folded, max output difference {worst:.3g}"
    return [RuleResult("fold_verified", None, result.passed, message + floor + (f"; {failed}" if failed else ""))]
