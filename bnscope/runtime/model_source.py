"""What ``create_session`` accepts as a model: a path, serialized bytes or a ``ModelProto``, checked.

A ``ModelProto`` for the CPU provider goes to onnxruntime without its large weights: those are handed
over as in-memory external initializers (``SessionOptions.add_external_initializers``: onnxruntime
copies them into its graph while the session is created, then lets them go, as its C API documents)
and the serialised model holds only the graph. For a 45 MB ResNet-18 that
is about 75 ms a session instead of 140 ms (protobuf serialisation, then onnxruntime parsing the
bytes again); the session, its graph optimisations (Conv+BN fusion included) and its outputs are the
same, bit for bit (tests/test_sessions_in_memory.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError
from onnx import numpy_helper

from bnscope.errors import BnscopeError
from bnscope.onnxio.model_io import PROTOBUF_LIMIT
from bnscope.onnxio.nodes import subgraphs
from bnscope.onnxio.tensor_proto import raw_size_mismatch

# Initializers of at least this many bytes are handed over in memory (see the module docstring).
IN_MEMORY_MIN_BYTES = 1 << 16
# numpy dtypes onnxruntime takes as they are (float16/bfloat16 and the rest stay in the model bytes)
IN_MEMORY_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64, onnx.TensorProto.INT32}
)
IN_MEMORY_LOCATION = "bnscope-in-memory"


@dataclass(frozen=True)
class InMemoryWeights:
    """Initializers given to onnxruntime beside the model bytes (needed until the session is created)."""

    names: tuple[str, ...] = ()
    values: tuple = ()

    def add_to(self, options: ort.SessionOptions) -> None:
        if self.names:
            options.add_external_initializers(list(self.names), list(self.values))


def split_weights(model: onnx.ModelProto, keep: frozenset[str] = frozenset()) -> tuple[bytes, InMemoryWeights]:
    """``model`` serialised without its large initializers (names in ``keep`` stay), and those as
    :class:`InMemoryWeights`. The caller's model is not changed."""
    inputs = {i.name for i in model.graph.input}  # an initializer a feed may override stays in the bytes
    big = [
        i
        for i, t in enumerate(model.graph.initializer)
        if t.name not in keep
        and t.name not in inputs
        and t.data_type in IN_MEMORY_TYPES
        and t.HasField("raw_data")
        and len(t.raw_data) >= IN_MEMORY_MIN_BYTES
        and raw_size_mismatch(t) is None  # a malformed tensor stays in the bytes: onnxruntime names it
    ]
    if not big:
        return model.SerializeToString(), InMemoryWeights()
    shell = onnx.ModelProto()
    shell.CopyFrom(model)
    names, values = [], []
    for i in big:
        tensor = shell.graph.initializer[i]
        names.append(tensor.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(numpy_helper.to_array(tensor))))
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        tensor.external_data.add(key="location", value=IN_MEMORY_LOCATION)
    return shell.SerializeToString(), InMemoryWeights(tuple(names), tuple(values))


def model_source(
    model: str | os.PathLike[str] | bytes | onnx.ModelProto, split: bool = False, keep: frozenset[str] = frozenset()
) -> tuple[str | bytes, str, InMemoryWeights]:
    """What onnxruntime loads, how messages name it, and the weights handed over beside it
    (``split``: a ``ModelProto``'s large initializers but those in ``keep``; see the module docstring)."""
    if isinstance(model, bytes):
        return model, "the model bytes", InMemoryWeights()
    if isinstance(model, onnx.ModelProto):
        if _uses_external_data(model.graph):
            raise BnscopeError(
                "the in-memory model refers to external data files, which onnxruntime "
                "cannot find without the model's path. Hint: pass the .onnx path instead"
            )
        label = f"the in-memory model '{model.graph.name}'"
        try:  # serialised once: measuring first (ByteSize) costs a second serialisation
            data, weights = split_weights(model, keep) if split else (model.SerializeToString(), InMemoryWeights())
        except (EncodeError, ValueError):  # protobuf refuses messages of 2 GB or more
            data, weights = None, InMemoryWeights()
        if data is None or len(data) > PROTOBUF_LIMIT:
            raise BnscopeError(
                "the model is larger than 2 GB and cannot be passed to onnxruntime "
                "in memory. Hint: save it with onnx.save(model, path, "
                "save_as_external_data=True) and pass the path"
            )
        return data, label, weights
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise BnscopeError(f"model file {path} does not exist. Hint: check the path")
        return str(path), str(path), InMemoryWeights()
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
