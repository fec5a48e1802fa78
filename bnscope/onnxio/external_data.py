"""External data: where tensors stored outside the model file live, reading them lazily, and
writing them byte for byte.

Every external location must resolve inside the model's folder (a path-traversal defence).
:class:`TensorStore` reads one tensor at a time, on demand, straight from its file region (big
ones mapped read-only). With a spill file, it writes big rewritten tensors there instead of into
the protobuf, and :func:`write_with_external_data` copies every external tensor byte for byte
(untouched ones from the input's data file, rewritten ones from the spill file, which it adopts
as the new data file when it can) without decoding it into numpy.
"""

from __future__ import annotations

import math
import mmap
import os
import weakref
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import numpy_helper

from bnscope.errors import BnscopeError
from bnscope.onnxio.external_file import DataFile
from bnscope.onnxio.tensor_proto import (
    external_info,
    fill_inline,
    make_external,
    plain_dtype,
    plain_type,
    point_at,
    read_into,
    read_via_onnx,
)

# Tensors of at least this many bytes go to the data file (onnx.save's size_threshold).
EXTERNAL_THRESHOLD = 1024


MAP_FROM, MAX_MAPPINGS = 1 << 20, 64  # external tensors this big are mapped, not copied


class ModelLocation(Protocol):
    """Where a model file lies (``bnscope.onnxio.model_io.LoadedModel`` is one)."""

    @property
    def base_dir(self) -> Path: ...


