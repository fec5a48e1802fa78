"""A fast stand-in for re-quantising: one float model with a switchable uint8 Q/DQ on every activation
tensor onnxruntime quantises, and its weights already int8 (dequantised), to measure many plans.

Each candidate tensor ``t`` becomes ``Where(mask[k], DequantizeLinear(QuantizeLinear(t)), t)`` with
onnxruntime's calibrated scale and zero point; ``mask`` (bool, one per tensor) is a graph input, so
one session measures any set of 8-bit tensors (the others stay float, as 16 bits nearly are) with
one run per feed. Conv/Gemm weights are replaced by their symmetric int8 values (per output channel,
or per tensor), as the QDQ model will hold them. The plan it picks is then quantised for real and
measured again (:mod:`bnscope.workflows.quantize`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnscope.numerics import quantmath as qm
from bnscope.runtime.sessions import create_session

MASK = "bnscope_int8_mask"


def switchable(model: onnx.ModelProto, ranges: Mapping, tensors: Sequence[str], per_channel: bool):
    """A copy of ``model`` with int8 weights and a Q/DQ on each of ``tensors`` switched by ``MASK``."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    outputs = {o.name for o in graph.output}
    used = [t for t in tensors if t in ranges and t not in outputs]
    _int8_weights(graph, per_channel)
    graph.input.append(helper.make_tensor_value_info(MASK, TensorProto.BOOL, [len(used)]))
    renames = {t: f"{t}__bnscope_sw" for t in used}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    added = []
    for k, t in enumerate(used):
        lo, hi = ranges[t]
        scale = qm.activation_scale(lo, hi, 8)
        zero = int(np.clip(np.round(-min(lo, 0.0) / scale), 0, 255))
        p = renames[t]
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(scale, np.float32), p + "_s"),
                numpy_helper.from_array(np.array(zero, np.uint8), p + "_z"),
                numpy_helper.from_array(np.array([k], np.int64), p + "_k"),
            ]
        )
        added.append(
            (
                t,
                [
                    helper.make_node("QuantizeLinear", [t, p + "_s", p + "_z"], [p + "_q"]),
                    helper.make_node("DequantizeLinear", [p + "_q", p + "_s", p + "_z"], [p + "_dq"]),
                    helper.make_node("Gather", [MASK, p + "_k"], [p + "_on1"]),
                    helper.make_node("Squeeze", [p + "_on1"], [p + "_on"]),
                    helper.make_node("Where", [p + "_on", p + "_dq", t], [p]),
                ],
            )
        )
    _insert_after_producers(graph, added)
    return work, used


def _int8_weights(graph: onnx.GraphProto, per_channel: bool) -> None:
    """Conv weights replaced by their symmetric int8 values, dequantised (float32)."""
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            tensor = inits[node.input[1]]
            w = numpy_helper.to_array(tensor).astype(np.float64)
            scales = qm.weight_scales(w, per_channel).reshape(-1, *[1] * (w.ndim - 1))
            q = np.clip(np.round(w / scales), -127, 127) * scales
            tensor.CopyFrom(numpy_helper.from_array(q.astype(np.float32), tensor.name))


def _insert_after_producers(graph: onnx.GraphProto, added: list) -> None:
    """Keeps the graph sorted: each tensor's switch goes right after the node that makes it."""
    after: dict[str, list] = {}
    for tensor, nodes in added:
        after.setdefault(tensor, []).extend(nodes)
    head = [n for t in (i.name for i in graph.input) for n in after.pop(t, [])]
    ordered = list(head)
    for node in graph.node:
        ordered.append(node)
        for out in node.output:
            ordered.extend(after.pop(out, []))
    del graph.node[:]
    graph.node.extend(ordered)


class Simulator:
    """Mean output SQNR of a plan (the set of 8-bit tensors) on ``feeds``, against ``reference`` (the float
    model's outputs on the same feeds)."""

    def __init__(self, model, ranges, tensors, feeds, reference, per_channel: bool = True):
        work, self.tensors = switchable(model, ranges, tensors, per_channel)
        self.index = {t: k for k, t in enumerate(self.tensors)}
        self.session = create_session(work, "cpu", opt_level="basic", label="the int8 simulation")
        self.feeds, self.reference = list(feeds), list(reference)

    def sqnr_db(self, eight_bit, feeds: int | None = None) -> float:
        """The mean output SQNR with ``eight_bit`` at uint8 (on the first ``feeds`` feeds; default all)."""
        mask = np.zeros(len(self.tensors), bool)
        for t in eight_bit:
            if t in self.index:
                mask[self.index[t]] = True
        count = len(self.feeds) if feeds is None else feeds
        got = [self.session.run({**feed, MASK: mask}) for feed in self.feeds[:count]]
        reference = self.reference[:count]
        values = []
        for j in range(len(reference[0])):
            signal = sum(float(np.sum(np.square(r[j], dtype=np.float64))) for r in reference)
            noise = sum(float(np.sum(np.square(r[j] - g[j], dtype=np.float64))) for r, g in zip(reference, got))
            values.append(qm.sqnr_db(signal, noise))
        finite = [v for v in values if np.isfinite(v)]
        return float(np.mean(finite)) if finite else float("inf")
