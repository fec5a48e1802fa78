"""Activation ranges cut at a HardSwish's lower knee, where nothing below it is ever seen downstream.

``HardSwish(y) = y * Clip(y + 3, 0, 6) / 6`` is 0 for every ``y <= -3``. When *every* reader of a
tensor ``y`` belongs to one HardSwish (the ONNX op, or Paddle's ``Add(y, 3) -> Clip(0, .) ->
Mul(y, .)``), the values of ``y`` below ``-3`` all give the same output, so ``y``'s quantisation
range can start at ``-3`` instead of the calibrated minimum: a BN-folded stem conv spanning -272..389
gets about 1.7x finer steps, and the values it clamps produce exactly what they produced before
(``-3 -> 0``). The cut is written through onnxruntime's ``TensorQuantOverrides`` ``rmin``/``rmax``,
so the model itself is unchanged. A tensor with any other reader (a graph output, a second branch)
keeps its calibrated range.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from bnscope.onnxio.graph import GraphView
from bnscope.quant.chains import scalar_constant


def _other(node: onnx.NodeProto, tensor: str) -> str | None:
    inputs = list(node.input)
    if len(inputs) != 2 or inputs.count(tensor) != 1:
        return None
    return inputs[1 - inputs.index(tensor)]


def hardswish_knee(view: GraphView, tensor: str) -> float | None:
    """The input value below which every reader of ``tensor`` gives HardSwish's 0, or None."""
    if view.is_graph_output(tensor):
        return None
    readers = [view.nodes[i] for i in view.consumers_of(tensor)]
    if len(readers) == 1 and readers[0].op_type == "HardSwish":
        return -3.0
    if len(readers) != 2 or sorted(r.op_type for r in readers) != ["Add", "Mul"]:
        return None
    add, mul = sorted(readers, key=lambda r: r.op_type)
    shift = scalar_constant(view, _other(add, tensor) or "")
    clips = [view.nodes[i] for i in view.consumers_of(add.output[0])]
    if shift is None or len(clips) != 1 or clips[0].op_type != "Clip" or view.is_graph_output(add.output[0]):
        return None
    clip = clips[0]
    low = scalar_constant(view, clip.input[1]) if len(clip.input) > 1 else None
    if low != 0.0 or _other(mul, tensor) != clip.output[0] or view.is_graph_output(clip.output[0]):
        return None
    return -shift


def knee_ranges(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The calibrated ``ranges`` of the tensors read only by a HardSwish, with the minimum raised to the
    knee where the calibration went below it (the others are not returned)."""
    view = GraphView(model)
    cut = {}
    for tensor, (lo, hi) in ranges.items():
        knee = hardswish_knee(view, tensor)
        if knee is not None and lo < knee < hi:
            cut[tensor] = (knee, hi)
    return cut
