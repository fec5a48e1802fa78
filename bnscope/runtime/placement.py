"""Node placement: which execution provider runs which node, checked instead of assumed.

``session.get_providers()`` says which EPs a session holds, not which nodes each one runs: a GPU EP
that leaves a Conv to the CPU EP is a silent slowdown. onnxruntime >= 1.31 records the assignment
when the session config ``session.record_ep_graph_assignment_info`` is ``"1"``;
``session.get_provider_graph_assignment_info()`` then returns, per subgraph, ``ep_name`` and
``get_nodes()`` (``name``, ``op_type``, ``domain``). A *compute* node (``COMPUTE_OPS``) on the CPU EP
while another EP was asked for is a partial fallback. Shape bookkeeping (Shape, Gather on shapes,
Reshape, ...) that onnxruntime keeps on the CPU on purpose is not a compute op and never flagged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnxruntime as ort

from bnscope.runtime.providers import CPU

RECORD_KEY = "session.record_ep_graph_assignment_info"

COMPUTE_OPS = frozenset(
    {
        # linear ops and their quantised and fused forms
        "Conv",
        "ConvTranspose",
        "ConvInteger",
        "QLinearConv",
        "FusedConv",
        "NhwcConv",
        "Gemm",
        "FusedGemm",
        "MatMul",
        "MatMulInteger",
        "QLinearMatMul",
        "FusedMatMul",
        "MatMulNBits",
        "Einsum",
        # normalisation
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "GroupNormalization",
        "GroupNorm",
        "RMSNormalization",
        "LpNormalization",
        "MeanVarianceNormalization",
        "LRN",
        # pooling
        "AveragePool",
        "MaxPool",
        "LpPool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "GlobalLpPool",
        "MaxRoiPool",
        "RoiAlign",
        # attention and recurrence
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "RNN",
        "GRU",
        "LSTM",
    }
)
"""Op types whose place decides the speed; on the CPU EP behind a GPU EP they are a fallback."""

SHOWN_NODES = 5
"""Node names an error or warning shows."""


@dataclass(frozen=True)
class PlacedNode:
    name: str
    op_type: str
    provider: str

    def to_dict(self) -> dict:
        return {"name": self.name, "op_type": self.op_type, "provider": self.provider}


@dataclass(frozen=True)
class Placement:
    """Where a session's nodes run.

    Attributes:
        checked: onnxruntime reported the placement (>= 1.31); False: nothing is known.
        counts: EP name -> number of nodes it runs (after onnxruntime's graph optimisations).
        cpu_nodes: Compute nodes on the CPU EP while another EP was asked for.
        note: Why the placement was not checked, when it was not.
    """

    checked: bool
    counts: dict[str, int]
    cpu_nodes: tuple[PlacedNode, ...] = ()
    note: str | None = None

    def describe_cpu_nodes(self) -> str:
        """``"3 compute nodes (Conv x2, MaxPool) ran on the CPU: conv1, conv2, pool"``."""
        ops = Counter(n.op_type for n in self.cpu_nodes)
        kinds = ", ".join(f"{op} x{k}" if k > 1 else op for op, k in sorted(ops.items()))
        names = ", ".join(n.name or "(unnamed)" for n in self.cpu_nodes[:SHOWN_NODES])
        more = f" and {len(self.cpu_nodes) - SHOWN_NODES} more" if len(self.cpu_nodes) > SHOWN_NODES else ""
        return f"{len(self.cpu_nodes)} compute node(s) ({kinds}) on {CPU}: {names}{more}"


def placement_supported() -> bool:
    """Whether this onnxruntime reports node placement (1.31 and later)."""
    return hasattr(ort.InferenceSession, "get_provider_graph_assignment_info")


def record_placement(options: ort.SessionOptions) -> None:
    """Ask onnxruntime to record node placement in the session these options create."""
    if placement_supported():
        options.add_session_config_entry(RECORD_KEY, "1")


def read_placement(session: ort.InferenceSession, primary: str) -> Placement:
    """The placement a session recorded; ``primary`` is the EP that was asked for."""
    if not placement_supported():
        return Placement(False, {}, note=f"not checked: onnxruntime {ort.__version__} does not report it (1.31+)")
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception as exc:  # not recorded for this session: onnxruntime raises Fail
        return Placement(False, {}, note=f"not checked: {str(exc).splitlines()[0]}")
    nodes = [PlacedNode(n.name, n.op_type, sub.ep_name) for sub in subgraphs for n in sub.get_nodes()]
    counts = dict(Counter(n.provider for n in nodes))
    if primary == CPU:
        return Placement(True, counts)
    cpu = tuple(n for n in nodes if n.provider == CPU and n.op_type in COMPUTE_OPS)
    return Placement(True, counts, cpu)
