"""Load, validate and save ONNX models safely.

Loading never pulls external data into memory: tensors stored outside the model file are read
one at a time, on demand, by :class:`bnscope.onnxio.external_data.TensorStore`, and every external
location must resolve inside the model's folder. Saving is atomic: a temp file in the target
folder, then ``os.replace``, so an interrupted run never leaves a partial model behind. Multi-GB
models stream: external tensors are copied byte for byte (see :mod:`bnscope.onnxio.external_data`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.serialization
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError
from onnx.parser import ParseError as OnnxTextParseError

from bnscope.errors import BnscopeError
from bnscope.onnxio.bn_params import check_batchnorm_params
from bnscope.onnxio.external_data import (
    TensorStore,
    all_tensors,
    check_locations,
    inline_copy,
    is_external,
    read_inline,
    write_with_external_data,
)
from bnscope.onnxio.functions import inline_bn_functions
from bnscope.onnxio.nodes import subgraphs
from bnscope.onnxio.outputs import check_input_file, temp_prefix
from bnscope.onnxio.sort import sort_graph_nodes, unsortable_nodes
from bnscope.onnxio.tensor_proto import raw_size_mismatch

log = logging.getLogger(__name__)

# Protobuf cannot serialise a message of 2 GiB or more; larger models need external data.
PROTOBUF_LIMIT = 2**31 - 1
# What onnx's text formats (.json, .onnxtxt, .textproto...) raise on a malformed file
TEXT_PARSE_ERRORS = (json_format.ParseError, text_format.ParseError, OnnxTextParseError)


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
        raw = _binary_bytes(path)  # kept for the checker: serialising the parsed model again costs more
        model = onnx.load(str(path), load_external_data=False) if raw is None else onnx.load_model_from_string(raw)
    except (DecodeError, ValueError, RuntimeError, OSError, *TEXT_PARSE_ERRORS) as exc:
        raise BnscopeError(
            f"{path} is not a readable ONNX model ({_first_line(exc)}). "
            "Hint: the file may be truncated or not an .onnx file; re-export or re-download it"
        ) from exc
    if not model.HasField("graph") or model.ir_version == 0:
        raise BnscopeError(
            f"{path} does not contain an ONNX model (no graph or IR version). Hint: pass the .onnx file itself"
        )
    loaded = LoadedModel(model=model, path=path)
    check_external_data(loaded)
    if check:
        validate_model(loaded, raw)
        check_tensor_sizes(loaded)
    del raw
    loaded.model = inline_bn_functions(loaded.model, path)
    if check:
        try:
            check_batchnorm_params(loaded.model)
        except BnscopeError as exc:
            raise BnscopeError(f"{path}: {exc}") from None
    return loaded


def _binary_bytes(path: Path) -> bytes | None:
    """The file's bytes when ``onnx.load`` would read it as binary protobuf: onnx's own registry maps
    the extension to a format (text formats: None here, left to ``onnx.load``)."""
    fmt = onnx.serialization.registry.get_format_from_file_extension(os.path.splitext(path)[1])
    return path.read_bytes() if fmt in (None, "protobuf") else None


def _require_file(path: Path) -> None:
    if not path.exists():
        raise BnscopeError(f"model file not found: {path}. Hint: check the path")
    if path.is_dir():
        raise BnscopeError(f"{path} is a folder, not a model file. Hint: pass the .onnx file")
    check_input_file(path, "model file", "pass the .onnx file")
    if path.stat().st_size == 0:
        raise BnscopeError(f"{path} is empty. Hint: re-export or re-download the model")


def check_external_data(loaded: LoadedModel) -> None:
    """Refuse external locations outside the model's folder, and missing data files."""
    check_locations(loaded.model, loaded.base_dir)


