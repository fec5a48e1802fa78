"""Data a Ray cluster reads itself: a ``ray.data.Dataset`` the user has, or a URI / parquet path read
with Ray Data's readers (``s3://``, ``gs://``, ``*.parquet``, ``*.npy``).

Rows are samples: a column per model input (by name; a single-input model takes any single column,
``data`` from ``read_numpy`` included). bnscope cuts them into model batches of exactly
``batch_size`` rows in dataset order (``repartition(..., strict=True)``), so the batches are those
of one process reading the same rows. Local files in bnscope's formats are not read here: every
actor opens them with bnscope's own readers (:mod:`bnscope.distributed.ray_runner`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray.data

from bnscope.data.spec import DataSource, Feed, InputSpec
from bnscope.errors import BnscopeError

# typer turns "s3://bucket/x" into the Path "s3:/bucket/x"; both spellings are URIs
_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):/+(.*)$")


@dataclass
class DatasetSource(DataSource):
    """Samples in a Ray Dataset. Read on the driver only for a few batches (the written model's
    run check); the statistics read it on the cluster."""

    dataset: Any = field(default=None, repr=False)

    def _plan(self, batch_size: int):
        for batch in self.dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield partial(feed_of, batch, self.inputs)


def dataset_source(data: Any, inputs: list[InputSpec]) -> DatasetSource | None:
    """``data`` as a DatasetSource when Ray reads it (a Dataset, a URI, parquet); None for local data
    in bnscope's formats."""
    if isinstance(data, ray.data.Dataset):
        return DatasetSource("a Ray Dataset", None, False, inputs, dataset=data)
    if data is None:
        return None
    text = os.fspath(data)
    uri = _URI.match(text)
    if uri:
        text = f"{uri.group(1)}://{uri.group(2)}"
    parquet = text.lower().endswith(".parquet") or (not uri and Path(text).is_dir() and _parquet_folder(text))
    if not (uri or parquet):
        return None
    numpy = not parquet and text.lower().endswith(".npy")
    dataset = ray.data.read_numpy(text) if numpy else ray.data.read_parquet(text)
    return DatasetSource(text, None, False, inputs, dataset=dataset)


def _parquet_folder(folder: str) -> bool:
    return any(p.suffix.lower() == ".parquet" for p in Path(folder).iterdir())


def feed_of(batch: dict[str, np.ndarray], inputs: list[InputSpec]) -> Feed:
    """The model's feed from a Ray batch: columns by input name, or a single-input model's one column;
    rows held as lists (parquet) stacked and shaped like the input."""
    names = [spec.name for spec in inputs]
    if all(name in batch for name in names):
        columns = {name: batch[name] for name in names}
    elif len(names) == 1 and len(batch) == 1:
        columns = {names[0]: next(iter(batch.values()))}
    else:
        raise BnscopeError(
            f"the Ray dataset has columns {', '.join(sorted(batch))}, the model takes {', '.join(names)}. "
            "Hint: name a column after each model input (a single-input model takes any single column)"
        )
    return {spec.name: _shaped(columns[spec.name], spec) for spec in inputs}


def _shaped(column: np.ndarray, spec: InputSpec) -> np.ndarray:
    array = np.stack([np.asarray(row) for row in column]) if column.dtype == object else np.asarray(column)
    tail = spec.shape[1:]
    if array.ndim == 2 and len(tail) > 1 and all(isinstance(d, int) for d in tail) and array.shape[1] == np.prod(tail):
        array = array.reshape((array.shape[0], *tail))  # flat rows (parquet lists) in the input's shape
    return array


def batched(dataset, batch_size: int, max_batches: int | None):
    """The dataset cut into blocks of exactly ``batch_size`` rows (the last may be smaller), in order."""
    if max_batches is not None:
        dataset = dataset.limit(batch_size * max_batches)
    return dataset.repartition(target_num_rows_per_block=batch_size, strict=True)
