"""One source of BatchNormalization facts: is a node ONNX's BN, its attributes, its mode, its
parameters, and the one type every "not done because" answer takes.

* **Is it a BN.** ONNX's BatchNormalization is the op type in the default domain (``""`` or
  ``"ai.onnx"``). A node of that op type in another domain (``com.microsoft``, a custom one) is some
  other operator with its own contract: no command reads it as a BN; ``inspect`` notes it.
* **Its mode.** A BN normalises with the batch's own statistics (training behaviour) when
  ``training_mode=1`` (opset >= 14), when it lists optional outputs at opset 7-13 (where the output
  count set the mode: ``Y, mean, var, saved_mean, saved_var``), or when ``is_test`` is 0 (the spec's
  default) before opset 7. Otherwise it applies the fixed map
  ``Y = scale * (X - input_mean) / sqrt(input_var + epsilon) + B``.
* **Its parameters.** Inputs 1-4 in the spec's order: scale, B, input_mean, input_var (1-D, C each).
* **Refusals.** :class:`Refusal` is what a check returns when it will not do something (fold a BN,
  tap it, repair it), in the style of onnxscript's ``MatchResult().fail(reason)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from bnscope.onnxio.nodes import attribute_values, subgraphs

BN_OP = "BatchNormalization"
ONNX_DOMAINS = ("", "ai.onnx")
PARAMS = ("scale", "B", "input_mean", "input_var")

# The element types the spec allows for X and the parameters (T, T1, T2 of BatchNormalization-15).
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)


@dataclass(frozen=True)
class Refusal:
    """Why something is not done (a BN not folded, not tapped, not repaired): a plain-words fragment."""

    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class BnAttributes:
    """BatchNormalization attributes with the spec's defaults for the node's opset."""

    epsilon: float
    momentum: float
    training_mode: int
    spatial: int  # opset < 9 only; 1 means per channel (the only kind bnscope handles)
    is_test: int | None  # opset < 7 only; 0 means training behaviour


def is_batchnorm(node: onnx.NodeProto) -> bool:
    """True for ONNX's BatchNormalization (op type and the default domain), False for anything else."""
    return node.op_type == BN_OP and node.domain in ONNX_DOMAINS


def is_foreign_batchnorm(node: onnx.NodeProto) -> bool:
    """A node called BatchNormalization in another domain: not ONNX's BN, and left alone."""
    return node.op_type == BN_OP and node.domain not in ONNX_DOMAINS


def bn_attributes(node: onnx.NodeProto, opset: int) -> BnAttributes:
    attrs = attribute_values(node)
    return BnAttributes(
        epsilon=float(attrs.get("epsilon", 1e-5)),
        momentum=float(attrs.get("momentum", 0.9)),
        training_mode=int(attrs.get("training_mode", 0)),
        spatial=int(attrs.get("spatial", 1)),
        is_test=int(attrs.get("is_test", 0)) if opset < 7 else None,
    )


def training_mode(node: onnx.NodeProto, opset: int) -> str | None:
    """Why the BN normalises with batch statistics (a phrase naming what says so), or None when it
    applies its stored statistics. ``opset`` is the model's default-domain opset."""
    attrs = bn_attributes(node, opset)
    if attrs.training_mode:
        return "training_mode=1"
    if attrs.is_test == 0:
        return f"opset-{opset} BatchNormalization with is_test=0"
    extra = [o for o in node.output[1:] if o]
    if extra and 7 <= opset < 14:
        return f"opset-{opset} BatchNormalization with {1 + len(extra)} outputs"
    return None


def subgraph_bns(graph: onnx.GraphProto) -> dict[str, str]:
    """BatchNormalization nodes inside subgraphs (If, Loop, Scan bodies), at any depth: name -> the
    node that holds them, as ``"Op 'name'"``. The main graph's own BNs are not listed."""
    found: dict[str, str] = {}
    for position, node in enumerate(graph.node):
        holder = f"{node.op_type} '{node.name or f'#{position}'}'"
        for sub in subgraphs(node):
            for index, inner in enumerate(sub.node):
                if is_batchnorm(inner):
                    found[inner.name or f"{sub.name or 'subgraph'}#{index}"] = holder
            found.update({name: where for name, where in subgraph_bns(sub).items() if name not in found})
    return found
