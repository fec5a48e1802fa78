"""Low-level TensorProto handling: plain numeric types, raw reads at an offset, inline and external
storage fields.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from bnscope.errors import BnscopeError

# Element types whose bytes are the little-endian numpy array itself (no packing, no ml_dtypes).
PLAIN_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in (
        "FLOAT",
        "DOUBLE",
        "FLOAT16",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "BOOL",
        "COMPLEX64",
        "COMPLEX128",
    )
)


def read_into(f, offset: int, shape: tuple, dtype: np.dtype) -> np.ndarray:
    array = np.empty(shape, dtype)
    f.seek(offset)
    f.readinto(array.reshape(-1).view(np.uint8))
    return array


def read_via_onnx(tensor: onnx.TensorProto, target: Path, offset: int, length: int | None) -> np.ndarray:
    """Packed, ml_dtypes or big-endian tensors: onnx's own decoder on the raw bytes."""
    with open(target, "rb") as f:
        f.seek(offset)
        raw = f.read() if length is None else f.read(length)
    shell = onnx.TensorProto()
    shell.CopyFrom(tensor)
    del shell.external_data[:]
    shell.data_location = onnx.TensorProto.DEFAULT
    shell.raw_data = raw
    try:
        return numpy_helper.to_array(shell)
    except ValueError as exc:  # the bytes do not fill the declared shape
        raise BnscopeError(
            f"external data of tensor {tensor.name!r} ({len(raw)} bytes at offset {offset} in {target.name}) does "
            f"not match its shape {list(tensor.dims)} ({exc}). Hint: the model is broken; re-export or re-save it"
        ) from None


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def plain_type(dtype: np.dtype) -> int | None:
    """The TensorProto type whose raw bytes are this numpy dtype's, or None."""
    if sys.byteorder != "little":
        return None
    try:
        code = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (KeyError, TypeError, ValueError):
        return None
    return code if code in PLAIN_TYPES else None


def plain_dtype(tensor: onnx.TensorProto) -> np.dtype | None:
    if tensor.data_type not in PLAIN_TYPES or sys.byteorder != "little":
        return None
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def raw_size_mismatch(tensor: onnx.TensorProto) -> str | None:
    """What is wrong when an inline tensor's raw bytes do not fill its shape (onnx.checker lets such a
    tensor through; numpy and onnxruntime fail on it later), else None. Packed and non-raw tensors:
    None (onnx decodes those itself)."""
    dtype = plain_dtype(tensor)
    if dtype is None or not tensor.HasField("raw_data"):
        return None
    size, needed = len(tensor.raw_data), int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize
    if size == needed:
        return None
    return f"tensor {tensor.name!r} holds {size} bytes, but its shape {list(tensor.dims)} of {dtype} needs {needed}"


def fill_inline(tensor: onnx.TensorProto, value: np.ndarray, dtype=None) -> None:
    """``tensor.CopyFrom(numpy_helper.from_array(value.astype(dtype), name))`` with one full-size
    copy fewer for plain types."""
    value = value.astype(dtype, copy=False) if dtype is not None else value
    name, code = tensor.name, plain_type(value.dtype)
    if code is None:
        tensor.CopyFrom(numpy_helper.from_array(value, name))
        return
    tensor.Clear()
    tensor.name, tensor.data_type = name, code
    tensor.dims.extend(value.shape)
    tensor.raw_data = np.ascontiguousarray(value).tobytes()


def make_external(tensor: onnx.TensorProto, dtype: np.dtype, shape: tuple, location: str, offset: int) -> None:
    name = tensor.name
    tensor.Clear()
    tensor.name, tensor.data_type = name, plain_type(dtype)
    tensor.dims.extend(shape)
    point_at(tensor, location, offset, math.prod(shape) * dtype.itemsize)


def point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, val in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, val
    tensor.data_location = onnx.TensorProto.EXTERNAL
