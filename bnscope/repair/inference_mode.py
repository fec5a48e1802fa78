"""Training-mode BatchNormalization made an inference BN: the repair ``recalibrate`` applies.

A BN with ``training_mode=1`` (opset >= 14), or with its optional outputs at opset 7-13 (where the
output count set the mode), normalises every batch with the batch's own statistics,
    Y = gamma * (X - mean_B) / sqrt(var_B + epsilon) + beta,
and ignores the running statistics it was given. The repair makes it the inference form
    Y = gamma * (X - mean_r) / sqrt(var_r + epsilon) + beta
where (mean_r, var_r) are the population statistics ``recalibrate`` computes (``sequential``:
each layer sees the inputs of the repaired layers before it). The optional outputs (the
momentum-updated running mean and variance) are dropped; where a graph output or another node
reads one, a Constant holding the new statistic takes its place, so the interface is unchanged.

Pattern (:func:`training_mode_layers`) -> check (:func:`check_repair`, a reason when it refuses)
-> rewrite (:func:`to_inference`); ``recalibrate`` orchestrates it
(:mod:`bnscope.workflows.inference_mode` refuses a model with nothing to re-estimate and runs the result). :func:`loadable_as_exported` gives the one-output form, which
onnxruntime refuses ("This number of op outputs should be 3 when Training_mode = True"), the two
outputs it needs, so the model as exported can still be run (with batch statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnscope.onnxio.bn import Refusal, training_mode
from bnscope.onnxio.edit import all_names, fresh_name
from bnscope.onnxio.graph import GraphView


@dataclass(frozen=True)
class ModeRepair:
    """One training-mode BN: repaired to inference mode, or why not."""

    name: str
    repaired: bool
    reason: str | None = None
    kept_as_constants: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "repaired": self.repaired,
            "reason": self.reason,
            "kept_as_constants": list(self.kept_as_constants),
        }


def training_mode_layers(view: GraphView) -> list[int]:
    """Indices of the BNs that normalise with batch statistics."""
    return [idx for idx in view.bn_indices() if _in_training_mode(view, view.nodes[idx])]


def _in_training_mode(view: GraphView, node: onnx.NodeProto) -> bool:
    return training_mode(node, view.opset) is not None


def check_repair(view: GraphView, idx: int) -> Refusal | None:
    """None when BN ``idx`` can be repaired, else why not."""
    node = view.nodes[idx]
    if view.opset < 7:
        return Refusal(f"opset-{view.opset} BatchNormalization (is_test): onnxruntime cannot run it at all")
    if any(view.constant(name) is None for name in node.input[1:5]):
        return Refusal("its parameters are graph inputs (fed at run time): there are no stored statistics to replace")
    return None


def plan_repairs(view: GraphView) -> list[ModeRepair]:
    """A record per training-mode BN; ``repaired`` means it will be (``kept_as_constants`` later)."""
    out = []
    for idx in training_mode_layers(view):
        refusal = check_repair(view, idx)
        out.append(ModeRepair(view.node_name(idx), refusal is None, refusal.reason if refusal else None))
    return out


def to_inference(model: onnx.ModelProto, names: set[str], stats: dict[str, tuple]) -> dict[str, tuple[str, ...]]:
    """Rewrites the BNs ``names`` of ``model`` (in place) to inference mode; returns, per BN, the
    optional outputs kept as Constants of its new statistics ``stats[name] = (mean, var)``."""
    view = GraphView(model)
    taken, kept, constants = all_names(model), {}, []
    for idx in training_mode_layers(view):
        node, name = model.graph.node[idx], view.node_name(idx)
        if name not in names:
            continue
        for attr in [a for a in node.attribute if a.name == "training_mode"]:
            node.attribute.remove(attr)
        dtype = _stat_dtype(view, node)
        mine = []
        for pos, out in enumerate(node.output[1:], 1):
            if out and view.use_count(out):  # read by a node, an If/Loop body, or the graph
                value = np.asarray(stats[name][(pos - 1) % 2], np.float64).astype(dtype)
                constants.append((idx, _constant(out, value, fresh_name(f"{name}_{out}_const", taken))))
                mine.append(out)
        del node.output[1:]
        kept[name] = tuple(mine)
    for idx, const in sorted(constants, key=lambda c: -c[0]):
        model.graph.node.insert(idx, const)
    return kept


def loadable_as_exported(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose one-output training-mode BNs get the two outputs onnxruntime requires."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    view = GraphView(work)
    taken = all_names(work)
    for idx in training_mode_layers(view):
        node = work.graph.node[idx]
        while len(node.output) < 3:
            node.output.append("")
        for pos in (1, 2):
            if not node.output[pos]:
                node.output[pos] = fresh_name(f"{view.node_name(idx)}_unused_{pos}", taken)
    return work


def _stat_dtype(view: GraphView, node: onnx.NodeProto):
    const = view.constant(node.input[3])
    return const.value.dtype if const is not None else np.float32


def _constant(output: str, value: np.ndarray, name: str) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], name=name, value=numpy_helper.from_array(value, output))
