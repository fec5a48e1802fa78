"""Calibration data sources: files, folders, images, a loader script or random data -> feed dicts.

A source yields feed dicts ``{input_name: array}`` whose first axis is the sample axis.

* Sample sources (``.npz``, ``.npy``, folders of them, image folders, random data) are re-batched to
  ``batch_size`` across file boundaries; the last batch may be smaller.
* An array whose rank is one less than its model input's rank holds one sample and gets a batch axis
  (``(3, 32, 32)`` for an input ``[N, 3, 32, 32]``); an array of the full rank holds ``shape[0]`` samples.
* Folders are read in name order (plain string sort: zero-pad numbers), one file at a time; ``.npy``
  files are memory-mapped. Nothing is ever unpickled (``allow_pickle=False`` everywhere).
* Feeds are used as given, one batch each, ``batch_size`` not applying, from a ``loader`` script
  (Polygraphy's data-loader convention: a function that returns or yields feed dicts; a bare array
  feeds a single-input model) and from ONNX test data (``input_0.pb``... in a folder or in each of its
  ``test_data_set_*`` folders; a tensor goes to the input it names, else to input ``i`` of
  ``input_<i>.pb``): model-ready tensors whose first axis need not be a sample axis.
* ``shard=(i, n)``: batch ``k`` goes to shard ``k % n``. ``max_batches`` counts the batches of the whole
  run, before sharding, so the n sharded runs together are exactly the unsharded run.
* Every batch passes :func:`validate_batch` before it is yielded. NaN/Inf values are not errors:
  :func:`nonfinite_count` counts them for the report.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import BinaryIO

import numpy as np
import onnx
from onnx import numpy_helper

from bnscope.errors import BnscopeError

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
LABELS_KEY = "labels"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
_PB_NAME = re.compile(r"input_(\d+)\.pb")
_FEEDABLE = frozenset(
    getattr(onnx.TensorProto, name)
    for name in ("FLOAT", "FLOAT16", "DOUBLE", "BOOL", "INT8", "INT16", "INT32", "INT64",
                 "UINT8", "UINT16", "UINT32", "UINT64")
)


@dataclass(frozen=True)
class InputSpec:
    """One model input. A ``str`` (named) or ``None`` dimension is dynamic."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class ImageOptions:
    """How images become an input tensor: ``(pixels * scale - mean) / std``, per channel.

    Attributes:
        size: (height, width) to resize to (bilinear). Defaults to the model's fixed H and W.
        layout: "NCHW" or "NHWC". Defaults to a guess: the axis (1 or 3) of size 3 or 1.
        mean: per-channel mean (or one value for all), applied after scaling. Defaults to 0.
        std: per-channel std (or one value for all). Defaults to 1.
        scale: pixel scale factor. Defaults to 1/255 (pixels in [0, 1]).
    """

    size: tuple[int, int] | None = None
    layout: str | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Returns the inputs a caller feeds: graph inputs that are not initializers."""
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    return [_input_spec(value) for value in graph.input if value.name not in constants]


def _input_spec(value: onnx.ValueInfoProto) -> InputSpec:
    if not value.type.HasField("tensor_type"):
        kind = value.type.WhichOneof("value") or "untyped"
        raise BnscopeError(f"input '{value.name}' is a {kind}, not a tensor. Hint: bnscope feeds tensor inputs only")
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type not in _FEEDABLE:
        raise BnscopeError(
            f"input '{value.name}' has element type {_type_name(tensor_type.elem_type)}, which bnscope cannot "
            "feed from numpy. Hint: export the model with a float32 input and cast inside the graph"
        )
    if not tensor_type.HasField("shape"):
        raise BnscopeError(
            f"input '{value.name}' has no shape in the model. Hint: set it, e.g. with onnx.tools.update_model_dims"
        )
    shape = tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
        for d in tensor_type.shape.dim
    )
    return InputSpec(value.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)), shape)


def _type_name(elem_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"#{elem_type}"


def fixed_batch_size(inputs: list[InputSpec]) -> int | None:
    """Returns the batch size every input fixes on axis 0, or None when it is dynamic or differs."""
    firsts = {spec.shape[0] if spec.shape else None for spec in inputs}
    first = firsts.pop() if len(firsts) == 1 else None
    return first if isinstance(first, int) else None


# --- validation -------------------------------------------------------------------------------


def validate_batch(batch: Mapping[str, object], inputs: list[InputSpec]) -> Feed:
    """Checks one feed dict against the model's inputs and returns it ready to feed.

    Casts float data to the input's float type (float64 -> float32 -> float16) and integer data to
    the input's integer type when the values fit; drops a ``labels`` entry. Raises BnscopeError for
    a missing or unexpected name, a wrong rank or fixed dimension, or int/float/bool mismatches.
    """
    if not isinstance(batch, Mapping):
        raise BnscopeError(
            f"a batch is a {type(batch).__name__}, not a dict of input arrays. "
            f"Hint: give {{input_name: array}} for inputs {_names(inputs)}"
        )
    expected = {spec.name for spec in inputs}
    for key in batch:
        if key not in expected and key != LABELS_KEY:
            raise BnscopeError(
                f"unexpected input '{key}' in the data; the model's inputs are {_names(inputs)}. "
                "Hint: key each array by a model input name"
            )
    dims: dict[str, tuple[int, str]] = {}
    feed = {}
    for spec in inputs:
        if spec.name not in batch:
            raise BnscopeError(
                f"missing input '{spec.name}' in the data; the model's inputs are {_names(inputs)}. "
                "Hint: give one array per input, keyed by input name"
            )
        feed[spec.name] = _check_array(spec, batch[spec.name], dims)
    return feed


def _check_array(spec: InputSpec, value: object, dims: dict[str, tuple[int, str]]) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise BnscopeError(
            f"input '{spec.name}': data of dtype {array.dtype} is not numeric. "
            f"Hint: convert it to a plain numeric array of dtype {spec.dtype}"
        )
    _check_shape(spec, array.shape, dims)
    return np.ascontiguousarray(_cast(spec, array))


def _check_shape(spec: InputSpec, shape: tuple[int, ...], dims: dict[str, tuple[int, str]]) -> None:
    fits = len(shape) == len(spec.shape) and all(
        not isinstance(want, int) or want == got for want, got in zip(spec.shape, shape)
    )
    if not fits:
        raise BnscopeError(
            f"input '{spec.name}': expected shape {_fmt_shape(spec.shape)}{_dynamic_note(spec.shape)}, "
            f"got {_fmt_shape(shape)}. Hint: {_shape_hint(spec, shape)}"
        )
    for want, got in zip(spec.shape, shape):
        if isinstance(want, str):
            seen, owner = dims.setdefault(want, (got, spec.name))
            if seen != got:
                raise BnscopeError(
                    f"input '{spec.name}': dimension {want} is {got} but input '{owner}' has {want}={seen}. "
                    f"Hint: give every input the same {want}"
                )


def _shape_hint(spec: InputSpec, shape: tuple[int, ...]) -> str:
    same_rest = len(shape) == len(spec.shape) and _fmt_shape(shape[1:]) == _fmt_shape(spec.shape[1:])
    if same_rest and isinstance(spec.shape[0], int):
        return f"the model fixes the batch size to {spec.shape[0]}: use that batch size and a sample count divisible by it"
    return "reshape or resize the data to the model's input shape"


def _cast(spec: InputSpec, array: np.ndarray) -> np.ndarray:
    want, have = spec.dtype, array.dtype
    if have == want:
        return array
    if want.kind == "f" and have.kind == "f":
        logger.debug("input '%s': casting %s data to %s", spec.name, have, want)
        return array.astype(want)
    if want.kind in "iu" and have.kind in "iu":
        info = np.iinfo(want)
        if array.size == 0 or (int(array.min()) >= info.min and int(array.max()) <= info.max):
            logger.debug("input '%s': casting %s data to %s", spec.name, have, want)
            return array.astype(want)
        raise BnscopeError(
            f"input '{spec.name}': {have} values do not fit in the model's {want}. Hint: check the data's range"
        )
    raise BnscopeError(
        f"input '{spec.name}': expected {want} data, got {have}. "
        f"Hint: convert it with .astype(np.{want.name}) if the values mean the same thing"
    )


def nonfinite_count(batch: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Returns the number of NaN/Inf values per array (0 for integer and bool arrays)."""
    counts = {}
    for name, value in batch.items():
        array = np.asarray(value)
        counts[name] = int(array.size - np.count_nonzero(np.isfinite(array))) if array.dtype.kind in "fc" else 0
    return counts


