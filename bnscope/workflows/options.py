"""Settings shared by the fold and run workflows: where their data comes from, how to fold."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import onnx

from bnscope.data.sources import open_source
from bnscope.data.spec import (
    DataSource,
    input_specs,
    model_batch_size,
    resolve_batch_size,
)
from bnscope.errors import BnscopeError
from bnscope.fold.plan import FoldOptions


def _settings(cls):
    """A settings dataclass for the public API: an unknown keyword is a ``BnscopeError`` naming the
    settings there are (not a ``TypeError``), and a path given as ``str`` becomes a ``Path``."""
    names = [f.name for f in fields(cls)]
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise BnscopeError(
                f"{cls.__name__} has no setting {', '.join(map(repr, unknown))}. Hint: its settings are {', '.join(names)}"
            )
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def _as_path(settings, name: str) -> None:
    value = getattr(settings, name)
    if value is None or isinstance(value, Path):
        return
    if not isinstance(value, (str, os.PathLike)):
        raise BnscopeError(
            f"{type(settings).__name__}({name}=...) is of type {type(value).__name__}, not a path. Hint: pass a str or Path"
        )
    object.__setattr__(settings, name, Path(value))


@_settings
@dataclass(frozen=True)
class DataChoice:
    """Which inputs to feed: a path, a loader, or seeded random data (the default).

    ``batch_size`` None means the model's own batch size where it fixes one, else
    ``default_batch_size``; a batch size the model's fixed one contradicts is refused.
    """

    path: Path | None = None
    loader: str | None = None
    seed: int = 0
    batch_size: int | None = None
    max_batches: int = 4
    default_batch_size: int = 8

    def __post_init__(self) -> None:
        _as_path(self, "path")

    def open(self, model: onnx.ModelProto) -> DataSource:
        random = self.path is None and self.loader is None
        return open_source(
            self.path,
            input_specs(model),
            random=random,
            loader=self.loader,
            seed=self.seed,
            random_samples=self.batch_size_for(model) * self.max_batches,
        )

    def batches(self, model: onnx.ModelProto) -> tuple[list[dict], DataSource]:
        """All verification batches in memory (a few), and their source for the report."""
        source = self.open(model)
        batches = list(source.batches(self.batch_size_for(model), self.max_batches))
        for number, batch in enumerate(batches, 1):
            _refuse_nonfinite(batch, source, number)
        return batches, source

    def batch_size_for(self, model: onnx.ModelProto) -> int:
        inputs = input_specs(model)
        size, fixed = resolve_batch_size(self.batch_size, inputs, self.default_batch_size), model_batch_size(inputs)
        if fixed == 0:
            raise BnscopeError(
                "the model fixes its batch size to 0, so it takes no samples. Hint: re-export it with a dynamic "
                "or positive batch size"
            )
        if fixed is not None and size != fixed:
            raise BnscopeError(
                f"batch size {size} does not fit the model, which fixes its batch size to "
                f"{fixed}. Hint: use batch size {fixed}, or leave it out"
            )
        return size


def _refuse_nonfinite(batch: dict, source: DataSource, number: int) -> None:
    """NaN/Inf inputs make every compared output NaN, and NaN compares as "no difference": refuse
    them, as ``stats`` does."""
    counts = {
        name: int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        for name, a in batch.items()
        if np.asarray(a).dtype.kind == "f"
    }
    where = ", ".join(f"{count} in '{name}'" for name, count in counts.items() if count)
    if where:
        raise BnscopeError(
            f"{source.description}: batch {number} holds NaN/Inf values ({where}); a comparison on them "
            "proves nothing. Hint: clean the data"
        )


@_settings
@dataclass(frozen=True)
class FoldSettings:
    """How ``fold_model`` folds: ``output`` (a str or Path; None only with ``dry_run``) and the rest."""

    output: Path | None
    options: FoldOptions = FoldOptions()
    verify: bool = True
    dry_run: bool = False
    force: bool = False
    data: DataChoice = DataChoice()
    atol: float | None = None
    rtol: float | None = None
    providers: tuple[str, ...] = ("cpu",)
    allow_fallback: bool = False

    def __post_init__(self) -> None:
        _as_path(self, "output")