def validate_model(loaded: LoadedModel, raw: bytes | None = None) -> None:
    """Run ``onnx.checker`` (by path for big models) and turn failures into one-line errors.

    ``raw`` is the model file's bytes when the caller has them (checked as they are: for a 45 MB
    model 10 ms, against 150 ms to measure and serialise the parsed model again).

    A graph whose only fault is its node order (keras2onnx writes such DAGs) is sorted in memory,
    main graph and subgraphs, with one warning, and checked again; the file is left as it is.
    A graph with a cycle is refused.
    """
    try:
        if loaded.has_external_data or (raw is None and loaded.model.ByteSize() > PROTOBUF_LIMIT):
            onnx.checker.check_model(str(loaded.path))
        else:
            onnx.checker.check_model(loaded.model if raw is None else raw)
        return
    except onnx.checker.ValidationError as exc:
        if not _is_order_complaint(exc) or not sort_nodes(loaded.model, loaded.path):
            raise BnscopeError(_checker_message(loaded.path, exc)) from exc
    log.warning("%s: nodes were not in topological order; sorted them in memory (the file is unchanged)", loaded.path)
    try:
        onnx.checker.check_model(_checkable(loaded.model))
    except onnx.checker.ValidationError as exc:
        raise BnscopeError(_checker_message(loaded.path, exc)) from exc


def sort_nodes(model: onnx.ModelProto, path: str | os.PathLike = "model") -> int:
    """Put the nodes of every graph (main graph and subgraphs) in topological order, in place.

    Returns:
        How many graphs were reordered (0 when all were sorted already).

    Raises:
        BnscopeError: a graph has a cycle, so no order exists.
    """
    return _sort_graph(model.graph, Path(path), nested=False)


def _sort_graph(graph: onnx.GraphProto, path: Path, nested: bool) -> int:
    sorted_now = sort_graph_nodes(graph)
    if sorted_now is None:
        raise BnscopeError(_cycle_message(path, graph, nested))
    reordered = int(sorted_now)
    for node in graph.node:
        for sub in subgraphs(node):
            reordered += _sort_graph(sub, path, nested=True)
    return reordered


def _cycle_message(path: Path, graph: onnx.GraphProto, nested: bool) -> str:
    stuck = [graph.node[i] for i in unsortable_nodes(graph)]
    names = ", ".join(repr(n.name or (n.output[0] if n.output else n.op_type)) for n in stuck[:3])
    where = f"subgraph {graph.name!r}" if nested else "graph"
    return (
        f"{path}: the {where} has a cycle: {len(stuck)} node(s) (e.g. {names}) are on it or behind it, "
        "so no node order exists. Hint: the model is broken; re-export it"
    )


def _is_order_complaint(exc: Exception) -> bool:
    return "topologically sorted" in str(exc)


def _checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as ``onnx.checker`` can check it in memory. In memory the checker would look for
    external data files in the working directory: a copy marks their locations with '#', which it
    does not look up (:func:`check_external_data` already checked them against the model's folder)."""
    if not any(is_external(t) for t in all_tensors(model)):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in all_tensors(copy):
        for entry in tensor.external_data if is_external(tensor) else ():
            if entry.key == "location":
                entry.value = "#" + entry.value
    return copy


def _checker_message(path: Path, exc: Exception) -> str:
    text = " ".join(str(exc).split())
    if _is_order_complaint(exc):  # sorting did not help: a tensor nothing provides
        return (
            f"{path} is not a valid ONNX model: {_shorten(text, 200)}. Hint: a node reads a tensor that no earlier "
            "node, initializer or graph input provides (or its own output); re-export the model"
        )
    return f"{path} is not a valid ONNX model: {_shorten(text, 200)}. Hint: re-export it or check it with onnx.checker"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return _shorten(text[0], 160) if text else type(exc).__name__


def check_tensor_sizes(loaded: LoadedModel) -> None:
    """Refuse a tensor whose bytes do not fill its shape (a damaged file onnx.checker accepts)."""
    for tensor in all_tensors(loaded.model):
        problem = raw_size_mismatch(tensor)
        if problem:
            raise BnscopeError(f"{loaded.path}: {problem}. Hint: the file is damaged; re-export or re-download it")


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
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(out), suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a model is an ordinary file
    data_name = out.name + ".data"
    tmp_data = out.parent / f"{temp_prefix(data_name)}{tmp_path.name[-12:-4]}.data.tmp"
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
