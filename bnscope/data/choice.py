"""Which data a run reads and how it batches them: one :class:`DataChoice`, built once (the CLI's
``--data/--random/--loader/--seed/--batch-size/--max-batches``) and handed to every workflow, after
Polygraphy's ``DataLoaderArgs``: one object owns the data options, their exclusions and the loader.

``random`` is explicit for ``stats``, ``check`` and ``recalibrate`` (they need data); ``fold`` and
``run`` feed seeded random data when nothing is chosen (``default_random``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import onnx

from bnscope.data.nonfinite import refuse_nonfinite
from bnscope.data.sources import open_source
from bnscope.data.spec import DataSource, input_specs, model_batch_size, resolve_batch_size
from bnscope.errors import BnscopeError

PathLike = str | os.PathLike


def settings_class(cls):
    """A settings dataclass for the public API: an unknown keyword is a ``BnscopeError`` naming the
    settings there are (not a ``TypeError``)."""
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


def as_path(settings, name: str) -> None:
    """Makes the setting ``name`` of a frozen dataclass a ``Path`` (a ``str`` is accepted)."""
    value = getattr(settings, name)
    if value is None or isinstance(value, Path):
        return
    if not isinstance(value, (str, os.PathLike)):
        raise BnscopeError(
            f"{type(settings).__name__}({name}=...) is of type {type(value).__name__}, not a path. Hint: pass a str or Path"
        )
    object.__setattr__(settings, name, Path(value))


@settings_class
@dataclass(frozen=True)
class DataChoice:
    """Which inputs to feed: a path, a loader, or seeded random data; at most one of them.

    ``batch_size`` None means the model's own batch size where it fixes one, else the workflow's
    default (``default_batch_size`` where set); ``max_batches`` None means the workflow's default
    (all the data for statistics, :data:`VERIFY_BATCHES` for a verification).
    """

    path: Path | None = None
    loader: str | None = None
    seed: int = 0
    batch_size: int | None = None
    max_batches: int | None = None
    default_batch_size: int = 8
    random: bool = False

    def __post_init__(self) -> None:
        as_path(self, "path")
        given = [n for n, v in (("--data", self.path), ("--random", self.random), ("--loader", self.loader)) if v]
        if len(given) > 1:
            raise BnscopeError(f"{' and '.join(given)} given. Hint: choose one data source")
        for name in ("batch_size", "max_batches"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                option, words = name.replace("_", "-"), name.replace("_", " ")
                raise BnscopeError(f"{words} {value!r} is not a positive integer. Hint: use --{option} 1 or more")

    @classmethod
    def of(
        cls, data: DataChoice | PathLike | None, *, random: bool = False, loader: str | None = None, seed: int = 0
    ) -> DataChoice:
        """The choice a workflow was given: a ``DataChoice`` as it is, or the loose form (a path, ``random``,
        ``loader``, ``seed``) of the library's older calls, made into one."""
        if not isinstance(data, DataChoice):
            local = data is None or isinstance(data, (str, os.PathLike))  # else data a cluster reads (--ray)
            return cls(path=data if local else None, random=random, loader=loader, seed=seed)
        if random or loader is not None:
            raise BnscopeError("a DataChoice and random/loader given. Hint: put every data setting in the DataChoice")
        return data

    def source(self, data: DataChoice | PathLike | object | None = None):
        """What to open: the given data as the caller gave it (a URI, or a ``ray.data.Dataset``, stays as it
        is), or this choice's path."""
        return self.path if data is None or isinstance(data, DataChoice) else data

    def batching(self, options):
        """``options`` (a dataclass with ``batch_size`` and ``max_batches``) with the batch settings this
        choice sets; the ones it leaves None keep the options' values."""
        chosen = {k: getattr(self, k) for k in ("batch_size", "max_batches") if getattr(self, k) is not None}
        return replace(options, **chosen)

    @property
    def given(self) -> bool:
        """Whether the user chose data (a path, a loader or ``random``)."""
        return bool(self.path is not None or self.loader or self.random)

    def open(
        self, model: onnx.ModelProto, random_samples: int | None = None, default_random: bool = False
    ) -> DataSource:
        """The data source for ``model``; random data when chosen, or when nothing is and ``default_random``."""
        size = self.batch_size_for(model) if random_samples is None else None
        return open_source(
            self.path,
            input_specs(model),
            random=self.random or (default_random and not self.given),
            loader=self.loader,
            seed=self.seed,
            random_samples=random_samples or size * (self.max_batches or VERIFY_BATCHES),
        )

    def batches(self, model: onnx.ModelProto) -> tuple[list[dict], DataSource]:
        """All verification batches in memory (a few; random data when nothing is chosen), and their source."""
        source = self.open(model, default_random=True)
        batches = list(source.batches(self.batch_size_for(model), self.max_batches or VERIFY_BATCHES))
        for number, batch in enumerate(batches, 1):
            refuse_nonfinite(batch, source, number, "a comparison on them proves nothing", "clean the data")
        return batches, source

    def batch_size_for(self, model: onnx.ModelProto) -> int:
        """The batch size to feed ``model``; one its fixed batch size contradicts is refused."""
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


VERIFY_BATCHES = 4  # batches a verification (fold, run --compare) reads by default