def _names(inputs: list[InputSpec]) -> str:
    return ", ".join(f"'{spec.name}'" for spec in inputs)


def _fmt_shape(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _dynamic_note(shape: tuple[int | str | None, ...]) -> str:
    dynamic = ["?" if d is None else d for d in shape if not isinstance(d, int)]
    return f" ({', '.join(dynamic)} dynamic)" if dynamic else ""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- sources ----------------------------------------------------------------------------------


@dataclass
class DataSource:
    """Calibration data for a model's inputs.

    Attributes:
        description: what the data is, for reports, e.g. "calib.npz (96 samples)".
        samples: the number of samples, or None when unknown (a loader).
        is_random: True for random data: statistics from it describe nothing real.
        inputs: the model inputs the batches are validated against.
    """

    description: str
    samples: int | None
    is_random: bool
    inputs: list[InputSpec] = field(repr=False)

    def batches(
        self, batch_size: int, max_batches: int | None = None, shard: tuple[int, int] | None = None
    ) -> Iterator[Feed]:
        """Yields validated feed dicts of ``batch_size`` samples (the last may be smaller).

        Args:
            batch_size: samples per batch; ignored where feeds are used as given (loader, ONNX test data).
            max_batches: stop after this many batches of the whole run (counted before sharding).
                Defaults to all.
            shard: ``(i, n)``: yield only batches ``k`` with ``k % n == i``. Defaults to all batches.
        """
        _check_batching(batch_size, max_batches, shard)
        return self._batches(batch_size, max_batches, shard or (0, 1))

    def _batches(self, batch_size: int, max_batches: int | None, shard: tuple[int, int]) -> Iterator[Feed]:
        index, count = shard
        produced = 0
        for k, read in enumerate(self._plan(batch_size)):
            if max_batches is not None and k >= max_batches:
                break
            produced += 1
            if k % count == index:
                yield validate_batch(read(), self.inputs)
        if produced == 0:
            raise BnscopeError(f"{self.description} gave no data. Hint: check that it yields at least one batch")

    def labels(self) -> np.ndarray | None:
        """Returns the labels stored with the data (an npz ``labels`` array), in sample order, or None."""
        return None

    def _plan(self, batch_size: int) -> Iterator[Callable[[], Mapping[str, object]]]:
        raise NotImplementedError


def _check_batching(batch_size: int, max_batches: int | None, shard: tuple[int, int] | None) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BnscopeError(f"batch size {batch_size!r} is not a positive integer. Hint: use a batch size >= 1")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise BnscopeError(f"max batches {max_batches!r} is not a positive integer. Hint: use >= 1, or no limit")
    if shard is not None:
        index, count = shard
        if not (isinstance(count, int) and isinstance(index, int) and 0 <= index < count):
            raise BnscopeError(f"shard {index}/{count} is invalid. Hint: use shard (i, n) with 0 <= i < n")


@dataclass(frozen=True)
class _Chunk:
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
class _Entry:
    """One .npy/.npz/image file: its sample count and how to load its arrays."""

    key: object
    count: int
    expand: dict[str, bool]
    load: Callable[[], Feed]

    def chunk(self, cache: _LastFile) -> _Chunk:
        def read(start: int, stop: int) -> Feed:
            arrays = cache.get(self.key, self.load)
            return {name: (a[None] if self.expand[name] else a)[start:stop] for name, a in arrays.items()}

        return _Chunk(self.count, read)


def _stream(entries: list[_Entry]) -> Iterator[_Chunk]:
    """The entries' chunks, sharing one cache: one file is in memory at a time."""
    cache = _LastFile()
    return (entry.chunk(cache) for entry in entries)


@dataclass
class _SampleSource(DataSource):
    chunks: Callable[[], Iterable[_Chunk]] = field(repr=False)
    label_reader: Callable[[], np.ndarray | None] | None = field(default=None, repr=False)

    def labels(self) -> np.ndarray | None:
        return self.label_reader() if self.label_reader else None

    def _plan(self, batch_size: int) -> Iterator[Callable[[], Feed]]:
        pieces: list[tuple[_Chunk, int, int]] = []
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


def _read_pieces(pieces: list[tuple[_Chunk, int, int]]) -> Feed:
    parts = [chunk.read(start, stop) for chunk, start, stop in pieces]
    if len(parts) == 1:
        return parts[0]
    try:
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    except ValueError as exc:
        raise BnscopeError(
            f"cannot batch samples of different shapes ({_one_line(exc)}). Hint: use batch size 1"
        ) from exc


@dataclass
class _GivenSource(DataSource):
    """Feeds used as given, one batch each: ONNX test data sets and loader scripts."""

    feeds: Callable[[], Iterable[Callable[[], Mapping[str, object]]]] = field(repr=False)

    def _plan(self, batch_size: int) -> Iterator[Callable[[], Mapping[str, object]]]:
        return iter(self.feeds())


def open_source(
    spec: str | Path | None,
    inputs: list[InputSpec],
    *,
    random: bool = False,
    seed: int = 0,
    random_samples: int = 32,
    loader: str | None = None,
    image_options: ImageOptions | None = None,
) -> DataSource:
    """Opens calibration data for a model's inputs; exactly one of spec, random and loader.

    Args:
        spec: an .npz/.npy/.pb/image file, or a folder of .npy/.npz files, images, ONNX test data
            (``input_0.pb``...) or ``test_data_set_*`` folders.
        inputs: the model's inputs, from :func:`input_specs`.
        random: seeded standard-normal data instead of real data. Defaults to False.
        seed: the random seed. Defaults to 0.
        random_samples: how many random samples. Defaults to 32.
        loader: ``"file.py:func"``: imports file.py (runs its code) and iterates ``func()``.
            ``func`` defaults to ``load_data``.
        image_options: how to turn images into tensors. Defaults to ImageOptions().
    """
    if not inputs:
        raise BnscopeError("the model has no inputs to feed. Hint: bnscope needs a model with at least one input")
    chosen = [n for n, on in (("a data path", spec is not None), ("random", random), ("a loader", loader)) if on]
    if len(chosen) > 1:
        raise BnscopeError(f"got {' and '.join(chosen)} as calibration data. Hint: choose one")
    if random:
        source: DataSource = _open_random(inputs, seed, random_samples)
    elif loader:
        source = _open_loader(loader, inputs)
    elif spec is None:
        raise BnscopeError(
            "no calibration data given. Hint: pass a .npz/.npy/.pb file or folder, a loader script, or random data"
        )
    else:
        path = Path(spec)
        if not path.exists():
            raise BnscopeError(f"{path} does not exist. Hint: check the data path")
        source = _open_dir(path, inputs, image_options) if path.is_dir() else _open_file(path, inputs, image_options)
    if source.samples == 0:
        raise BnscopeError(f"{source.description} holds no samples. Hint: give at least one sample")
    logger.debug("calibration data: %s", source.description)
    return source


def _open_file(path: Path, inputs: list[InputSpec], image_options: ImageOptions | None) -> DataSource:
    suffix = path.suffix.lower()
    if suffix in _ARRAY_SUFFIXES:
        return _open_arrays(path, [path], inputs)
    if suffix == ".pb":
        return _open_pb(path, [[path]], inputs)
    if suffix in IMAGE_SUFFIXES:
        return _open_images(path, [path], inputs, image_options or ImageOptions())
    raise BnscopeError(
        f"{path} is not a data file bnscope reads ({suffix or 'no suffix'}). "
        "Hint: use .npz, .npy, ONNX .pb, PNG/JPEG, or a folder of them"
    )


def _open_dir(folder: Path, inputs: list[InputSpec], image_options: ImageOptions | None) -> DataSource:
    children = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    files = [p for p in children if p.is_file()]
    kinds = {
        "test_data_set_* folders": [p for p in children if p.is_dir() and p.name.startswith("test_data_set_")],
        "input_*.pb files": [p for p in files if _PB_NAME.fullmatch(p.name)],
        ".npy/.npz files": [p for p in files if p.suffix.lower() in _ARRAY_SUFFIXES],
        "images": [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
    }
    found = {kind: paths for kind, paths in kinds.items() if paths}
    if not found:
        raise BnscopeError(f"{folder} holds no .npy, .npz, .pb or image files. Hint: check the data folder")
    if len(found) > 1:
        raise BnscopeError(f"{folder} mixes {' and '.join(found)}. Hint: keep one kind of data per folder")
    kind, paths = found.popitem()
    if kind == "test_data_set_* folders":
        return _open_pb(folder, [_pb_files(p) for p in sorted(paths, key=_natural_key)], inputs)
    if kind == "input_*.pb files":
        return _open_pb(folder, [_pb_files(folder)], inputs)
    if kind == "images":
        return _open_images(folder, paths, inputs, image_options or ImageOptions())
    return _open_arrays(folder, paths, inputs)


def _natural_key(path: Path) -> tuple[int, str]:
    digits = re.search(r"(\d+)$", path.name)
    return (int(digits.group(1)) if digits else sys.maxsize, path.name)


# --- .npy / .npz ------------------------------------------------------------------------------


def _open_arrays(where: Path, paths: list[Path], inputs: list[InputSpec]) -> DataSource:
    entries = [_scan_array_file(path, inputs) for path in paths]
    samples = sum(entry.count for entry in entries)
    files = f"{len(paths)} files, " if where.is_dir() else ""
    label_paths = [p for p in paths if p.suffix.lower() == ".npz"] if LABELS_KEY not in _input_names(inputs) else []

    return _SampleSource(
        f"{_display(where)} ({files}{samples} samples)", samples, False, inputs, partial(_stream, entries),
        partial(_read_labels, paths, label_paths),
    )


def _scan_array_file(path: Path, inputs: list[InputSpec]) -> _Entry:
    headers = _array_headers(path)
    for key, (_, dtype) in headers.items():
        if dtype.hasobject:
            raise BnscopeError(
                f"{path}{f' (array {key!r})' if key else ''} contains Python objects; bnscope never unpickles. "
                "Hint: save plain numeric arrays with np.savez"
            )
    members = _match_members(path, list(headers), inputs)
    count, expand = _sample_layout(path, {name: headers[key][0] for name, key in members.items()}, inputs)
    return _Entry(path, count, expand, partial(_load_arrays, path, members))


def _array_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    hint = "re-save it with np.save / np.savez"
    if path.suffix.lower() == ".npy":
        with _reading(path, hint), open(path, "rb") as f:
            return {"": _npy_header(f)}
    with _reading(path, hint), zipfile.ZipFile(path) as archive:
        headers = {}
        for member in archive.namelist():
            if member.endswith(".npy"):
                with archive.open(member) as f:
                    headers[member[: -len(".npy")]] = _npy_header(f)
        return headers


def _npy_header(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


def _match_members(path: Path, keys: list[str], inputs: list[InputSpec]) -> dict[str, str]:
    names = _input_names(inputs)
    feedable = [k for k in keys if k != LABELS_KEY or LABELS_KEY in names]
    if len(inputs) == 1:
        name = inputs[0].name
        if name in feedable:
            return {name: name}
        if len(feedable) == 1:
            return {name: feedable[0]}
        held = ", ".join(f"'{k}'" for k in feedable) or "no arrays"
        raise BnscopeError(f"{path} holds {held}, none named after input '{name}'. Hint: np.savez(path, {name}=array)")
    if path.suffix.lower() == ".npy":
        raise BnscopeError(
            f"{path} holds one array but the model has inputs {_names(inputs)}. "
            "Hint: save an .npz with one array per input name (np.savez)"
        )
    for key in feedable:
        if key not in names:
            raise BnscopeError(
                f"{path} holds array '{key}', which is not a model input ({_names(inputs)}). "
                "Hint: name each array after an input"
            )
    for name in names:
        if name not in feedable:
            raise BnscopeError(
                f"{path} has no array for input '{name}'; the model's inputs are {_names(inputs)}. "
                "Hint: name each array after an input"
            )
    return {name: name for name in names}


def _sample_layout(
    path: Path, shapes: Mapping[str, tuple[int, ...]], inputs: list[InputSpec]
) -> tuple[int, dict[str, bool]]:
    """Returns the file's sample count and, per input, whether its array is one sample without batch axis."""
    counts, expand = {}, {}
    for spec in inputs:
        shape = shapes[spec.name]
        expand[spec.name] = len(shape) == len(spec.shape) - 1
        rows = (1, *shape) if expand[spec.name] else shape
        fits = len(rows) == len(spec.shape) and all(
            not isinstance(want, int) or want == got for want, got in zip(spec.shape[1:], rows[1:])
        )
        if not rows or not fits:
            raise BnscopeError(
                f"input '{spec.name}': {path} holds shape {_fmt_shape(shape)}, expected {_fmt_shape(spec.shape)} "
                f"or one sample of {_fmt_shape(spec.shape[1:])}. Hint: reshape the data to the model's input shape"
            )
        counts[spec.name] = rows[0]
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"'{n}': {c}" for n, c in counts.items())
        raise BnscopeError(f"{path} holds different sample counts ({listed}). Hint: give every input the same count")
    return next(iter(counts.values())), expand


def _load_arrays(path: Path, members: dict[str, str]) -> Feed:
    hint = "re-save it with np.save / np.savez"
    with _reading(path, hint):
        if path.suffix.lower() == ".npy":
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError:  # an empty array cannot be memory-mapped
                array = np.load(path, allow_pickle=False)
            return {name: array for name in members}
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[key] for name, key in members.items()}


def _read_labels(paths: list[Path], label_paths: list[Path]) -> np.ndarray | None:
    parts = []
    for path in label_paths:
        with _reading(path, "re-save it with np.savez"), np.load(path, allow_pickle=False) as npz:
            if LABELS_KEY in npz.files:
                parts.append(np.atleast_1d(npz[LABELS_KEY]))
    if not parts:
        return None
    if len(parts) != len(paths):
        raise BnscopeError(f"only {len(parts)} of {len(paths)} data files hold labels. Hint: give every file labels")
    return np.concatenate(parts)


@contextmanager
def _reading(path: Path, hint: str) -> Iterator[None]:
    """Turns the errors of reading a file into one-line BnscopeErrors."""
    try:
        yield
    except BnscopeError:
        raise
    except FileNotFoundError as exc:
        raise BnscopeError(f"{path} does not exist. Hint: check the data path") from exc
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        reason = _one_line(exc)
        if "pickle" in reason.lower() or "object arrays" in reason.lower():
            raise BnscopeError(
                f"{path} contains Python objects; bnscope never unpickles. Hint: save plain numeric arrays with np.savez"
            ) from exc
        raise BnscopeError(f"cannot read {path}: {reason}. Hint: {hint}") from exc


def _input_names(inputs: list[InputSpec]) -> list[str]:
    return [spec.name for spec in inputs]


def _display(path: Path) -> str:
    return f"{path.name}/" if path.is_dir() else path.name


# --- ONNX test data (.pb) ---------------------------------------------------------------------


def _pb_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if _PB_NAME.fullmatch(p.name)]
    if not files:
        raise BnscopeError(f"{folder} has no input_*.pb files. Hint: use onnx's test data layout (input_0.pb, ...)")
    return sorted(files, key=lambda p: int(_PB_NAME.fullmatch(p.name).group(1)))


