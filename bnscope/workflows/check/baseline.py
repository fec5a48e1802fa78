"""Baseline files for ``check``: BN parameters and batch statistics of a known-good model, written
once and compared on later runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from bnscope.errors import BnscopeError
from bnscope.onnxio.bn import bn_attributes
from bnscope.onnxio.external_data import TensorStore
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.model_io import LoadedModel
from bnscope.onnxio.outputs import check_input_file, write_text_atomically
from bnscope.schema import SCHEMA_VERSION, to_json
from bnscope.stats.shards import file_fingerprint
from bnscope.stats.summary import StatsResult
from bnscope.workflows.check.config import CheckConfig
from bnscope.workflows.check.result import RuleResult


def write_baseline(path: str | os.PathLike, loaded: LoadedModel, stats: StatsResult | None) -> Path:
    view = GraphView(loaded.model, TensorStore(loaded))
    by_name = {layer.name: layer for layer in stats.layers} if stats else {}
    layers = {}
    for idx in view.bn_indices():
        name, node = view.node_name(idx), view.nodes[idx]
        params = [view.constant(n) for n in node.input[1:5]]
        entry = {
            k: (p.value.astype(np.float64).reshape(-1).tolist() if p is not None else None)
            for k, p in zip(("gamma", "beta", "running_mean", "running_var"), params)
        }
        if name in by_name:
            entry.update(batch_mean=by_name[name].batch_mean.tolist(), batch_var=by_name[name].batch_var.tolist())
        layers[name] = entry
    doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": "bnscope-baseline",
        "model": str(loaded.path),
        "fingerprint": file_fingerprint(loaded.path),
        "data": stats.data if stats else None,
        "layers": layers,
    }
    return write_text_atomically(path, to_json(doc))


def read_baseline(path: str | os.PathLike) -> dict:
    check_input_file(path, "baseline", "create it with check --save-baseline")
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BnscopeError(f"cannot read baseline {path} ({exc}). Hint: create it with check --save-baseline") from exc
    except RecursionError:
        raise BnscopeError(
            f"cannot read baseline {path} (JSON nested too deeply). Hint: create it with check --save-baseline"
        ) from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if (
        kind != "bnscope-baseline"
        or not isinstance(layers, dict)
        or not all(isinstance(v, dict) for v in layers.values())
    ):
        raise BnscopeError(f"{path} is not a bnscope baseline. Hint: create it with check --save-baseline")
    for name, entry in layers.items():
        problem = _entry_problem(entry)
        if problem:
            raise BnscopeError(
                f"baseline {path}: layer {name!r} {problem}. Hint: recreate it with check --save-baseline"
            )
    return doc


_PARAM_KEYS = ("gamma", "beta", "running_mean", "running_var")
_BATCH_KEYS = ("batch_mean", "batch_var")


def _entry_problem(entry: dict) -> str | None:
    """Why one layer of a baseline cannot be compared, or None: the four parameters are all null (not
    constant in the model) or all lists of numbers of one length; batch statistics are absent, or
    null, or two such lists."""
    missing = [k for k in _PARAM_KEYS if k not in entry]
    if missing:
        return f"has no {', '.join(missing)}"
    lengths = set()
    for keys in (_PARAM_KEYS, _BATCH_KEYS):
        values = [entry.get(k) for k in keys]
        if all(v is None for v in values):
            continue
        for key, value in zip(keys, values):
            if not isinstance(value, list) or not all(_is_number(x) for x in value):
                return f"has {key} = {str(value)[:40]}, not a list of numbers"
            lengths.add(len(value))
    if len(lengths) > 1:
        return f"has lists of different lengths ({', '.join(map(str, sorted(lengths)))})"
    return None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def compare_baseline(
    doc: dict, loaded: LoadedModel, stats: StatsResult | None, config: CheckConfig
) -> list[RuleResult]:
    """Fail when layers appear/disappear, or running/batch statistics moved beyond tolerance."""
    view = GraphView(loaded.model, TensorStore(loaded))
    current = {view.node_name(i): i for i in view.bn_indices()}
    old = doc["layers"]
    out = [
        RuleResult("baseline", name, False, "layer missing from the new model") for name in old if name not in current
    ]
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
