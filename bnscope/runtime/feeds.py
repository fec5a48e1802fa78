"""A session's inputs as bnscope sees them (``TensorInfo``) and the check of a feed against them, with
errors that name the input, the expected shape and dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnscope.errors import BnscopeError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- sessions
@dataclass(frozen=True)
class TensorInfo:
    """Name, shape (ints, symbolic names or None) and onnxruntime type of a model input/output."""

    name: str
    shape: tuple[int | str | None, ...] | None
    type: str

    @property
    def dtype(self) -> np.dtype | None:
        """The numpy dtype for a tensor type numpy knows, else None."""
        return NUMPY_TYPES.get(self.type)


NUMPY_TYPES = {
    f"tensor({k})": np.dtype(v)
    for k, v in {
        "float": "float32",
        "double": "float64",
        "float16": "float16",
        "bool": "bool",
        "int8": "int8",
        "int16": "int16",
        "int32": "int32",
        "int64": "int64",
        "uint8": "uint8",
        "uint16": "uint16",
        "uint32": "uint32",
        "uint64": "uint64",
    }.items()
}


def check_feed(info: TensorInfo, array: np.ndarray) -> None:
    want = info.dtype
    if want is not None and array.dtype != want:
        raise BnscopeError(
            f"input '{info.name}' is {array.dtype} but the model expects {want} "
            f"({info.type}). Hint: cast it with .astype(np.{want.name})"
        )
    if info.shape is None:
        return
    if array.ndim != len(info.shape):
        raise BnscopeError(
            f"input '{info.name}' has shape {array.shape} (rank {array.ndim}) but "
            f"the model expects rank {len(info.shape)} {show_shape(info.shape)}. "
            "Hint: reshape or batch the data to match"
        )
    for axis, (got, dim) in enumerate(zip(array.shape, info.shape)):
        if isinstance(dim, int) and dim >= 0 and got != dim:
            raise BnscopeError(
                f"input '{info.name}' has shape {array.shape} but the model expects "
                f"{show_shape(info.shape)} (dimension {axis} must be {dim}). "
                "Hint: resize or batch the data to match"
            )


def show_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def tensor_info(arg: Any) -> TensorInfo:
    shape = None if arg.shape is None else tuple(arg.shape)
    return TensorInfo(name=arg.name, shape=shape, type=arg.type)
