"""Constant folding in numpy for the small subgraphs exporters put before weights: Constant nodes
and Identity, Cast, Transpose, Reshape, Flatten, Squeeze, Unsqueeze, ConstantOfShape over
constant inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnscope.onnxio.nodes import attribute_values

# Ops through which a constant stays constant, evaluated here in numpy.
CONST_PASSTHROUGH = (
    "Identity",
    "Cast",
    "Transpose",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "ConstantOfShape",
    "Expand",
)
MAX_EVALUATED = 1 << 24  # values a constant subgraph may expand to; beyond, it is not evaluated


def constant_node_value(node: onnx.NodeProto, read) -> np.ndarray | None:
    """The value of a Constant node; ``read`` turns a TensorProto (maybe external) into an array."""
    for attr in node.attribute:
        if attr.name == "value":
            return read(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse or string constants are not weights


def evaluate(node: onnx.NodeProto, values: list[np.ndarray | None], opset: int) -> np.ndarray:
    attrs = attribute_values(node)
    op = node.op_type
    x = values[0]
    if op == "Identity":
        return x
    if op == "Cast":
        return x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op == "Transpose":
        return np.transpose(x, attrs.get("perm"))
    if op == "Reshape":
        return _reshape(x, values[1], bool(attrs.get("allowzero", 0)))
    if op == "Flatten":
        axis = attrs.get("axis", 1) % max(x.ndim, 1) if x.ndim else 0
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op in ("Squeeze", "Unsqueeze"):
        axes = attrs.get("axes") if opset < 13 else (None if len(values) < 2 or values[1] is None else values[1])
        axes = None if axes is None else [int(a) for a in np.atleast_1d(axes)]
        if op == "Squeeze":
            return np.squeeze(x, axis=None if axes is None else tuple(axes))
        rank = x.ndim + len(axes)
        for axis in sorted(a % rank for a in axes):
            x = np.expand_dims(x, axis)
        return x
    if op == "ConstantOfShape":
        fill = attrs.get("value")
        fill_value = numpy_helper.to_array(fill) if fill is not None else np.zeros(1, np.float32)
        return np.full(_bounded(tuple(int(d) for d in x)), fill_value.reshape(-1)[0], dtype=fill_value.dtype)
    if op == "Expand":  # numpy broadcasting is ONNX's (two-way) for Expand
        shape = _bounded(np.broadcast_shapes(x.shape, tuple(int(d) for d in values[1])))
        return np.array(np.broadcast_to(x, shape))
    raise NotImplementedError(op)


def _bounded(shape: tuple[int, ...]) -> tuple[int, ...]:
    if any(d < 0 for d in shape) or int(np.prod(shape, dtype=np.float64)) > MAX_EVALUATED:
        raise ValueError(f"shape {shape} is negative or too large to evaluate")
    return shape


def _reshape(x: np.ndarray, shape: np.ndarray, allowzero: bool) -> np.ndarray:
    target = [int(d) for d in shape]
    if not allowzero:
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)
