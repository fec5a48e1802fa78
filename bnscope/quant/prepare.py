"""Make a folded model something onnxruntime's quantizer handles well.

* Weights held in Constant nodes (every Paddle export) are quantised as *activations* by
  onnxruntime (one per-tensor uint8 range, calibrated): they become initializers first.
* Initializers also listed as graph inputs (old exporters) are weights onnxruntime treats as
  overridable inputs and does not quantise as weights: the fold already took them as constants, so
  they leave the input list.
* Per-channel QDQ needs ``DequantizeLinear``'s ``axis`` (opset 13): older models are converted with
  ``onnx.version_converter`` (which turns Clip's attributes into inputs, among others).
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from bnscope.errors import BnscopeError
from bnscope.onnxio.constants import constant_node_value
from bnscope.onnxio.nodes import default_opset

QDQ_MIN_OPSET = 13


def prepare_for_quantization(model: onnx.ModelProto, name: str = "the model") -> onnx.ModelProto:
    """A copy with Constant-node values as initializers and the default opset at least 13."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    if default_opset(work) < QDQ_MIN_OPSET:
        work = _convert(work, name)
    constants_to_initializers(work)
    initializers = {t.name for t in work.graph.initializer}
    inputs = [i for i in work.graph.input if i.name not in initializers]
    del work.graph.input[:]
    work.graph.input.extend(inputs)
    return work


def _convert(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    try:
        converted = onnx.version_converter.convert_version(model, QDQ_MIN_OPSET)
    except Exception as exc:  # the converter raises RuntimeError/ValueError/its own C++ errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BnscopeError(
            f"cannot convert {name} from opset {default_opset(model)} to {QDQ_MIN_OPSET} for QDQ ({first}). "
            "Hint: re-export the model at opset 13 or later"
        ) from exc
    return converted


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Replaces main-graph Constant nodes by initializers of the same name, in place. Returns how many."""
    graph = model.graph
    keep, moved = [], 0
    for node in graph.node:
        value = constant_node_value(node, numpy_helper.to_array) if node.op_type == "Constant" else None
        if value is None or node.domain not in ("", "ai.onnx"):
            keep.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        moved += 1
    del graph.node[:]
    graph.node.extend(keep)
    return moved
