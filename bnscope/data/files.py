"""Tensor files as calibration data: ``.npy``, ``.npz`` (with optional labels) and ONNX ``TensorProto`` ``.pb``."""

from __future__ import annotations

import math
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import numpy_helper

from bnscope.data.batching import (
    FileEntry,
    GivenSource,
    SampleSource,
    display_name,
    kept_file,
    stream_entries,
)
from bnscope.data.limits import format_bytes
from bnscope.data.spec import (
    LABELS_KEY,
    DataSource,
    Feed,
    InputSpec,
    format_shape,
    input_names,
    one_line,
    quoted_names,
)
from bnscope.errors import BnscopeError

ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
PB_NAME = re.compile(r"input_(\d+)\.pb")


# --- .npy / .npz ------------------------------------------------------------------------------


def open_arrays(where: Path, paths: list[Path], inputs: list[InputSpec]) -> DataSource:
    """A sample source over .npy/.npz files (``where``: the file or folder named by the user)."""
    entries = [_scan_array_file(path, inputs) for path in paths]
    samples = sum(entry.count for entry in entries)
    files = f"{len(paths)} files, " if where.is_dir() else ""
    label_paths = [p for p in paths if p.suffix.lower() == ".npz"] if LABELS_KEY not in input_names(inputs) else []

    return SampleSource(
        f"{display_name(where)} ({files}{samples} samples)",
        samples,
        False,
        inputs,
        partial(stream_entries, entries, kept_file()),
        partial(_read_labels, paths, label_paths),
    )


def _scan_array_file(path: Path, inputs: list[InputSpec]) -> FileEntry:
    headers = _array_headers(path)
    for key, (_, dtype) in headers.items():
        if dtype.hasobject:
            raise BnscopeError(
                f"{path}{f' (array {key!r})' if key else ''} contains Python objects; bnscope never unpickles. "
                "Hint: save plain numeric arrays with np.savez"
            )
    members = _match_members(path, list(headers), inputs)
    count, expand = _sample_layout(path, {name: headers[key][0] for name, key in members.items()}, inputs)
    return FileEntry(path, count, expand, partial(_load_arrays, path, members))


def _array_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    hint = "re-save it with np.save / np.savez"
    if path.suffix.lower() == ".npy":
        with _reading(path, hint), open(path, "rb") as f:
            return {"": _npy_header(f, path.stat().st_size, path)}
    with _reading(path, hint), zipfile.ZipFile(path) as archive:
        headers = {}
        for info in archive.infolist():
            if info.filename.endswith(".npy"):
                key = info.filename[: -len(".npy")]
                with archive.open(info) as f:
                    headers[key] = _npy_header(f, info.file_size, path, key)
        return headers


def _npy_header(f: BinaryIO, size: int, path: Path, key: str = "") -> tuple[tuple[int, ...], np.dtype]:
    """The declared shape and dtype, checked against the bytes that follow the header (``size`` is
    the array file's length), so a forged or truncated header is refused before anything is
    allocated."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    needed, held = math.prod(shape) * dtype.itemsize, size - f.tell()
    if not dtype.hasobject and needed > held:
        where = f"{path}{f' (array {key!r})' if key else ''}"
        raise BnscopeError(
            f"{where} declares shape {format_shape(shape)} {dtype} ({format_bytes(needed)}) but holds "
            f"{format_bytes(max(held, 0))} of data. Hint: the file is truncated or corrupt; re-save it with np.save"
        )
    return shape, dtype


def _match_members(path: Path, keys: list[str], inputs: list[InputSpec]) -> dict[str, str]:
    names = input_names(inputs)
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
            f"{path} holds one array but the model has inputs {quoted_names(inputs)}. "
            "Hint: save an .npz with one array per input name (np.savez)"
        )
    for key in feedable:
        if key not in names:
            raise BnscopeError(
                f"{path} holds array '{key}', which is not a model input ({quoted_names(inputs)}). "
                "Hint: name each array after an input"
            )
    for name in names:
        if name not in feedable:
            raise BnscopeError(
                f"{path} has no array for input '{name}'; the model's inputs are {quoted_names(inputs)}. "
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
                f"input '{spec.name}': {path} holds shape {format_shape(shape)}, expected {format_shape(spec.shape)} "
                f"or one sample of {format_shape(spec.shape[1:])}. Hint: reshape the data to the model's input shape"
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
            return dict.fromkeys(members, array)
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
        reason = one_line(exc)
        if "pickle" in reason.lower() or "object arrays" in reason.lower():
            raise BnscopeError(
                f"{path} contains Python objects; bnscope never unpickles. Hint: save plain numeric arrays with np.savez"
            ) from exc
        raise BnscopeError(f"cannot read {path}: {reason}. Hint: {hint}") from exc


# --- ONNX test data (.pb) ---------------------------------------------------------------------


def pb_files(folder: Path) -> list[Path]:
    """A folder's ``input_<i>.pb`` files, by number."""
    files = [p for p in folder.iterdir() if PB_NAME.fullmatch(p.name)]
    if not files:
        raise BnscopeError(f"{folder} has no input_*.pb files. Hint: use onnx's test data layout (input_0.pb, ...)")
    return sorted(files, key=lambda p: int(PB_NAME.fullmatch(p.name).group(1)))


def open_pb(where: Path, sets: list[list[Path]], inputs: list[InputSpec]) -> DataSource:
    """Each test data set is one feed, used as given (its tensors may hold parameters, not samples)."""
    samples = sum(_pb_samples(_read_pb(files, inputs).get(inputs[0].name)) for files in sets)
    description = (
        f"{display_name(where)} ({len(sets)} ONNX test data set{'s' if len(sets) > 1 else ''}, {samples} samples)"
    )
    return GivenSource(description, samples, False, inputs, lambda: (partial(_read_pb, f, inputs) for f in sets))


def _pb_samples(first: np.ndarray | None) -> int:
    return first.shape[0] if first is not None and first.ndim else 1


def _read_pb(files: list[Path], inputs: list[InputSpec]) -> Feed:
    """Reads TensorProtos: by tensor name when it names an input, else by position (input_<i>.pb)."""
    names = input_names(inputs)
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
            raise BnscopeError(f"cannot read {path} as an ONNX TensorProto: {one_line(exc)}. Hint: {hint}") from exc
        match = PB_NAME.fullmatch(path.name)
        index = int(match.group(1)) if match else position
        if tensor.name in names:
            feed[tensor.name] = array
        elif index < len(names):
            feed[names[index]] = array
        else:
            raise BnscopeError(
                f"{path} has no matching input: the model has {len(names)} ({quoted_names(inputs)}). "
                "Hint: name the tensor after an input or number the files from input_0.pb"
            )
    return feed
