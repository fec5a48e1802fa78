"""``stats`` end to end: load a model, open its calibration data, collect moments, summarise,
optionally save the mergeable moments for ``merge``.

The diagnosis compares eval mode (as deployed) with train mode (each BN normalises with its batch's
statistics, which isolates it from the layers before it). The second pass, in the other mode, reads
as many batches as decide the diagnosis, spread over the data (:mod:`bnscope.stats.companion`): on
large data a small part of one more pass (see benchmarks/RESULTS.md). ``diagnose="auto"`` (the default) runs it only
when the first pass finds a layer that is not ok (and the data are not ``--random``), so a model
whose statistics match pays nothing;
``"always"`` and ``"never"`` force it. Shards never run it (a shard sees part of the data).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace

from bnscope.choices import Diagnose
from bnscope.data.choice import DataChoice
from bnscope.data.spec import input_specs, resolve_batch_size
from bnscope.distributed import ClusterOptions
from bnscope.errors import BnscopeError
from bnscope.onnxio.external_data import TensorStore
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.model_io import LoadedModel, load_model
from bnscope.onnxio.outputs import writing
from bnscope.repair.inference_mode import training_mode_layers
from bnscope.stats.collect import Collector, Progress, StatsOptions, collect_moments
from bnscope.stats.companion import companion_moments, other_mode
from bnscope.stats.gate import unsure_warning
from bnscope.stats.lineage import bn_upstream
from bnscope.stats.shards import merge_moments
from bnscope.stats.summary import (
    StatsResult,
    Thresholds,
    data_description,
    layer_references,
    summarize,
)
from bnscope.workflows.cluster import open_data
from bnscope.workflows.outputs import check_run_outputs

DIAGNOSE = tuple(d.value for d in Diagnose)
__all__ = ["StatsOptions", "Thresholds", "collect_stats", "load_model", "merge_moments", "unsure_warning"]


def collect_stats(
    model: str | os.PathLike | LoadedModel,
    data: DataChoice | str | os.PathLike | None = None,
    *,
    options: StatsOptions = StatsOptions(),
    thresholds: Thresholds = Thresholds(),
    random: bool = False,
    loader: str | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    save_moments: str | os.PathLike | None = None,
    diagnose: str = "auto",
    cluster: ClusterOptions | None = None,
    also_writes: Mapping[str, str | os.PathLike | None] | None = None,
) -> StatsResult:
    """Load a model, open its calibration data, collect and summarise. The one call the CLI makes.

    ``model`` is a path, or a model already loaded (``check`` loads it once for all its rules; the CLI
    loads it once for the statistics and ``--html``). ``also_writes`` names the run's further outputs
    (``{"--html": path}``), checked with ``save_moments`` once, after the load.
    ``data`` is a :class:`DataChoice` (its batch settings override ``options``'), or a data path with
    ``random``/``loader``/``seed`` beside it.
    ``save_moments`` also writes the mergeable moments (see :mod:`bnscope.stats.shards`); ``diagnose``
    (auto, always, never) decides the second pass in the other mode (see the module docstring).
    ``cluster`` runs the batches on a Ray cluster (:mod:`bnscope.distributed`); ``data`` may then
    also be a ``ray.data.Dataset`` or a URI / parquet path that Ray reads.
    """
    if diagnose not in DIAGNOSE:
        raise BnscopeError(f"unknown diagnose setting {diagnose!r}. Hint: one of {', '.join(DIAGNOSE)}")
    choice = DataChoice.of(data, random=random, loader=loader, seed=seed)
    options = choice.batching(options)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    outputs = {"--save-moments": save_moments, **(also_writes or {})}
    check_run_outputs(loaded, outputs, data=choice.path, loader=choice.loader)
    specs = input_specs(loaded.model)
    samples = max(32, resolve_batch_size(options.batch_size, specs, 32))  # random: at least one whole batch
    how = {"random": choice.random, "loader": choice.loader, "seed": choice.seed, "random_samples": samples}
    source, runner = open_data(choice.source(data), specs, cluster, options.shard, **how)
    view = GraphView(loaded.model, TensorStore(loaded))
    _check_layer_names(thresholds, view)
    collected = collect_moments(loaded, source, options, progress, view, runner)
    references = layer_references(view)
    if save_moments is not None:
        from bnscope.stats.shards import file_fingerprint
        from bnscope.stats.shards import save_moments as save

        header = {
            "model": str(loaded.path),
            "fingerprint": file_fingerprint(loaded.path),
            "mode": options.mode,
            "batch_size": options.batch_size,
            "max_batches": options.max_batches,
            "shard": list(options.shard) if options.shard else None,
            "data": data_description(source),
        }
        with writing(save_moments, "the moments"):
            save(save_moments, collected, references, header)
    summary = {  # summarize's arguments besides the moments, for this pass and the companion's
        "model": str(loaded.path),
        "references": references,
        "data": data_description(source),
        "mode": options.mode,
        "thresholds": thresholds,
        "upstream": bn_upstream(view),
    }
    result = summarize(collected=collected, **summary)
    if _second_pass_wanted(result, diagnose, options):
        collector = Collector(loaded, other_mode(options), view, runner)
        _, result = companion_moments(collector, source, collected.batches, collected, summary, progress)
    return _with_training_mode_note(result, view)


def _with_training_mode_note(result: StatsResult, view: GraphView) -> StatsResult:
    """Says which BNs were exported in training mode: as exported they ignore the running
    statistics compared here, whatever the diagnosis finds."""
    names = [view.node_name(idx) for idx in training_mode_layers(view)]
    if not names:
        return result
    note = (
        f"{len(names)} layer(s) exported in training mode ({', '.join(names[:4])}"
        f"{', ...' if len(names) > 4 else ''}): as exported they normalise with batch statistics and ignore "
        "the running statistics compared here; bnscope recalibrate makes them inference BNs holding statistics "
        "re-estimated on your data"
    )
    return replace(result, reading=(*result.reading, note))


def _second_pass_wanted(result: StatsResult, diagnose: str, options: StatsOptions) -> bool:
    if diagnose == "never" or options.shard is not None or not result.layers:
        return False
    if result.data.get("random") and diagnose == "auto":
        return False  # random inputs differ from training everywhere; a diagnosis says nothing
    return diagnose == "always" or any(layer.verdict != "ok" for layer in result.layers)


def _check_layer_names(thresholds: Thresholds, view: GraphView) -> None:
    """A per-layer limit naming no BN layer would be ignored silently (a typo): refuse it."""
    names = [view.node_name(i) for i in view.bn_indices()]
    unknown = sorted(set(thresholds.per_layer_max_d) - set(names))
    if unknown:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise BnscopeError(
            f"--layer-max-d names {', '.join(map(repr, unknown))}, which is no BatchNormalization layer of the model. "
            f"Hint: the BN layers are {shown or 'none'} (bnscope inspect lists them)"
        )
