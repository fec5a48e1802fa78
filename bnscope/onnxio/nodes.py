"""Node-level facts: the linear op types bnscope folds into, attribute values, subgraphs.

BatchNormalization's own facts live in :mod:`bnscope.onnxio.bn`."""

from __future__ import annotations

import onnx
from onnx import helper

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default domain ('' or 'ai.onnx'); 1 when it imports none."""
    return next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)


def attribute_values(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def subgraphs(node: onnx.NodeProto):
    """The graphs a node holds in its attributes (If's branches, Loop's and Scan's bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        yield from attr.graphs
