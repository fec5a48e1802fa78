"""``recalibrate``: re-estimate BN running statistics on the data the model will really see (AdaBN).

``sequential`` (default): exact population statistics, layer by layer in topological order, so
each BN sees inputs normalised with the *new* statistics of the BNs before it. BNs with no
not-yet-updated BN upstream share one pass over the data. Population (biased) variance by default,
``unbiased=True`` scales by n / (n - 1). After it, eval-mode ``stats`` on the written model gives
|d| ~ 0 in every layer by construction.

``onepass``: every BN normalises with its batch statistics (train mode) in a single pass; running
mean = mean of batch means, running var = mean of unbiased batch variances, every batch weighted
equally: what ``torch.optim.swa_utils.update_bn`` does (BN in train mode, momentum None).

A BN exported in training mode (``training_mode=1``, or optional outputs at opset 7-13) normalises
with batch statistics and ignores its running ones; recalibrate makes it an inference BN holding
the new statistics (:mod:`bnscope.repair.inference_mode`), then checks that the written model
runs on the CPU (and the CUDA EP when this onnxruntime has it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from bnscope.choices import Method
from bnscope.data.choice import DataChoice
from bnscope.data.spec import DataSource, input_specs, resolve_batch_size
from bnscope.distributed import ClusterOptions
from bnscope.errors import BnscopeError
from bnscope.onnxio import model_io
from bnscope.onnxio.edit import set_running_statistics
from bnscope.onnxio.external_data import TensorStore
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.outputs import check_input_file, writing
from bnscope.repair.inference_mode import ModeRepair, loadable_as_exported, to_inference
from bnscope.schema import SCHEMA_VERSION
from bnscope.stats.accumulate import TapAccumulator
from bnscope.stats.collect import Collector, StatsOptions, collect_moments
from bnscope.stats.lineage import bn_upstream
from bnscope.stats.summary import LayerStats, layer_references, summarize
from bnscope.workflows.cluster import open_data
from bnscope.workflows.evaluation import accuracies, evaluation_data
from bnscope.workflows.inference_mode import plan_or_refuse, runs_on
from bnscope.workflows.outputs import check_run_outputs, refuse_overwrite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecalibrateOptions:
    """Defaults: sequential, biased variance, batches of 32, all data, CPU."""

    method: str = "sequential"
    unbiased: bool = False
    batch_size: int | None = None  # None: the model's fixed batch size, else 32
    max_batches: int | None = None
    provider: str = "cpu"
    allow_fallback: bool = False


@dataclass(frozen=True)
class LayerChange:
    name: str
    pass_index: int
    before: LayerStats
    after: LayerStats

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "pass": self.pass_index,
            "before": {
                "verdict": self.before.verdict,
                "max_abs_d": self.before.max_abs_d,
                "max_abs_log_r": self.before.max_abs_log_r,
            },
            "after": {
                "verdict": self.after.verdict,
                "max_abs_d": self.after.max_abs_d,
                "max_abs_log_r": self.after.max_abs_log_r,
            },
        }


@dataclass(frozen=True)
class RecalibrateResult:
    model: str
    output: str
    method: str
    data: str
    passes: int
    layers: tuple[LayerChange, ...]
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    repairs: tuple[ModeRepair, ...] = ()
    runs: dict = field(default_factory=dict)  # provider -> "ok", "not available: ...", "failed: ..."

    @property
    def passed(self) -> bool:
        """The written model runs on every provider tried whose EP loads."""
        return not any(v.startswith("failed") for v in self.runs.values())

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "output": self.output,
            "method": self.method,
            "data": self.data,
            "passes": self.passes,
            "layers": [c.to_dict() for c in self.layers],
            "accuracy": {"before": self.accuracy_before, "after": self.accuracy_after},
            "training_mode_repairs": [r.to_dict() for r in self.repairs],
            "runs": dict(self.runs),
        }


def recalibrate_model(
    path: str | os.PathLike,
    data: DataChoice | str | os.PathLike | None,
    output: str | os.PathLike,
    options: RecalibrateOptions = RecalibrateOptions(),
    *,
    loader: str | None = None,
    eval_data: str | os.PathLike | None = None,
    force: bool = False,
    cluster: ClusterOptions | None = None,
) -> RecalibrateResult:
    """Re-estimate every BN's running statistics on ``data`` and write the model to ``output``.

    ``data`` is a :class:`DataChoice` (its batch settings override ``options``'), or a data path
    (with ``loader`` beside it). ``cluster`` runs every data pass on a Ray cluster
    (:mod:`bnscope.distributed`); ``data`` may then also be a ``ray.data.Dataset`` or a URI / parquet
    path that Ray reads."""
    choice = DataChoice.of(data, loader=loader)
    options = choice.batching(options)
    path, output = Path(path), Path(output)
    refuse_overwrite(path, output, force)
    others = {"the evaluation data": eval_data}
    check_run_outputs(path, {"-o": output}, data=choice.path, loader=choice.loader, others=others, model_writable=force)
    if eval_data is not None:
        check_input_file(eval_data, "evaluation data", "an .npz with the inputs and a 'labels' array")
    if options.method not in tuple(Method):
        raise BnscopeError(f"unknown method {options.method!r}. Hint: sequential or onepass")
    loaded = model_io.load_model(path)
    planned = plan_or_refuse(loaded)
    options = replace(options, batch_size=resolve_batch_size(options.batch_size, input_specs(loaded.model), 32))
    source, runner = open_data(choice.source(data), input_specs(loaded.model), cluster, loader=choice.loader)
    evaluation = evaluation_data(eval_data, loaded.model) if eval_data is not None else None
    work = onnx.ModelProto()
    work.CopyFrom(loaded.model)
    if loaded.has_external_data:
        model_io.materialize_external_data(loaded, work)
    estimate = _sequential if options.method == Method.sequential else _onepass
    new_stats, pass_of = estimate(work, source, options, loaded.path, runner)
    _refuse_nonfinite(new_stats, source)
    if options.method != Method.sequential:  # the sequential passes wrote theirs, one group at a time
        set_running_statistics(work, new_stats)
    kept = to_inference(work, {r.name for r in planned if r.repaired}, new_stats)
    repairs = tuple(replace(r, kept_as_constants=kept.get(r.name, ())) for r in planned)
    with writing(output, "the model"):
        written = model_io.save_model(work, output)
    layers = _compare(loaded, model_io.load_model(written), source, options, pass_of, runner)
    passes = max(pass_of.values(), default=0)
    accuracy = (
        accuracies(_as_exported(loaded, planned), written, *evaluation, options)
        if evaluation is not None
        else (None, None)
    )
    runs = runs_on(written, source, options.batch_size)
    return RecalibrateResult(
        str(path), str(written), options.method, source.description, passes, layers, *accuracy, repairs, runs
    )


def _refuse_nonfinite(new_stats: dict, source: DataSource) -> None:
    bad = [
        name for name, (mean, var) in new_stats.items() if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var)))
    ]
    if bad:
        raise BnscopeError(
            f"re-estimated statistics of {len(bad)} layer(s) ({', '.join(bad[:3])}) are NaN/Inf: "
            f"{source.description} holds NaN/Inf values or drives activations to overflow; nothing "
            "written. Hint: clean the data (bnscope stats reports non-finite values)"
        )


# -- estimation -----------------------------------------------------------------------------------
def _stats_options(options: RecalibrateOptions, mode: str = "eval") -> StatsOptions:
    """input_sums taps: exact however far the data are from the running statistics being replaced
    (output_pool reads y = BN(x), whose float32 E[y^2] - E[y]^2 cancels when they are far)."""
    return StatsOptions(
        batch_size=options.batch_size,
        max_batches=options.max_batches,
        mode=mode,
        provider=options.provider,
        allow_fallback=options.allow_fallback,
        strategy="input_sums",
    )


def _sequential(work: onnx.ModelProto, source: DataSource, options: RecalibrateOptions, origin: Path, runner=None):
    """Groups of BNs whose upstream BNs are all updated, one data pass per group. ``work`` holds all its
    data in memory; ``origin`` (the input file) is how messages name it."""
    view = GraphView(work)
    upstream = bn_upstream(view)
    names = [n for n in upstream if n in layer_references(view)]
    done: set[str] = set()
    result, pass_of, passes = {}, {}, 0
    while len(done) < len(names):
        group = [n for n in names if n not in done and upstream[n] <= done]
        passes += 1
        loaded = model_io.LoadedModel(work, origin)
        collected = collect_moments(loaded, source, _stats_options(options), view=GraphView(work), runner=runner)
        for name in group:
            moments = collected.layers[name].moments
            var = moments.variance(ddof=1 if options.unbiased else 0)
            result[name], pass_of[name] = (moments.mean, var), passes
        set_running_statistics(work, {name: result[name] for name in group})
        done.update(group)
        log.info("pass %d: re-estimated %s", passes, ", ".join(group))
    return result, pass_of


def _onepass(work: onnx.ModelProto, source: DataSource, options: RecalibrateOptions, origin: Path, runner=None):
    """Train-mode pass; equal-weight average of batch means and unbiased batch variances."""
    loaded = model_io.LoadedModel(work, origin)
    collector = Collector(loaded, _stats_options(options, mode="train"), GraphView(work), runner)
    taps = collector.instrumented.taps
    sums = {t.layer: [np.zeros(t.channels), np.zeros(t.channels)] for t in taps}
    by_layer = TapAccumulator(collector.instrumented).by_layer  # its column maps, built once
    batches = 0
    for batch in (runner or Collector.batch_results)(collector, source, None):
        for layer, m in by_layer(batch.count, batch.mean, batch.m2).items():
            sums[layer][0] += m.mean
            sums[layer][1] += m.variance(ddof=1) if m.count > 1 else m.variance(0)
        batches += 1
    return {name: (s[0] / batches, s[1] / batches) for name, s in sums.items()}, dict.fromkeys(sums, 1)


# -- reporting -------------------------------------------------------------------------------------
def _compare(
    before: model_io.LoadedModel,
    after: model_io.LoadedModel,
    source: DataSource,
    options: RecalibrateOptions,
    pass_of: dict[str, int],
    runner=None,
) -> tuple[LayerChange, ...]:
    results = []
    for loaded in (before, after):
        view = GraphView(loaded.model, TensorStore(loaded))
        collected = collect_moments(loaded, source, _stats_options(options), view=view, runner=runner)
        results.append(summarize(str(loaded.path), collected, layer_references(view), {}, "eval"))
    after_by_name = {layer.name: layer for layer in results[1].layers}
    return tuple(
        LayerChange(b.name, pass_of.get(b.name, 0), b, after_by_name[b.name])
        for b in results[0].layers
        if b.name in after_by_name
    )


def _as_exported(loaded: model_io.LoadedModel, planned) -> Path | onnx.ModelProto:
    """The input model as onnxruntime can run it: its path, or (with training-mode BNs) an
    in-memory copy whose one-output training-mode BNs get the outputs onnxruntime requires."""
    if not planned:
        return loaded.path
    model = onnx.ModelProto()
    model.CopyFrom(loaded.model)
    if loaded.has_external_data:
        model_io.materialize_external_data(loaded, model)
    return loadable_as_exported(model)
