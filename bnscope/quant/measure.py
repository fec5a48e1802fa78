"""Measuring a quantised model against its float twin: SQNR per output, per-layer damage, latency.

SQNR in dB per output, over every evaluation sample: ``10 log10(sum y^2 / sum (y - y_q)^2)``,
accumulated in float64. A layer's measured damage is its chain's SQNR (see
:func:`bnscope.quant.risk.chain_damage_db`) on the real Conv output, with onnxruntime's calibrated
ranges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from bnscope.numerics import quantmath as qm
from bnscope.runtime.measure import time_session
from bnscope.runtime.sessions import create_session


@dataclass(frozen=True)
class OutputSqnr:
    name: str
    sqnr_db: float


def run_all(model, feeds: Sequence[Mapping[str, np.ndarray]], label: str) -> tuple[list[str], list[list[np.ndarray]]]:
    """Every output of ``model`` (a path or ModelProto) on every feed, on the CPU at full optimisation."""
    session = create_session(model, "cpu", label=label)
    return session.output_names, [session.run(feed) for feed in feeds]


def output_sqnr(names: list[str], ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> list[OutputSqnr]:
    """SQNR of each output over all runs."""
    result = []
    for k, name in enumerate(names):
        signal = sum(float(np.sum(np.square(r[k], dtype=np.float64))) for r in ref)
        noise = sum(
            float(np.sum(np.square(r[k].astype(np.float64) - g[k].astype(np.float64)))) for r, g in zip(ref, got)
        )
        result.append(OutputSqnr(name, qm.sqnr_db(signal, noise)))
    return result


def mean_sqnr(outputs: list[OutputSqnr]) -> float:
    finite = [o.sqnr_db for o in outputs if np.isfinite(o.sqnr_db)]
    return float(np.mean(finite)) if finite else float("inf")


def tapped(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` with ``tensors`` as extra graph outputs (their types left to onnxruntime)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    have = {o.name for o in work.graph.output}
    for name in tensors:
        if name not in have:
            work.graph.output.append(onnx.ValueInfoProto(name=name))
    return work


def collect(model: onnx.ModelProto, tensors: Sequence[str], feeds, reduce) -> None:
    """Runs ``model`` with ``tensors`` tapped on each feed; calls ``reduce(name, value)`` per tensor."""
    session = create_session(tapped(model, tensors), "cpu", opt_level="disable", label="the tapped float model")
    names = list(tensors)
    for feed in feeds:
        for name, value in zip(names, session.run(feed, names)):
            reduce(name, value)


@dataclass(frozen=True)
class Latency:
    float_ms: float
    quantized_ms: float

    @property
    def speedup(self) -> float:
        return self.float_ms / self.quantized_ms if self.quantized_ms > 0 else float("inf")


def compare_latency(float_model, quantized_model, feed: Mapping[str, np.ndarray], runs: int = 20) -> Latency:
    """Median latency of both models on one feed, interleaved in rounds so load hits both alike."""
    sessions = [
        create_session(m, "cpu", label=label) for m, label in ((float_model, "float"), (quantized_model, "QDQ"))
    ]
    medians: list[list[float]] = [[], []]
    for _ in range(3):
        for k, session in enumerate(sessions):
            medians[k].append(time_session(session, feed, warmup=2, runs=max(runs // 3, 1)).median_ms)
    return Latency(float(np.median(medians[0])), float(np.median(medians[1])))
