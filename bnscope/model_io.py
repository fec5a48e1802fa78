"""Load, validate and save ONNX models safely.

Loading never pulls external data into memory: tensors stored outside the model file are read
one at a time, on demand, by :class:`TensorStore`. Every external location must resolve inside
the model's folder (a path-traversal defence). Saving is atomic: a temp file in the target
folder, then ``os.replace``, so an interrupted run never leaves a partial model behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
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
    """Reads tensors to numpy, external ones straight from their file region (no full load)."""

    def __init__(self, loaded: LoadedModel):
        self._base = loaded.base_dir.resolve()

    def to_array(self, tensor: onnx.TensorProto) -> np.ndarray:
        if not _is_external(tensor):
            return numpy_helper.to_array(tensor)
        return self._read_external(tensor)

    def _read_external(self, tensor: onnx.TensorProto) -> np.ndarray:
        info = {e.key: e.value for e in tensor.external_data}
        target = _external_path(tensor, self._base)
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
        with open(target, "rb") as f:
            f.seek(offset)
            raw = f.read() if length is None else f.read(length)
        shell = onnx.TensorProto()
        shell.CopyFrom(tensor)
        del shell.external_data[:]
        shell.data_location = onnx.TensorProto.DEFAULT
        shell.raw_data = raw
        return numpy_helper.to_array(shell)


def materialize_external_data(loaded: LoadedModel, model: onnx.ModelProto) -> None:
    """Read every external tensor of ``model`` (a copy of ``loaded.model``) into memory."""
    store = TensorStore(loaded)
    for tensor in _all_tensors(model):
        if _is_external(tensor):
            array = store.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


def save_model(model: onnx.ModelProto, out: str | os.PathLike, *, external: bool | None = None) -> Path:
    """Write ``model`` atomically. External data is used when asked or when the model is > 2 GB.

    The external data file is ``<out name>.data`` beside the model; it is written under a temp
    name too and renamed just before the model, so a crash leaves either the old pair or nothing.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if external is None:
        external = model.ByteSize() > PROTOBUF_LIMIT if _small_enough_to_measure(model) else True
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a model is an ordinary file
    data_name = out.name + ".data"
    tmp_data = out.parent / f".{data_name}.tmp"
    try:
        if external:
            copy = onnx.ModelProto()  # onnx converts tensors to external in place: spare the caller's
            copy.CopyFrom(model)
            onnx.save_model(
                copy, str(tmp_path), save_as_external_data=True, all_tensors_to_one_file=True,
                location=tmp_data.name, size_threshold=1024,
            )
            _rename_external_location(tmp_path, tmp_data.name, data_name)
            if tmp_data.exists():  # no data file when every tensor is under the threshold
                os.chmod(tmp_data, 0o666 & ~_umask())
                os.replace(tmp_data, out.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_path))
        os.replace(tmp_path, out)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        tmp_data.unlink(missing_ok=True)
        raise
    return out


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


def _rename_external_location(model_path: Path, old: str, new: str) -> None:
    """Point the saved model's external entries from the temp data file to the final name."""
    saved = onnx.load(str(model_path), load_external_data=False)
    for tensor in _all_tensors(saved):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    with open(model_path, "wb") as f:
        f.write(saved.SerializeToString())


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name the same file (also through links); False if b does not exist."""
    a, b = Path(a), Path(b)
    if not b.exists():
        return a.resolve() == b.resolve()
    return a.exists() and os.path.samefile(a, b)