def all_tensors(model: onnx.ModelProto):
    """Every TensorProto in the model: initializers, Constant attributes, subgraphs."""
    yield from onnx.external_data_helper._get_all_tensors(model)


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def check_locations(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external locations outside ``base_dir`` (the model's folder), and missing data files."""
    base = base_dir.resolve()
    for tensor in all_tensors(model):
        if not is_external(tensor):
            continue
        target = _external_path(tensor, base)
        if not target.is_file():
            raise BnscopeError(
                f"external data file {target.name!r} for tensor {tensor.name!r} is missing "
                f"(looked in {base}). Hint: keep the data files next to the model"
            )
        _check_range(tensor, target)


def _check_range(tensor: onnx.TensorProto, target: Path) -> None:
    """offset and length must be non-negative integers inside the data file (no read past its end)."""
    info = {e.key: e.value for e in tensor.external_data}
    values = {}
    for key in ("offset", "length"):
        text = info.get(key)
        if text is not None and not (text.isascii() and text.isdigit()):
            raise BnscopeError(
                f"tensor {tensor.name!r}: external data {key} {text!r} is not a non-negative integer. "
                "Hint: the model is broken; re-save it with onnx.save(..., save_as_external_data=True)"
            )
        values[key] = int(text) if text is not None else None
    size = target.stat().st_size
    offset = values["offset"] or 0
    length = values["length"] if values["length"] is not None else size - offset
    if offset + length > size or length < 0:
        raise BnscopeError(
            f"tensor {tensor.name!r}: external data {target.name!r} bytes {offset} to {offset + max(length, 0)} run "
            f"past the end of the file ({size} bytes). Hint: the data file is truncated or belongs to another model"
        )


def _external_path(tensor: onnx.TensorProto, base: Path) -> Path:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    rel = Path(location)
    if not location or "\x00" in location or rel.is_absolute() or ".." in rel.parts:
        raise BnscopeError(
            f"tensor {tensor.name!r} has an unsafe external data location {location!r}: "
            "it must be a relative path inside the model's folder. Hint: re-save the model "
            "with onnx.save(..., save_as_external_data=True, location='weights.bin')"
        )
    target = (base / rel).resolve()
    if base not in target.parents:
        raise BnscopeError(
            f"tensor {tensor.name!r}: external data {location!r} resolves outside the model's "
            f"folder ({target}). Hint: move the data file next to the model"
        )
    return target


class TensorStore:
    """Reads tensors to numpy, external ones straight from their file region (no full load).

    With ``spill_to`` (a file path; the folder must exist), :meth:`put` writes big rewritten
    tensors to that file and leaves only their external-data entry in the model, so folding a
    multi-GB model holds one weight at a time. Such a model is complete only together with this
    store: write it with ``bnscope.onnxio.model_io.save_model(model, out, store=store)``.
    """

    def __init__(self, loaded: ModelLocation, spill_to: str | os.PathLike | None = None):
        self._base = loaded.base_dir.resolve()
        self._spill = Path(spill_to) if spill_to is not None else None
        self._spilled: dict[str, tuple[int, int]] = {}  # tensor name -> (offset, length) in the spill file
        self._moved: tuple[Path, dict[str, tuple[int, int]]] | None = None  # where save_model took it
        self._mappings: weakref.WeakSet = weakref.WeakSet()  # live read-only maps of external data

    def to_array(self, tensor: onnx.TensorProto) -> np.ndarray:
        if not is_external(tensor):
            return numpy_helper.to_array(tensor)
        return self._read_external(tensor)

    def locate(self, tensor: onnx.TensorProto) -> tuple[Path, int, int | None]:
        """Where an external tensor's bytes are: (file, offset, length or None for "to the end")."""
        info = external_info(tensor)
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
        location = info.get("location")
        if self._is_spilled(self._spilled, tensor, location, offset, length):
            return self._spill, offset, length
        if self._moved and self._is_spilled(self._moved[1], tensor, location, offset, length):
            return self._moved[0], offset, length
        return _external_path(tensor, self._base), offset, length

    def _is_spilled(self, spilled: dict, tensor: onnx.TensorProto, location, offset: int, length) -> bool:
        return self._spill is not None and location == self._spill.name and spilled.get(tensor.name) == (offset, length)

    @property
    def spill_path(self) -> Path | None:
        """The spill file, once something was written to it."""
        return self._spill if self._spilled else None

    def hand_over_spill(self, moved_to: Path) -> None:
        """The spill file was moved to ``moved_to`` (by :func:`save_model`, as the new data file):
        spilled tensors are read there for the rest of this save; later puts start a new spill file."""
        self._moved = (moved_to, dict(self._spilled))
        self._spilled = {}

    def put(self, tensor: onnx.TensorProto, value: np.ndarray, dtype=None) -> None:
        """Sets ``tensor`` (keeping its name) to ``value`` cast once to ``dtype`` (default: its own):
        in the spill file when there is one and the result is big, else inline as
        ``numpy_helper.from_array`` would."""
        value = np.asarray(value)
        dtype = np.dtype(dtype) if dtype is not None else value.dtype
        nbytes = value.size * dtype.itemsize
        if self._spill is None or nbytes < EXTERNAL_THRESHOLD or plain_type(dtype) is None:
            fill_inline(tensor, value, dtype)
            return
        with DataFile(self._spill) as data:
            offset = data.append_cast(value, dtype)
        make_external(tensor, dtype, value.shape, self._spill.name, offset)
        self._spilled[tensor.name] = (offset, nbytes)

    def _read_external(self, tensor: onnx.TensorProto) -> np.ndarray:
        target, offset, length = self.locate(tensor)
        dtype = plain_dtype(tensor)
        count = math.prod(tensor.dims)
        if dtype is None or (length is not None and length != count * dtype.itemsize):
            return read_via_onnx(tensor, target, offset, length)
        shape = tuple(tensor.dims)
        with open(target, "rb") as f:
            available = os.fstat(f.fileno()).st_size - offset
            if available < count * dtype.itemsize:
                raise BnscopeError(
                    f"external data of tensor {tensor.name!r} is truncated ({max(available, 0)} of "
                    f"{count * dtype.itemsize} bytes at offset {offset} in {target.name}). "
                    "Hint: the data file is incomplete; re-save or re-download the model"
                )
            if count == 0:
                return np.empty(shape, dtype)
            if self._mappable(target, count * dtype.itemsize):
                return self._map(f, offset, count, dtype).reshape(shape)
            return read_into(f, offset, shape, dtype)

    def _mappable(self, target: Path, nbytes: int) -> bool:
        # big tensors only (a mapping costs a syscall and, in Python < 3.13, a file descriptor: at
        # most MAX_MAPPINGS live, so a view that caches every weight cannot run out of them);
        # never the spill file, which save_model moves
        return nbytes >= MAP_FROM and len(self._mappings) < MAX_MAPPINGS and target != self._spill

    def _map(self, f, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
        """A read-only array over the file's pages: no copy out of the page cache (as onnxruntime
        reads external data). Like numpy_helper.to_array's, the array is read-only."""
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(f.fileno(), offset + count * dtype.itemsize - start, access=mmap.ACCESS_READ, offset=start)
        self._mappings.add(mapped)  # leaves the set when the last array over it is freed
        return np.frombuffer(mapped, dtype, count, offset - start)


def inline_copy(model: onnx.ModelProto, store: TensorStore) -> onnx.ModelProto:
    """A copy of ``model`` with every external tensor read into it."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    read_inline(copy, store)
    return copy


def read_inline(model: onnx.ModelProto, store: TensorStore) -> None:
    """Read every external tensor of ``model`` into the model, in place."""
    for tensor in all_tensors(model):
        if is_external(tensor):
            fill_inline(tensor, store.to_array(tensor))


def write_with_external_data(
    model: onnx.ModelProto, path: Path, data_path: Path, data_name: str, store: TensorStore | None
) -> None:
    """Writes the model to ``path`` and its big tensors to ``data_path``, named ``data_name`` in
    the model. External tensors are copied as bytes, never decoded."""
    copy = onnx.ModelProto()  # tensors are pointed at the new data file in place: spare the caller's
    copy.CopyFrom(model)
    data_path.unlink(missing_ok=True)
    adopted = _adopt_spill_file(copy, data_path, store)
    with DataFile(data_path) as data:
        for tensor in all_tensors(copy):
            if is_external(tensor):
                source, offset, length = store.locate(tensor)
                if adopted is not None and source == data_path:  # already there, at the same offset
                    point_at(tensor, data_name, offset, length)
                else:
                    length = _file_length(source, offset, length)
                    point_at(tensor, data_name, data.append_range(source, offset, length), length)
        for tensor in _initializers(copy):
            if not is_external(tensor) and tensor.HasField("raw_data") and tensor.ByteSize() >= EXTERNAL_THRESHOLD:
                raw = tensor.raw_data
                if len(raw) >= EXTERNAL_THRESHOLD:
                    tensor.ClearField("raw_data")
                    point_at(tensor, data_name, data.append_bytes(raw), len(raw))
    with open(path, "wb") as f:
        f.write(copy.SerializeToString())


def _adopt_spill_file(model: onnx.ModelProto, data_path: Path, store: TensorStore | None) -> Path | None:
    """Start the data file as the store's spill file when the model uses it, so the rewritten
    tensors need no copy. The file is moved, not hard-linked: onnx.checker refuses data files
    with several links. Returns the old spill path, or None when nothing was adopted."""
    spill = store.spill_path if store is not None else None
    if spill is None or not any(is_external(t) and store.locate(t)[0] == spill for t in all_tensors(model)):
        return None
    try:
        os.replace(spill, data_path)
    except OSError:  # another file system: copy instead
        return None
    store.hand_over_spill(data_path)
    return spill


def _initializers(model: onnx.ModelProto):
    """Initializers of the main graph and of subgraphs (what onnx.save externalises)."""
    yield from onnx.external_data_helper._get_initializer_tensors(model)


def _file_length(path: Path, offset: int, length: int | None) -> int:
    return length if length is not None else path.stat().st_size - offset