def _open_pb(where: Path, sets: list[list[Path]], inputs: list[InputSpec]) -> DataSource:
    """Each test data set is one feed, used as given (its tensors may hold parameters, not samples)."""
    samples = sum(_pb_samples(_read_pb(files, inputs).get(inputs[0].name)) for files in sets)
    description = f"{_display(where)} ({len(sets)} ONNX test data set{'s' if len(sets) > 1 else ''}, {samples} samples)"
    return _GivenSource(description, samples, False, inputs, lambda: (partial(_read_pb, f, inputs) for f in sets))


def _pb_samples(first: np.ndarray | None) -> int:
    return first.shape[0] if first is not None and first.ndim else 1


def _read_pb(files: list[Path], inputs: list[InputSpec]) -> Feed:
    """Reads TensorProtos: by tensor name when it names an input, else by position (input_<i>.pb)."""
    names = _input_names(inputs)
    feed = {}
    for position, path in enumerate(files):
        tensor = onnx.TensorProto()
        hint = "write it with onnx.numpy_helper.from_array(array, name).SerializeToString()"
        with _reading(path, hint):
            data = path.read_bytes()
        try:
            tensor.ParseFromString(data)
            array = numpy_helper.to_array(tensor)
        except Exception as exc:  # protobuf's DecodeError, or a tensor numpy cannot represent
            raise BnscopeError(f"cannot read {path} as an ONNX TensorProto: {_one_line(exc)}. Hint: {hint}") from exc
        match = _PB_NAME.fullmatch(path.name)
        index = int(match.group(1)) if match else position
        if tensor.name in names:
            feed[tensor.name] = array
        elif index < len(names):
            feed[names[index]] = array
        else:
            raise BnscopeError(
                f"{path} has no matching input: the model has {len(names)} ({_names(inputs)}). "
                "Hint: name the tensor after an input or number the files from input_0.pb"
            )
    return feed


