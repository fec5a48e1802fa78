"""``stats`` end to end: load a model, open its calibration data, collect moments, summarise,
optionally save the mergeable moments for ``merge``.
"""

from __future__ import annotations

import os

from bnscope.data.sources import open_source
from bnscope.data.spec import (
    input_specs,
)
from bnscope.onnxio.external_data import TensorStore
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.model_io import LoadedModel, load_model
from bnscope.stats.collect import Progress, StatsOptions, collect_moments
from bnscope.stats.summary import (
    StatsResult,
    Thresholds,
    data_description,
    layer_references,
    summarize,
)


def collect_stats(
    model: str | os.PathLike | LoadedModel,
    data: str | os.PathLike | None = None,
    *,
    options: StatsOptions = StatsOptions(),
    thresholds: Thresholds = Thresholds(),
    random: bool = False,
    loader: str | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    save_moments: str | os.PathLike | None = None,
) -> StatsResult:
    """Load a model, open its calibration data, collect and summarise. The one call the CLI makes.

    ``model`` is a path, or a model already loaded (``check`` loads it once for all its rules).
    ``save_moments`` also writes the mergeable moments (see :mod:`bnscope.stats.shards`).
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    source = open_source(data, input_specs(loaded.model), random=random, loader=loader, seed=seed)
    view = GraphView(loaded.model, TensorStore(loaded))
    collected = collect_moments(loaded, source, options, progress, view)
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
        save(save_moments, collected, references, header)
    return summarize(str(loaded.path), collected, references, data_description(source), options.mode, thresholds)
