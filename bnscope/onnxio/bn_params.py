"""BatchNormalization nodes whose parameters cannot describe one layer, refused at load.

``onnx.checker`` does not compare shapes: a scale of 3 values beside a mean of 4, or a BN over a
rank-1 input, loads fine and only fails later, deep in numpy or shape inference. Per the spec,
``scale``, ``B``, ``input_mean`` and ``input_var`` are 1-D of length C, and X is (N, C, D1, ...).
Only what the file states is checked: initializer dims and the declared shape of X.
"""

from __future__ import annotations

import onnx

from bnscope.errors import BnscopeError

_PARAMS = ("scale", "B", "input_mean", "input_var")


def check_batchnorm_params(model: onnx.ModelProto) -> None:
    """Raises BnscopeError for the first BN whose parameter shapes or input rank do not fit."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    ranks = _declared_shapes(model.graph)
    for index, node in enumerate(model.graph.node):
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            _check_node(node, index, dims, ranks)


def _declared_shapes(graph: onnx.GraphProto) -> dict[str, tuple]:
    shapes = {}
    for info in (*graph.input, *graph.value_info):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            shape = info.type.tensor_type.shape.dim
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in shape)
    return shapes


def _check_node(node: onnx.NodeProto, index: int, dims: dict, shapes: dict) -> None:
    name = node.name or f"#{index} ({node.output[0] if node.output else 'BatchNormalization'})"
    given = {p: dims[i] for p, i in zip(_PARAMS, node.input[1:5]) if i in dims}
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
