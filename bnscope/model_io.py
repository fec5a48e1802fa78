"""Load, validate and save ONNX models safely.

Loading never pulls external data into memory: tensors stored outside the model file are read
one at a time, on demand, by :class:`TensorStore`. Every external location must resolve inside
the model's folder (a path-traversal defence). Saving is atomic: a temp file in the target
folder, then ``os.replace``, so an interrupted run never leaves a partial model behind.

Multi-GB models stream: a store with a spill file writes rewritten tensors there instead of into
the protobuf, and :func:`save_model` copies every external tensor byte for byte (untouched ones
from the input's data file, rewritten ones from the spill file, hard-linked when it can) without
decoding it into numpy.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from bnscope.errors import BnscopeError

log = logging.getLogger(__name__)

# Protobuf cannot serialise a message of 2 GiB or more; larger models need external data.
PROTOBUF_LIMIT = 2**31 - 1
# Tensors of at least this many bytes go to the data file (onnx.save's size_threshold).
EXTERNAL_THRESHOLD = 1024
# Big tensors start on a page boundary in the data file, so runtimes can map them.
_ALIGN, _ALIGN_FROM = 4096, 1 << 20
_CAST_BLOCK = 1 << 20  # bytes cast and written at a time when spilling
_MAP_FROM, _MAX_MAPPINGS = 1 << 20, 64  # external tensors this big are mapped, not copied
# Element types whose bytes are the little-endian numpy array itself (no packing, no ml_dtypes).
_PLAIN_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in ("FLOAT", "DOUBLE", "FLOAT16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16",
                 "UINT32", "UINT64", "BOOL", "COMPLEX64", "COMPLEX128")
)


@dataclass
class LoadedModel:
    """A parsed model plus where it came from, so external tensors can be read lazily."""

    model: onnx.ModelProto
    path: Path

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def has_external_data(self) -> bool:
        return any(_is_external(t) for t in _all_tensors(self.model))


def load_model(path: str | os.PathLike, *, check: bool = True) -> LoadedModel:
    """Parse an ONNX file without loading external data, and validate it.

    Raises:
        BnscopeError: missing or unreadable file, not ONNX, truncated, unsafe or missing
            external data, or a graph that fails ``onnx.checker``.
    """
    path = Path(path)
    _require_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise BnscopeError(
            f"{path} is not a readable ONNX model ({_first_line(exc)}). "
            "Hint: the file may be truncated or not an .onnx file; re-export or re-download it"
        ) from exc
    if not model.HasField("graph") or model.ir_version == 0:
        raise BnscopeError(
            f"{path} does not contain an ONNX model (no graph or IR version). "
            "Hint: pass the .onnx file itself"
        )
    loaded = LoadedModel(model=model, path=path)
    check_external_data(loaded)
    if check:
        validate_model(loaded)
    return loaded


def _require_file(path: Path) -> None:
    if not path.exists():
        raise BnscopeError(f"model file not found: {path}. Hint: check the path")
    if path.is_dir():
        raise BnscopeError(f"{path} is a folder, not a model file. Hint: pass the .onnx file")
    if path.stat().st_size == 0:
        raise BnscopeError(f"{path} is empty. Hint: re-export or re-download the model")


def check_external_data(loaded: LoadedModel) -> None:
    """Refuse external locations outside the model's folder, and missing data files."""
    base = loaded.base_dir.resolve()
    for tensor in _all_tensors(loaded.model):
        if not _is_external(tensor):
            continue
        target = _external_path(tensor, base)
        if not target.is_file():
            raise BnscopeError(
                f"external data file {target.name!r} for tensor {tensor.name!r} is missing "
                f"(looked in {base}). Hint: keep the data files next to the model"
            )


def _external_path(tensor: onnx.TensorProto, base: Path) -> Path:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    rel = Path(location)
    if not location or rel.is_absolute() or ".." in rel.parts:
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


def validate_model(loaded: LoadedModel) -> None:
    """Run ``onnx.checker`` (by path for big models) and turn failures into one-line errors."""
    try:
        if loaded.model.ByteSize() > PROTOBUF_LIMIT or loaded.has_external_data:
            onnx.checker.check_model(str(loaded.path))
        else:
            onnx.checker.check_model(loaded.model)
    except onnx.checker.ValidationError as exc:
        raise BnscopeError(_checker_message(loaded.path, exc)) from exc


