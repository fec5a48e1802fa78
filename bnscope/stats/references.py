"""What each layer's batch statistics are compared with: its stored running statistics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnscope.onnxio.bn import bn_attributes
from bnscope.onnxio.graph import GraphView


@dataclass(frozen=True)
class LayerReference:
    """What a layer's batch statistics are compared with: its stored running statistics."""

    index: int
    running_mean: np.ndarray
    running_var: np.ndarray
    epsilon: float

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "running_mean": self.running_mean.tolist(),
            "running_var": self.running_var.tolist(),
            "epsilon": self.epsilon,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LayerReference:
        return cls(
            int(d["index"]),
            np.asarray(d["running_mean"], np.float64),
            np.asarray(d["running_var"], np.float64),
            float(d["epsilon"]),
        )


def layer_references(view: GraphView) -> dict[str, LayerReference]:
    """Running statistics of every BN whose statistics are constants, by layer name."""
    refs = {}
    for k, idx in enumerate(view.bn_indices()):
        node = view.nodes[idx]
        mean, var = view.constant(node.input[3]), view.constant(node.input[4])
        if mean is None or var is None:
            continue
        eps = bn_attributes(node, view.opset).epsilon
        refs[view.node_name(idx)] = LayerReference(
            k, mean.value.astype(np.float64).reshape(-1), var.value.astype(np.float64).reshape(-1), eps
        )
    return refs
