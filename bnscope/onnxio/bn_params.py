"""BatchNormalization nodes whose parameters cannot describe one layer, refused at load.

``onnx.checker`` does not compare shapes: a scale of 3 values beside a mean of 4, or a BN over a
rank-1 input, loads fine and only fails later, deep in numpy or shape inference. Per the spec,
``scale``, ``B``, ``input_mean`` and ``input_var`` are 1-D of length C, and X is (N, C, D1, ...).
The element types must be float (float16, float, double, bfloat16: the spec's T, T1, T2): a BN
of int64, string, bool, complex or float8 tensors fails onnx's type inference and onnxruntime's
load. Only what the file states is checked: initializer dims and types, and the declared shape and
type of X.
"""

from __future__ import annotations

import onnx

from bnscope.errors import BnscopeError
from bnscope.onnxio.bn import FLOAT_TYPES, PARAMS, is_batchnorm


def check_batchnorm_params(model: onnx.ModelProto) -> None:
    """Raises BnscopeError for the first BN whose parameter shapes, types or input rank do not fit."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    types = {t.name: t.data_type for t in model.graph.initializer}
    ranks = _declared_shapes(model.graph)
    types.update(_declared_types(model.graph))
    for index, node in enumerate(model.graph.node):
        if is_batchnorm(node):
            _check_types(node, index, types)
            _check_node(node, index, dims, ranks)


def _declared_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def _check_types(node: onnx.NodeProto, index: int, types: dict[str, int]) -> None:
    for role, tensor in zip(("X", *PARAMS), node.input[:5]):
        elem = types.get(tensor)
        if elem is not None and elem not in FLOAT_TYPES:
            kind = onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else elem
            raise BnscopeError(
                f"BatchNormalization {_name(node, index)!r}: {role} ({tensor!r}) is {kind}; BatchNormalization "
                "takes float16, float, double or bfloat16 tensors. Hint: the model is broken; re-export it"
            )


def _name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"#{index} ({node.output[0] if node.output else 'BatchNormalization'})"


def _declared_shapes(graph: onnx.GraphProto) -> dict[str, tuple]:
    shapes = {}
    for info in (*graph.input, *graph.value_info):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            shape = info.type.tensor_type.shape.dim
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in shape)
    return shapes


def _check_node(node: onnx.NodeProto, index: int, dims: dict, shapes: dict) -> None:
    name = _name(node, index)
    given = {p: dims[i] for p, i in zip(PARAMS, node.input[1:5]) if i in dims}
    for param, shape in given.items():
        if len(shape) != 1:
            raise BnscopeError(
                f"BatchNormalization {name!r}: {param} has shape {list(shape)}, not one value per channel. "
                "Hint: the model is broken; re-export it"
            )
    lengths = {p: s[0] for p, s in given.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{p} {n}" for p, n in lengths.items())
        raise BnscopeError(
            f"BatchNormalization {name!r}: its parameters disagree on the channel count ({listed}). "
            "Hint: the model is broken; re-export it"
        )
    if 0 in lengths.values():
        raise BnscopeError(
            f"BatchNormalization {name!r} has 0 channels: it normalises nothing. Hint: the model is broken; re-export it"
        )
    x = shapes.get(node.input[0]) if node.input else None
    if x is None:
        return
    if len(x) < 2:
        raise BnscopeError(
            f"BatchNormalization {name!r}: input {node.input[0]!r} has rank {len(x)}; it must be (N, C, ...). "
            "Hint: the model is broken; re-export it"
        )
    channels = next(iter(lengths.values()), None)
    if channels is not None and x[1] not in (None, 0) and x[1] != channels:
        raise BnscopeError(
            f"BatchNormalization {name!r}: input {node.input[0]!r} has {x[1]} channels but the parameters "
            f"have {channels}. Hint: the model is broken; re-export it"
        )