# --- images -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImagePlan:
    spec: InputSpec
    layout: str
    channels: int
    size: tuple[int, int]
    mean: np.ndarray
    std: np.ndarray
    scale: float


def _open_images(where: Path, paths: list[Path], inputs: list[InputSpec], options: ImageOptions) -> DataSource:
    pil = _import_pil()
    if len(inputs) != 1:
        raise BnscopeError(
            f"images feed single-input models, but the model has inputs {_names(inputs)}. "
            "Hint: use an .npz with one array per input, or a loader script"
        )
    plan = _image_plan(inputs[0], options)
    entries = [_Entry(p, 1, {plan.spec.name: True}, partial(_load_image, p, pil, plan)) for p in paths]
    height, width = plan.size

    description = f"{_display(where)} ({len(paths)} images, {height}x{width} {plan.layout})"
    return _SampleSource(description, len(paths), False, inputs, partial(_stream, entries))


def _import_pil() -> ModuleType:
    try:
        from PIL import Image
    except ImportError as exc:
        raise BnscopeError("reading images needs Pillow, which is not installed. Hint: pip install 'bnscope[images]'") from exc
    return Image


def _image_plan(spec: InputSpec, options: ImageOptions) -> _ImagePlan:
    if len(spec.shape) != 4:
        raise BnscopeError(
            f"input '{spec.name}' has shape {_fmt_shape(spec.shape)}, not an image batch [N,C,H,W] or [N,H,W,C]. "
            "Hint: feed .npy/.npz data instead"
        )
    layout = options.layout or _guess_layout(spec)
    if layout not in ("NCHW", "NHWC"):
        raise BnscopeError(f"image layout {layout!r} is not NCHW or NHWC. Hint: choose NCHW or NHWC")
    channel_axis, hw_axes = (1, (2, 3)) if layout == "NCHW" else (3, (1, 2))
    channels = spec.shape[channel_axis] if isinstance(spec.shape[channel_axis], int) else 3
    if channels not in (1, 3):
        raise BnscopeError(
            f"input '{spec.name}' has {channels} channels in {layout}; images give 1 (grayscale) or 3 (RGB). "
            "Hint: check the layout, or feed .npy/.npz data"
        )
    size = options.size or tuple(spec.shape[a] for a in hw_axes)
    if len(size) != 2 or not all(isinstance(d, int) and d > 0 for d in size):
        raise BnscopeError(
            f"input '{spec.name}' has no fixed height and width {_fmt_shape(spec.shape)}. "
            "Hint: give an image size (height, width)"
        )
    mean, std = (np.asarray(v, dtype=np.float32).reshape(-1) for v in (options.mean, options.std))
    if mean.size not in (1, channels) or std.size not in (1, channels) or not np.all(std != 0):
        raise BnscopeError(
            f"image mean {options.mean} / std {options.std} do not fit {channels} channels. "
            f"Hint: give 1 or {channels} values each, std nonzero"
        )
    return _ImagePlan(spec, layout, channels, (int(size[0]), int(size[1])), mean, std, options.scale)