def _checker_message(path: Path, exc: Exception) -> str:
    text = " ".join(str(exc).split())
    if "topologically sorted" in text:
        return (
            f"{path}: nodes are not in topological order ({_shorten(text, 160)}). "
            "Hint: re-export the model, or sort it, e.g. onnxruntime at ORT_ENABLE_BASIC with "
            "optimized_model_filepath, or onnx-simplifier"
        )
    return f"{path} is not a valid ONNX model: {_shorten(text, 200)}. Hint: re-export it or check it with onnx.checker"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return _shorten(text[0], 160) if text else type(exc).__name__


def _all_tensors(model: onnx.ModelProto):
    """Every TensorProto in the model: initializers, Constant attributes, subgraphs."""
    yield from onnx.external_data_helper._get_all_tensors(model)


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


class TensorStore:
    """Reads tensors to numpy, external ones straight from their file region (no full load).

    With ``spill_to`` (a file path; the folder must exist), :meth:`put` writes big rewritten
    tensors to that file and leaves only their external-data entry in the model, so folding a
    multi-GB model holds one weight at a time. Such a model is complete only together with this
    store: write it with ``save_model(model, out, store=store)``.
    """

    def __init__(self, loaded: LoadedModel, spill_to: str | os.PathLike | None = None):
        self._base = loaded.base_dir.resolve()
        self._spill = Path(spill_to) if spill_to is not None else None
        self._spilled: dict[str, tuple[int, int]] = {}  # tensor name -> (offset, length) in the spill file
        self._moved: tuple[Path, dict[str, tuple[int, int]]] | None = None  # where save_model took it
        self._mappings: weakref.WeakSet = weakref.WeakSet()  # live read-only maps of external data

    def to_array(self, tensor: onnx.TensorProto) -> np.ndarray:
        if not _is_external(tensor):
            return numpy_helper.to_array(tensor)
        return self._read_external(tensor)

    def locate(self, tensor: onnx.TensorProto) -> tuple[Path, int, int | None]:
        """Where an external tensor's bytes are: (file, offset, length or None for "to the end")."""
        info = _external_info(tensor)
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
        if self._spill is None or nbytes < EXTERNAL_THRESHOLD or _plain_type(dtype) is None:
            _fill_inline(tensor, value, dtype)
            return
        with _DataFile(self._spill) as data:
            offset = data.append_cast(value, dtype)
        _make_external(tensor, dtype, value.shape, self._spill.name, offset)
        self._spilled[tensor.name] = (offset, nbytes)

    def _read_external(self, tensor: onnx.TensorProto) -> np.ndarray:
        target, offset, length = self.locate(tensor)
        dtype = _plain_dtype(tensor)
        count = math.prod(tensor.dims)
        if dtype is None or (length is not None and length != count * dtype.itemsize):
            return _read_via_onnx(tensor, target, offset, length)
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
            return _read_into(f, offset, shape, dtype)

    def _mappable(self, target: Path, nbytes: int) -> bool:
        # big tensors only (a mapping costs a syscall and, in Python < 3.13, a file descriptor: at
        # most _MAX_MAPPINGS live, so a view that caches every weight cannot run out of them);
        # never the spill file, which save_model moves
        return nbytes >= _MAP_FROM and len(self._mappings) < _MAX_MAPPINGS and target != self._spill

    def _map(self, f, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
        """A read-only array over the file's pages: no copy out of the page cache (as onnxruntime
        reads external data). Like numpy_helper.to_array's, the array is read-only."""
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(f.fileno(), offset + count * dtype.itemsize - start, access=mmap.ACCESS_READ,
                           offset=start)
        self._mappings.add(mapped)  # leaves the set when the last array over it is freed
        return np.frombuffer(mapped, dtype, count, offset - start)


def _read_into(f, offset: int, shape: tuple, dtype: np.dtype) -> np.ndarray:
    array = np.empty(shape, dtype)
    f.seek(offset)
    f.readinto(array.reshape(-1).view(np.uint8))
    return array


def _read_via_onnx(tensor: onnx.TensorProto, target: Path, offset: int, length: int | None) -> np.ndarray:
    """Packed, ml_dtypes or big-endian tensors: onnx's own decoder on the raw bytes."""
    with open(target, "rb") as f:
        f.seek(offset)
        raw = f.read() if length is None else f.read(length)
    shell = onnx.TensorProto()
    shell.CopyFrom(tensor)
    del shell.external_data[:]
    shell.data_location = onnx.TensorProto.DEFAULT
    shell.raw_data = raw
    return numpy_helper.to_array(shell)


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _plain_type(dtype: np.dtype) -> int | None:
    """The TensorProto type whose raw bytes are this numpy dtype's, or None."""
    if sys.byteorder != "little":
        return None
    try:
        code = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (KeyError, TypeError, ValueError):
        return None
    return code if code in _PLAIN_TYPES else None


def _plain_dtype(tensor: onnx.TensorProto) -> np.dtype | None:
    if tensor.data_type not in _PLAIN_TYPES or sys.byteorder != "little":
        return None
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def _fill_inline(tensor: onnx.TensorProto, value: np.ndarray, dtype=None) -> None:
    """``tensor.CopyFrom(numpy_helper.from_array(value.astype(dtype), name))`` with one full-size
    copy fewer for plain types."""
    value = value.astype(dtype, copy=False) if dtype is not None else value
    name, code = tensor.name, _plain_type(value.dtype)
    if code is None:
        tensor.CopyFrom(numpy_helper.from_array(value, name))
        return
    tensor.Clear()
    tensor.name, tensor.data_type = name, code
    tensor.dims.extend(value.shape)
    tensor.raw_data = np.ascontiguousarray(value).tobytes()


def _make_external(tensor: onnx.TensorProto, dtype: np.dtype, shape: tuple, location: str, offset: int) -> None:
    name = tensor.name
    tensor.Clear()
    tensor.name, tensor.data_type = name, _plain_type(dtype)
    tensor.dims.extend(shape)
    _point_at(tensor, location, offset, math.prod(shape) * dtype.itemsize)


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, val in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, val
    tensor.data_location = onnx.TensorProto.EXTERNAL


def materialize_external_data(loaded: LoadedModel, model: onnx.ModelProto, store: TensorStore | None = None) -> None:
    """Read every external tensor of ``model`` (a copy of ``loaded.model``) into memory."""
    store = store or TensorStore(loaded)
    for tensor in _all_tensors(model):
        if _is_external(tensor):
            _fill_inline(tensor, store.to_array(tensor))


def save_model(
    model: onnx.ModelProto, out: str | os.PathLike, *, external: bool | None = None, store: TensorStore | None = None
) -> Path:
    """Write ``model`` atomically; the caller's model is left as it is.

    External data is used when asked, when the model is > 2 GB, or when it has external tensors.
    The data file is ``<out name>.data`` beside the model. Initializers of >= 1 KiB go there, and
    tensors already external in ``model`` are copied byte for byte from where ``store`` reads them
    (``store`` is required then). The data file is written under a temp name too and renamed just
    before the model, so a crash leaves either the old pair or nothing.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    has_external = any(_is_external(t) for t in _all_tensors(model))
    if has_external and store is None:
        raise ValueError("the model has external tensors: pass the TensorStore that reads them")
    if external is None:
        external = has_external or (model.ByteSize() > PROTOBUF_LIMIT if _small_enough_to_measure(model) else True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a model is an ordinary file
    data_name = out.name + ".data"
    tmp_data = out.parent / f".{data_name}.tmp"
    try:
        if external:
            _save_with_external_data(model, tmp_path, tmp_data, data_name, store)
            if tmp_data.exists():  # no data file when every tensor is under the threshold
                os.chmod(tmp_data, 0o666 & ~_umask())
                os.replace(tmp_data, out.parent / data_name)
        else:
            onnx.save_model(_inline_copy(model, store) if has_external else model, str(tmp_path))
        os.replace(tmp_path, out)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        tmp_data.unlink(missing_ok=True)
        raise
    return out


def _inline_copy(model: onnx.ModelProto, store: TensorStore) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in _all_tensors(copy):
        if _is_external(tensor):
            _fill_inline(tensor, store.to_array(tensor))
    return copy


def _save_with_external_data(
    model: onnx.ModelProto, path: Path, data_path: Path, data_name: str, store: TensorStore | None
) -> None:
    """Writes the model to ``path`` and its big tensors to ``data_path``, named ``data_name`` in
    the model. External tensors are copied as bytes, never decoded."""
    copy = onnx.ModelProto()  # tensors are pointed at the new data file in place: spare the caller's
    copy.CopyFrom(model)
    data_path.unlink(missing_ok=True)
    adopted = _adopt_spill_file(copy, data_path, store)
    with _DataFile(data_path) as data:
        for tensor in _all_tensors(copy):
            if _is_external(tensor):
                source, offset, length = store.locate(tensor)
                if adopted is not None and source == data_path:  # already there, at the same offset
                    _point_at(tensor, data_name, offset, length)
                else:
                    length = _file_length(source, offset, length)
                    _point_at(tensor, data_name, data.append_range(source, offset, length), length)
        for tensor in _initializers(copy):
            if not _is_external(tensor) and tensor.HasField("raw_data") and tensor.ByteSize() >= EXTERNAL_THRESHOLD:
                raw = tensor.raw_data
                if len(raw) >= EXTERNAL_THRESHOLD:
                    tensor.ClearField("raw_data")
                    _point_at(tensor, data_name, data.append_bytes(raw), len(raw))
    with open(path, "wb") as f:
        f.write(copy.SerializeToString())


def _adopt_spill_file(model: onnx.ModelProto, data_path: Path, store: TensorStore | None) -> Path | None:
    """Start the data file as the store's spill file when the model uses it, so the rewritten
    tensors need no copy. The file is moved, not hard-linked: onnx.checker refuses data files
    with several links. Returns the old spill path, or None when nothing was adopted."""
    spill = store.spill_path if store is not None else None
    if spill is None or not any(_is_external(t) and store.locate(t)[0] == spill for t in _all_tensors(model)):
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


def _byte_view(value: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8))


class _DataFile:
    """Appends tensor bytes to an external data file; each append returns where it starts.

    Big tensors start on a page boundary. Ranges of other files are copied in the kernel
    (``os.copy_file_range``) where it can, so untouched tensors never pass through Python.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd = -1

    def __enter__(self) -> _DataFile:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o666)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def append_bytes(self, data) -> int:
        view = memoryview(data).cast("B")
        offset = self._start(len(view))
        _write_all(self.fd, view)
        return offset

    def append_cast(self, value: np.ndarray, dtype: np.dtype) -> int:
        """Appends ``value.astype(dtype)`` block by block: the same numbers without a full-size
        cast copy (a multi-GB fold would fault in a fresh one per weight)."""
        flat = np.ascontiguousarray(value).reshape(-1)
        offset = self._start(flat.size * dtype.itemsize)
        step = max(1, _CAST_BLOCK // dtype.itemsize)
        for i in range(0, flat.size, step):
            _write_all(self.fd, _byte_view(flat[i:i + step].astype(dtype)))
        return offset

    def append_range(self, source: Path, offset: int, length: int) -> int:
        start = self._start(length)
        with open(source, "rb") as f:
            copied = _copy_in_kernel(f.fileno(), self.fd, offset, length)
            _copy_in_python(f, self.fd, offset + copied, length - copied, source)
        return start

    def _start(self, nbytes: int) -> int:
        end = os.lseek(self.fd, 0, os.SEEK_END)
        if nbytes < _ALIGN_FROM or end % _ALIGN == 0:
            return end
        _write_all(self.fd, memoryview(bytes(_ALIGN - end % _ALIGN)))
        return end + _ALIGN - end % _ALIGN


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _copy_in_kernel(src: int, dst: int, offset: int, length: int) -> int:
    """Copies what ``os.copy_file_range`` will; returns the bytes copied (0 where unsupported)."""
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src, dst, length - done, offset + done)
            if n == 0:
                break
            done += n
    except (AttributeError, OSError):  # old kernel, other platform, cross-device on some kernels
        pass
    return done


def _copy_in_python(f, dst: int, offset: int, length: int, source: Path) -> None:
    f.seek(offset)
    while length > 0:
        chunk = f.read(min(length, 64 << 20))
        if not chunk:
            raise BnscopeError(
                f"external data file {source.name} ends {length} bytes early. "
                "Hint: the data file is incomplete; re-save or re-download the model"
            )
        _write_all(dst, memoryview(chunk))
        length -= len(chunk)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _small_enough_to_measure(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB on some builds
        return False


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name the same file (also through links); False if b does not exist."""
    a, b = Path(a), Path(b)
    if not b.exists():
        return a.resolve() == b.resolve()
    return a.exists() and os.path.samefile(a, b)
