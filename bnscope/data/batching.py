"""Re-batching: sample sources cut and join their chunks into batches; given feeds pass one by one.

Sample sources (``.npz``, ``.npy``, folders of them, image folders, random data) are re-batched to
``batch_size`` across file boundaries; the last batch may be smaller. Files are read one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from bnscope.data.spec import DataSource, Feed, one_line
from bnscope.errors import BnscopeError


@dataclass(frozen=True)
class Chunk:
    """Rows [0, count) of some data; ``read(start, stop)`` returns a slice of them."""

    count: int
    read: Callable[[int, int], Feed]


class _LastFile:
    """Keeps the arrays of the file read last, so a file spanning batches is loaded once."""

    def __init__(self) -> None:
        self.key: object = None
        self.arrays: Feed = {}

    def get(self, key: object, load: Callable[[], Feed]) -> Feed:
        if key != self.key:
            self.key, self.arrays = None, {}  # free the previous file before loading the next
            self.arrays = load()
            self.key = key
        return self.arrays


@dataclass(frozen=True)
class FileEntry:
    """One .npy/.npz/image file: its sample count and how to load its arrays."""

    key: object
    count: int
    expand: dict[str, bool]
    load: Callable[[], Feed]

    def chunk(self, cache: _LastFile) -> Chunk:
        def read(start: int, stop: int) -> Feed:
            arrays = cache.get(self.key, self.load)
            return {name: (a[None] if self.expand[name] else a)[start:stop] for name, a in arrays.items()}

        return Chunk(self.count, read)


def stream_entries(entries: list[FileEntry], cache: _LastFile | None = None) -> Iterator[Chunk]:
    """The entries' chunks, sharing one cache: one file is in memory at a time. A ``cache`` kept
    by the source (:func:`kept_file`) also outlives the pass: a second pass over data in one file
    (the diagnosis's, ``stats``) reads the file once."""
    cache = cache or _LastFile()
    return (entry.chunk(cache) for entry in entries)


def kept_file() -> _LastFile:
    """A last-file cache for a source to keep across its passes."""
    return _LastFile()


@dataclass
class SampleSource(DataSource):
    chunks: Callable[[], Iterable[Chunk]] = field(repr=False)
    label_reader: Callable[[], np.ndarray | None] | None = field(default=None, repr=False)

    def labels(self) -> np.ndarray | None:
        return self.label_reader() if self.label_reader else None

    def _plan(self, batch_size: int) -> Iterator[Callable[[], Feed]]:
        pieces: list[tuple[Chunk, int, int]] = []
        filled = 0
        for chunk in self.chunks():
            start = 0
            while start < chunk.count:
                stop = min(chunk.count, start + batch_size - filled)
                pieces.append((chunk, start, stop))
                filled, start = filled + stop - start, stop
                if filled == batch_size:
                    yield partial(_read_pieces, pieces)
                    pieces, filled = [], 0
        if pieces:
            yield partial(_read_pieces, pieces)


def _read_pieces(pieces: list[tuple[Chunk, int, int]]) -> Feed:
    parts = [chunk.read(start, stop) for chunk, start, stop in pieces]
    if len(parts) == 1:
        return parts[0]
    try:
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    except ValueError as exc:
        raise BnscopeError(
            f"cannot batch samples of different shapes ({one_line(exc)}). Hint: use batch size 1"
        ) from exc


@dataclass
class GivenSource(DataSource):
    """Feeds used as given, one batch each: ONNX test data sets and loader scripts."""

    feeds: Callable[[], Iterable[Callable[[], Mapping[str, object]]]] = field(repr=False)

    def _plan(self, batch_size: int) -> Iterator[Callable[[], Mapping[str, object]]]:
        return iter(self.feeds())


def display_name(path: Path) -> str:
    """How a data path shows in a source's description: its name, ``name/`` for a folder."""
    return f"{path.name}/" if path.is_dir() else path.name