def _guess_layout(spec: InputSpec) -> str:
    if spec.shape[1] in (1, 3):
        return "NCHW"
    if spec.shape[3] in (1, 3):
        return "NHWC"
    raise BnscopeError(
        f"cannot tell the image layout of input '{spec.name}' {_fmt_shape(spec.shape)}. Hint: give the layout, NCHW or NHWC"
    )


def _load_image(path: Path, pil: ModuleType, plan: _ImagePlan) -> Feed:
    height, width = plan.size
    bilinear = getattr(pil, "Resampling", pil).BILINEAR
    try:
        with pil.open(path) as image:
            pixels = np.asarray(image.convert("RGB" if plan.channels == 3 else "L").resize((width, height), bilinear))
    except (OSError, ValueError, SyntaxError, pil.DecompressionBombError) as exc:
        raise BnscopeError(
            f"cannot read image {path}: {_one_line(exc)}. Hint: check the file or remove it from the folder"
        ) from exc
    pixels = pixels.reshape(height, width, plan.channels)
    if plan.spec.dtype.kind == "f":
        pixels = (pixels.astype(np.float32) * plan.scale - plan.mean) / plan.std
    if plan.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return {plan.spec.name: pixels.astype(plan.spec.dtype)}  # one sample, no batch axis


# --- random and loader ------------------------------------------------------------------------


