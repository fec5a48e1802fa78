"""What ``quantize`` returns: per output, per layer, the plan and the search, as JSON-ready dataclasses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bnscope.quant.equalize import EqualizedPair
from bnscope.quant.measure import Latency, OutputSqnr
from bnscope.quant.plan import Step
from bnscope.quant.risk import LayerRisk
from bnscope.schema import SCHEMA_VERSION


def _num(value: float | None, digits: int = 3) -> float | None:
    """JSON has no inf/NaN: None for them, else rounded."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


@dataclass(frozen=True)
class QuantizeResult:
    model: str
    output: str | None
    target_sqnr_db: float
    per_channel: bool
    calibration: str
    evaluation: str
    sqnr_db: float
    outputs: tuple[OutputSqnr, ...]
    int8: tuple[str, ...]
    int16: tuple[str, ...]
    layers: tuple[LayerRisk, ...]  # riskiest (predicted) first
    rank_correlation: float | None
    rank_correlation_output: float | None
    equalized: tuple[EqualizedPair, ...]
    steps: tuple[Step, ...]
    reached: bool
    latency: Latency | None
    folded: int
    warnings: tuple[str, ...] = field(default=())

    @property
    def fraction_int8(self) -> float:
        total = len(self.int8) + len(self.int16)
        return len(self.int8) / total if total else 1.0

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "output": self.output,
            "target_sqnr_db": self.target_sqnr_db,
            "reached": self.reached,
            "weights": "per-channel" if self.per_channel else "per-tensor",
            "calibration": self.calibration,
            "evaluation": self.evaluation,
            "bn_folded": self.folded,
            "sqnr_db": _num(self.sqnr_db),
            "outputs": [{"name": o.name, "sqnr_db": _num(o.sqnr_db)} for o in self.outputs],
            "activations": {
                "int8": len(self.int8),
                "int16": len(self.int16),
                "fraction_int8": _num(self.fraction_int8, 4),
                "int16_tensors": list(self.int16),
            },
            "rank_correlation": _num(self.rank_correlation),
            "rank_correlation_output": _num(self.rank_correlation_output),
            "layers": [layer_dict(r) for r in self.layers],
            "equalized": [
                {"first": p.first, "second": p.second, "through": list(p.through), "depthwise": p.depthwise}
                for p in self.equalized
            ],
            "search": [{"units": s.units, "int16_tensors": s.tensors, "sqnr_db": _num(s.sqnr_db)} for s in self.steps],
            "latency_ms": None
            if self.latency is None
            else {
                "float": _num(self.latency.float_ms),
                "quantized": _num(self.latency.quantized_ms),
                "speedup": _num(self.latency.speedup),
            },
            "warnings": list(self.warnings),
        }


def layer_dict(r: LayerRisk) -> dict:
    return {
        "bn": r.bn,
        "conv": r.conv,
        "activation": r.chain.activation,
        "tensors": list(r.chain.tensors),
        "channels": r.channels,
        "weight_sqnr_per_tensor_db": _num(r.weight_sqnr_per_tensor_db),
        "weight_sqnr_per_channel_db": _num(r.weight_sqnr_per_channel_db),
        "predicted_range": [_num(v) for v in r.predicted_range],
        "measured_range": None if r.measured_range is None else [_num(v) for v in r.measured_range],
        "knee": None if r.chain.knee is None else list(r.chain.knee),
        "knee_steps": _num(r.knee_steps),
        "measured_knee_steps": _num(r.measured_knee_steps),
        "predicted_sqnr_db": _num(r.predicted_sqnr_db),
        "measured_sqnr_db": _num(r.measured_sqnr_db),
        "measured_output_sqnr_db": _num(r.measured_output_sqnr_db),
        "bias_overflow": r.bias_overflow,
    }
