"""``check``: the CI gate. Static lint, statistics against thresholds, optional baseline; one verdict.

Rules (name: default): ``no_nonfinite`` on, ``no_never_updated`` on, ``no_training_mode`` on,
``max_d`` on and ``max_log_r`` on (need data), ``all_foldable`` off, ``no_bn`` off,
``fold_verified`` off (fold in memory, verify, require it to pass), ``baseline`` (with a baseline
file). Configuration comes from ``[tool.bnscope]`` in pyproject.toml or a bnscope.toml; options
given on the command line override it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bnscope.errors import BnscopeError
from bnscope.onnxio.external_data import TensorStore
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.model_io import LoadedModel, load_model
from bnscope.onnxio.nodes import bn_attributes
from bnscope.schema import SCHEMA_VERSION
from bnscope.stats.collect import StatsOptions
from bnscope.stats.summary import StatsResult, Thresholds
from bnscope.workflows.inspect import InspectResult, inspect_loaded
from bnscope.workflows.stats import collect_stats

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RULES = {
    "no_nonfinite": True, "no_never_updated": True, "no_training_mode": True, "max_d": True, "max_log_r": True,
    "all_foldable": False, "no_bn": False, "fold_verified": False, "baseline": True,
}
_LINT_RULES = {"no_nonfinite": ("nonfinite", "negative_variance"), "no_never_updated": ("never_updated",),
               "no_training_mode": ("training_mode",)}


@dataclass(frozen=True)
class CheckConfig:
    """Rule switches and limits. ``max_d``/``max_log_r`` bound each layer's worst channel."""

    rules: dict = field(default_factory=lambda: dict(RULES))
    max_d: float = 1.0
    max_log_r: float = 0.5
    layer_max_d: dict = field(default_factory=dict)
    layer_max_log_r: dict = field(default_factory=dict)
    baseline_tolerance: float = 1e-3
    baseline_batch_tolerance: float = 0.1
    batch_size: int | None = None  # None: the model's fixed batch size, else 32
    max_batches: int | None = None

    def enabled(self, rule: str) -> bool:
        return bool(self.rules.get(rule, False))


@dataclass(frozen=True)
class RuleResult:
    rule: str
    layer: str | None
    passed: bool
    message: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CheckResult:
    model: str
    results: tuple[RuleResult, ...]
    not_run: dict
    config: CheckConfig
    inspect: InspectResult | None = None
    stats: StatsResult | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[RuleResult]:
        return [r for r in self.results if not r.passed]

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "model": self.model, "passed": self.passed,
                "failures": len(self.failures), "results": [r.to_dict() for r in self.results],
                "not_run": [{"rule": k, "why": v} for k, v in self.not_run.items()]}


# -- configuration ---------------------------------------------------------------------------------
_KEYS = {"max_d", "max_log_r", "layer_max_d", "layer_max_log_r", "baseline_tolerance", "baseline_batch_tolerance",
         "batch_size", "max_batches", "rules"}


def load_config(path: str | os.PathLike | None = None, cwd: str | os.PathLike = ".") -> CheckConfig:
    """``--config FILE``, else ./bnscope.toml, else ./pyproject.toml's [tool.bnscope], else defaults."""
    candidates = [Path(path)] if path else [Path(cwd) / "bnscope.toml", Path(cwd) / "pyproject.toml"]
    for candidate in candidates:
        if not candidate.is_file():
            if path:
                raise BnscopeError(f"config file not found: {candidate}. Hint: check the path")
            continue
        table = _read_table(candidate)
        if table is not None:
            return config_from_table(table, candidate)
    return CheckConfig()


def _read_table(path: Path) -> dict | None:
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BnscopeError(f"{path} is not valid TOML ({exc}). Hint: fix the syntax") from exc
    if "tool" in data and "bnscope" in data["tool"]:
        return data["tool"]["bnscope"]
    return data if path.name != "pyproject.toml" else None


def config_from_table(table: dict, source: Path | str = "config") -> CheckConfig:
    unknown = set(table) - _KEYS
    if unknown:
        raise BnscopeError(f"{source}: unknown bnscope setting(s) {sorted(unknown)}. Hint: known: {sorted(_KEYS)}")
    _check_types(table, source)
    rules = dict(RULES)
    for rule, on in table.get("rules", {}).items():
        if rule not in RULES:
            raise BnscopeError(f"{source}: unknown rule {rule!r}. Hint: rules are {', '.join(RULES)}")
        rules[rule] = bool(on)
    values = {k: v for k, v in table.items() if k != "rules"}
    return CheckConfig(rules=rules, **values)


_NUMBER_KEYS = ("max_d", "max_log_r", "baseline_tolerance", "baseline_batch_tolerance")