def model_batch_size(inputs: list[InputSpec]) -> int | None:
    """Returns the batch size the model fixes, or None when it is dynamic or unclear.

    That is the axis-0 size its inputs of rank >= 2 share: rank-0 and rank-1 inputs are usually
    per-channel parameters (ONNX's node tests feed BN's scale, bias, mean and var as inputs).
    With no input of rank >= 2, the axis-0 size all inputs share.
    """
    batched = [spec for spec in inputs if len(spec.shape) >= 2] or inputs
    return fixed_batch_size(batched)


def _is_batched(spec: InputSpec, batch: int | None) -> bool:
    """Random data stacks samples on axis 0 of inputs whose axis 0 is dynamic or the model's batch;
    other inputs have all dims fixed and get one whole tensor per batch."""
    return bool(spec.shape) and (not isinstance(spec.shape[0], int) or spec.shape[0] == batch)


def _open_random(inputs: list[InputSpec], seed: int, samples: int) -> DataSource:
    if not isinstance(seed, int) or seed < 0:
        raise BnscopeError(f"random seed {seed!r} is not a non-negative integer. Hint: use a seed >= 0")
    if not isinstance(samples, int) or samples < 1:
        raise BnscopeError(f"random sample count {samples!r} is not positive. Hint: use at least 1 sample")
    batch = model_batch_size(inputs)
    for spec in inputs:
        if spec.dtype.kind != "f":
            raise BnscopeError(
                f"input '{spec.name}' is {spec.dtype}; random data is float only. Hint: give real calibration data"
            )
        drawn = spec.shape[1:] if _is_batched(spec, batch) else spec.shape
        if not spec.shape or any(not isinstance(d, int) for d in drawn):  # rank 0: validation makes it 1-d
            raise BnscopeError(
                f"input '{spec.name}' has shape {_fmt_shape(spec.shape)}: random data needs every dimension but "
                "the first fixed. Hint: give real calibration data"
            )
    batched = tuple(_is_batched(spec, batch) for spec in inputs)

    def chunks() -> list[_Chunk]:
        return [_Chunk(samples, partial(_random_rows, inputs, batched, seed))]

    return _SampleSource(f"random normal data ({samples} samples, seed {seed})", samples, True, inputs, chunks)


