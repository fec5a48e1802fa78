"""Load, validate and save ONNX models safely.

Loading never pulls external data into memory: tensors stored outside the model file are read
one at a time, on demand, by :class:`bnscope.external_data.TensorStore`, and every external
location must resolve inside the model's folder. Saving is atomic: a temp file in the target
folder, then ``os.replace``, so an interrupted run never leaves a partial model behind. Multi-GB
models stream: external tensors are copied byte for byte (see :mod:`bnscope.external_data`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from bnscope.errors import BnscopeError
from bnscope.external_data import (
    TensorStore,
    all_tensors,
    check_locations,
    inline_copy,
    is_external,
    read_inline,
    write_with_external_data,
)

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
        return any(is_external(t) for t in all_tensors(self.model))


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
    check_locations(loaded.model, loaded.base_dir)


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



def materialize_external_data(loaded: LoadedModel, model: onnx.ModelProto, store: TensorStore | None = None) -> None:
    """Read every external tensor of ``model`` (a copy of ``loaded.model``) into memory."""
    read_inline(model, store or TensorStore(loaded))


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
    has_external = any(is_external(t) for t in all_tensors(model))
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
            write_with_external_data(model, tmp_path, tmp_data, data_name, store)
            if tmp_data.exists():  # no data file when every tensor is under the threshold
                os.chmod(tmp_data, 0o666 & ~_umask())
                os.replace(tmp_data, out.parent / data_name)
        else:
            onnx.save_model(inline_copy(model, store) if has_external else model, str(tmp_path))
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


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name the same file (also through links); False if b does not exist."""
    a, b = Path(a), Path(b)
    if not b.exists():
        return a.resolve() == b.resolve()
    return a.exists() and os.path.samefile(a, b)