def _check_types(table: dict, source) -> None:
    def bad(key, want):
        raise BnscopeError(f"{source}: {key} = {table[key]!r} must be {want}. Hint: see README, check configuration")

    for key in _NUMBER_KEYS:
        if key in table and (isinstance(table[key], bool) or not isinstance(table[key], (int, float))):
            bad(key, "a number")
    for key in ("batch_size", "max_batches"):
        if key in table and (isinstance(table[key], bool) or not isinstance(table[key], int) or table[key] < 1):
            bad(key, "a positive integer")
    for key in ("rules", "layer_max_d", "layer_max_log_r"):
        if key in table and not isinstance(table[key], dict):
            bad(key, "a table")
    for key in ("layer_max_d", "layer_max_log_r"):
        for layer, value in table.get(key, {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BnscopeError(f"{source}: {key}.{layer} = {value!r} must be a number. Hint: e.g. {layer} = 3.0")


def with_overrides(config: CheckConfig, *, enable=(), disable=(), **values) -> CheckConfig:
    """The CLI's options on top of the file's (None leaves a value alone)."""
    rules = dict(config.rules)
    for rule in (*enable, *disable):
        if rule not in RULES:
            raise BnscopeError(f"unknown rule {rule!r}. Hint: rules are {', '.join(RULES)}")
    rules.update({r: True for r in enable})
    rules.update({r: False for r in disable})
    merged = {k: v for k, v in values.items() if v is not None and v != {}}
    for key in ("layer_max_d", "layer_max_log_r"):
        if key in merged:
            merged[key] = {**getattr(config, key), **merged[key]}
    return replace(config, rules=rules, **merged)


# -- running the rules -------------------------------------------------------------------------------
def check_model(
    path: str | os.PathLike, config: CheckConfig = CheckConfig(), *, data: str | os.PathLike | None = None,
    loader: str | None = None, baseline: str | os.PathLike | None = None,
    save_baseline: str | os.PathLike | None = None, provider: str = "cpu",
) -> CheckResult:
    loaded = load_model(path)
    inspected = inspect_loaded(loaded)
    results: list[RuleResult] = []
    not_run: dict[str, str] = {}
    results += _lint_rules(inspected, config)
    results += _deployment_rules(inspected, config)
    stats = None
    if data is not None or loader is not None:
        options = StatsOptions(batch_size=config.batch_size, max_batches=config.max_batches, provider=provider)
        stats = collect_stats(path, data, options=options, loader=loader, thresholds=Thresholds())
        results += _drift_rules(stats, config)
    else:
        not_run.update({r: "needs --data" for r in ("max_d", "max_log_r") if config.enabled(r)})
    if config.enabled("fold_verified"):
        results += _fold_rule(path)
    if baseline is not None and config.enabled("baseline"):
        results += compare_baseline(read_baseline(baseline), loaded, stats, config)
    if save_baseline is not None:
        write_baseline(save_baseline, loaded, stats)
    return CheckResult(str(path), tuple(results), not_run, config, inspected, stats)


def _lint_rules(inspected: InspectResult, config: CheckConfig) -> list[RuleResult]:
    out = []
    for rule, codes in _LINT_RULES.items():
        if not config.enabled(rule):
            continue
        for layer in inspected.layers:
            hits = [f for f in layer.flags if f.code in codes]
            message = "; ".join(f.message + (f" (channels {list(f.channels[:8])})" if f.channels else "")
                                for f in hits) or "ok"
            out.append(RuleResult(rule, layer.name, not hits, message))
    return out


def _deployment_rules(inspected: InspectResult, config: CheckConfig) -> list[RuleResult]:
    out = []
    if config.enabled("all_foldable"):
        out += [RuleResult("all_foldable", layer.name, layer.fold.possible,
                           "foldable" if layer.fold.possible else f"not foldable: {layer.fold.reason}")
                for layer in inspected.layers]
    if config.enabled("no_bn"):
        n = len(inspected.layers)
        out.append(RuleResult("no_bn", None, n == 0, f"{n} BatchNormalization node(s) left" if n else "no BN left"))
    return out


def _drift_rules(stats: StatsResult, config: CheckConfig) -> list[RuleResult]:
    out = []
    for layer in stats.layers:
        for rule, value, limits, default in (
            ("max_d", layer.max_abs_d, config.layer_max_d, config.max_d),
            ("max_log_r", layer.max_abs_log_r, config.layer_max_log_r, config.max_log_r),
        ):
            if not config.enabled(rule):
                continue
            limit = float(limits.get(layer.name, default))
            ok = bool(np.isfinite(value) and value <= limit) and layer.verdict != "broken"
            label = "|d|" if rule == "max_d" else "|log r|"
            out.append(RuleResult(rule, layer.name, ok, f"max {label} {value:.4g} (limit {limit:g}, verdict {layer.verdict})"))
    return out


def _fold_rule(path) -> list[RuleResult]:
    from bnscope.workflows.deploy import FoldSettings, fold_model

    result = fold_model(path, FoldSettings(output=None, dry_run=True))
    worst = max((o.max_abs for v in result.verification for o in v.outputs), default=0.0)
    return [RuleResult("fold_verified", None, result.passed,
                       f"{result.bn_before - result.bn_after}/{result.bn_before} BN folded, max output difference {worst:.3g}")]


# -- baselines --------------------------------------------------------------------------------------
def write_baseline(path: str | os.PathLike, loaded: LoadedModel, stats: StatsResult | None) -> Path:
    from bnscope.schema import to_json
    from bnscope.stats.shards import file_fingerprint

    view = GraphView(loaded.model, TensorStore(loaded))
    by_name = {layer.name: layer for layer in stats.layers} if stats else {}
    layers = {}
    for idx in view.bn_indices():
        name, node = view.node_name(idx), view.nodes[idx]
        params = [view.constant(n) for n in node.input[1:5]]
        entry = {k: (p.value.astype(np.float64).reshape(-1).tolist() if p is not None else None)
                 for k, p in zip(("gamma", "beta", "running_mean", "running_var"), params)}
        if name in by_name:
            entry.update(batch_mean=by_name[name].batch_mean.tolist(), batch_var=by_name[name].batch_var.tolist())
        layers[name] = entry
    doc = {"schema_version": SCHEMA_VERSION, "kind": "bnscope-baseline", "model": str(loaded.path),
           "fingerprint": file_fingerprint(loaded.path), "data": stats.data if stats else None, "layers": layers}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(to_json(doc))
    os.replace(tmp, path)
    return path


def read_baseline(path: str | os.PathLike) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BnscopeError(f"cannot read baseline {path} ({exc}). Hint: create it with check --save-baseline") from exc
    if doc.get("kind") != "bnscope-baseline":
        raise BnscopeError(f"{path} is not a bnscope baseline. Hint: create it with check --save-baseline")
    return doc


def compare_baseline(doc: dict, loaded: LoadedModel, stats: StatsResult | None, config: CheckConfig) -> list[RuleResult]:
    """Fail when layers appear/disappear, or running/batch statistics moved beyond tolerance."""
    view = GraphView(loaded.model, TensorStore(loaded))
    current = {view.node_name(i): i for i in view.bn_indices()}
    old = doc["layers"]
    out = [RuleResult("baseline", name, False, "layer missing from the new model") for name in old if name not in current]
    out += [RuleResult("baseline", name, False, "layer not in the baseline") for name in current if name not in old]
    batch = {layer.name: layer for layer in stats.layers} if stats else {}
    for name in (n for n in current if n in old):
        node = view.nodes[current[name]]
        params = [view.constant(n) for n in node.input[1:5]]
        eps = bn_attributes(node, view.opset).epsilon
        problems = _param_moves(old[name], params, eps, config.baseline_tolerance)
        if name in batch and old[name].get("batch_mean") is not None:
            problems += _batch_moves(old[name], batch[name], eps, config.baseline_batch_tolerance)
        out.append(RuleResult("baseline", name, not problems, "; ".join(problems) or "matches the baseline"))
    return out


def _param_moves(old: dict, params, eps: float, tol: float) -> list[str]:
    if any(p is None for p in params) or old.get("running_var") is None:
        return []
    gamma, beta, mean, var = (p.value.astype(np.float64).reshape(-1) for p in params)
    if len(mean) != len(old["running_mean"]):
        return [f"channel count changed {len(old['running_mean'])} -> {len(mean)}"]
    old_mean, old_var = np.asarray(old["running_mean"]), np.asarray(old["running_var"])
    scale = np.sqrt(np.abs(old_var) + eps)
    problems = []
    with np.errstate(all="ignore"):
        shift = np.nanmax(np.abs(mean - old_mean) / scale)
        ratio = np.nanmax(np.abs(0.5 * np.log((np.abs(var) + eps) / (np.abs(old_var) + eps))))
        affine = np.nanmax(np.abs(np.concatenate([gamma - old["gamma"], beta - old["beta"]])))
    if not shift <= tol:
        problems.append(f"running mean moved by {shift:.3g} std (tolerance {tol:g})")
    if not ratio <= tol:
        problems.append(f"running variance changed, |log std ratio| {ratio:.3g} (tolerance {tol:g})")
    if not affine <= tol:
        problems.append(f"gamma/beta changed by up to {affine:.3g}")
    return problems


def _batch_moves(old: dict, layer, eps: float, tol: float) -> list[str]:
    old_mean, old_var = np.asarray(old["batch_mean"], np.float64), np.asarray(old["batch_var"], np.float64)
    if old_mean.shape != layer.batch_mean.shape:
        return ["batch statistics have a different channel count"]
    with np.errstate(all="ignore"):
        shift = np.nanmax(np.abs(layer.batch_mean - old_mean) / np.sqrt(old_var + eps))
        ratio = np.nanmax(np.abs(0.5 * np.log((layer.batch_var + eps) / (old_var + eps))))
    problems = []
    if not shift <= tol:
        problems.append(f"batch mean moved by {shift:.3g} std (tolerance {tol:g})")
    if not ratio <= tol:
        problems.append(f"batch variance changed, |log std ratio| {ratio:.3g} (tolerance {tol:g})")
    return problems