def _random_rows(inputs: list[InputSpec], batched: tuple[bool, ...], seed: int, start: int, stop: int) -> Feed:
    """Sample i of batched input k comes from its own generator, so data does not depend on batch
    size or shard; an unbatched input is drawn whole, from a generator of the batch's first sample.
    (Random data is one chunk, so a batch is always one call.)"""
    return {
        spec.name: (_random_stack(spec, seed, k, start, stop) if stacked else
                    np.random.default_rng([seed, start, k, 1]).standard_normal(spec.shape, dtype=np.float32))
        .astype(spec.dtype)
        for k, (spec, stacked) in enumerate(zip(inputs, batched))
    }


def _random_stack(spec: InputSpec, seed: int, k: int, start: int, stop: int) -> np.ndarray:
    return np.stack([
        np.random.default_rng([seed, i, k]).standard_normal(spec.shape[1:], dtype=np.float32)
        for i in range(start, stop)
    ])


def _open_loader(loader: str, inputs: list[InputSpec]) -> DataSource:
    if loader.endswith(".py") or ":" not in loader:
        path_text, name = loader, "load_data"
    else:
        path_text, _, name = loader.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise BnscopeError(f"data loader script {path} does not exist. Hint: give file.py:function")
    description = f"data loader {path.name}:{name}"
    module_name = f"_bnscope_loader_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses in the script look their module up here
    try:
        with _user_code(description, " on import"):
            module_spec.loader.exec_module(module)
    except BnscopeError:
        del sys.modules[module_name]
        raise
    function = getattr(module, name, None)
    if not callable(function):
        raise BnscopeError(f"{path} has no function '{name}'. Hint: give file.py:function")
    return _GivenSource(description, None, False, inputs, partial(_loader_feeds, description, function, inputs))


