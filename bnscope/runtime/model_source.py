"""What ``create_session`` accepts as a model: a path, serialized bytes or a ``ModelProto``, checked."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from bnscope.errors import BnscopeError
from bnscope.onnxio.model_io import PROTOBUF_LIMIT
from bnscope.onnxio.nodes import subgraphs


def model_source(model: str | os.PathLike[str] | bytes | onnx.ModelProto) -> tuple[str | bytes, str]:
    if isinstance(model, bytes):
        return model, "the model bytes"
    if isinstance(model, onnx.ModelProto):
        if _uses_external_data(model.graph):
            raise BnscopeError(
                "the in-memory model refers to external data files, which onnxruntime "
                "cannot find without the model's path. Hint: pass the .onnx path instead"
            )
        if model.ByteSize() > PROTOBUF_LIMIT:
            raise BnscopeError(
                "the model is larger than 2 GB and cannot be passed to onnxruntime "
                "in memory. Hint: save it with onnx.save(model, path, "
                "save_as_external_data=True) and pass the path"
            )
        return model.SerializeToString(), f"the in-memory model '{model.graph.name}'"
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise BnscopeError(f"model file {path} does not exist. Hint: check the path")
        return str(path), str(path)
    raise BnscopeError(
        f"cannot make a session from a {type(model).__name__}. Hint: pass a path, bytes or an onnx.ModelProto"
    )


def _uses_external_data(graph: onnx.GraphProto) -> bool:
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        return True
    for node in graph.node:
        if any(attr.t.data_location == onnx.TensorProto.EXTERNAL for attr in node.attribute):
            return True
        if any(_uses_external_data(sub) for sub in subgraphs(node)):
            return True
    return False
