"""Node-level facts: the op types bnscope cares about and attribute values with the spec's defaults."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

BN_OP = "BatchNormalization"


LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class BnAttributes:
    """BatchNormalization attributes with the spec's defaults for the node's opset."""

    epsilon: float
    momentum: float
    training_mode: int
    spatial: int  # opset < 9 only; 1 means per channel (the only kind bnscope handles)
    is_test: int | None  # opset < 7 only; 0 means training behaviour


def attribute_values(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def bn_attributes(node: onnx.NodeProto, opset: int) -> BnAttributes:
    attrs = attribute_values(node)
    return BnAttributes(
        epsilon=float(attrs.get("epsilon", 1e-5)),
        momentum=float(attrs.get("momentum", 0.9)),
        training_mode=int(attrs.get("training_mode", 0)),
        spatial=int(attrs.get("spatial", 1)),
        is_test=int(attrs.get("is_test", 0)) if opset < 7 else None,
    )


def subgraphs(node: onnx.NodeProto):
    """The graphs a node holds in its attributes (If's branches, Loop's and Scan's bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        yield from attr.graphs


def subgraph_bns(graph: onnx.GraphProto) -> dict[str, str]:
    """BatchNormalization nodes inside subgraphs (If, Loop, Scan bodies), at any depth: name -> the
    node that holds them, as ``"Op 'name'"``. The main graph's own BNs are not listed."""
    found: dict[str, str] = {}
    for position, node in enumerate(graph.node):
        holder = f"{node.op_type} '{node.name or f'#{position}'}'"
        for sub in subgraphs(node):
            for index, inner in enumerate(sub.node):
                if inner.op_type == BN_OP and inner.domain in ("", "ai.onnx"):
                    found[inner.name or f"{sub.name or 'subgraph'}#{index}"] = holder
            found.update({name: where for name, where in subgraph_bns(sub).items() if name not in found})
    return found