def _loader_feeds(
    description: str, function: Callable[[], object], inputs: list[InputSpec]
) -> Iterator[Callable[[], Mapping[str, object]]]:
    with _user_code(description):
        produced = function()
    if isinstance(produced, (Mapping, np.ndarray)) or not isinstance(produced, Iterable):
        raise BnscopeError(
            f"{description} returned a {type(produced).__name__}, not an iterable of feed dicts. "
            "Hint: make the function yield {input_name: array} dicts"
        )
    iterator = iter(produced)
    while True:
        with _user_code(description):
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield partial(_loader_feed, description, item, inputs)


def _loader_feed(description: str, item: object, inputs: list[InputSpec]) -> Mapping[str, object]:
    if isinstance(item, Mapping):
        return item
    if len(inputs) == 1 and hasattr(item, "__array__"):
        return {inputs[0].name: item}
    raise BnscopeError(
        f"{description} yielded a {type(item).__name__}, not a feed dict. "
        f"Hint: yield {{input_name: array}} for inputs {_names(inputs)}"
    )


@contextmanager
def _user_code(description: str, when: str = "") -> Iterator[None]:
    """Turns an exception from the user's loader script into a one-line BnscopeError."""
    try:
        yield
    except BnscopeError:
        raise
    except Exception as exc:
        raise BnscopeError(
            f"{description} raised {type(exc).__name__}{when}: {_one_line(exc)}. Hint: fix the loader script"
        ) from exc
