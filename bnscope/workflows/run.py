"""``run``: run a model on an execution provider, with no silent fallback, and time it."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from bnscope.errors import BnscopeError
from bnscope.onnxio import model_io
from bnscope.runtime.measure import (
    LatencyStats,
    OutputDiff,
    compare_outputs,
    merge_diffs,
    time_session,
)
from bnscope.runtime.placement import Placement
from bnscope.runtime.sessions import create_session
from bnscope.schema import SCHEMA_VERSION
from bnscope.workflows.options import DataChoice


# -- run ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunResult:
    model: str
    provider: str
    active_providers: tuple[str, ...]
    fell_back: bool
    latency: LatencyStats
    data: str
    compare_model: str | None = None
    compare_latency: LatencyStats | None = None
    differences: tuple[OutputDiff, ...] = ()
    placement: Placement = Placement(False, {}, note="not checked")
    compare_active_providers: tuple[str, ...] = ()
    compare_fell_back: bool = False
    compare_placement: Placement = Placement(False, {}, note="not checked")

    @property
    def passed(self) -> bool:
        return all(d.passed for d in self.differences)

    def to_dict(self) -> dict:
        d = {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "provider": self.provider,
            "active_providers": list(self.active_providers),
            "fell_back": self.fell_back,
            "data": self.data,
            "latency": dict(self.latency.__dict__),
            **_placement_dict(self.placement),
        }
        if self.compare_model:
            d["compare"] = {
                "model": self.compare_model,
                "active_providers": list(self.compare_active_providers),
                "fell_back": self.compare_fell_back,
                **_placement_dict(self.compare_placement),
                "latency": dict(self.compare_latency.__dict__),
                "latency_ratio": self.latency.median_ms / self.compare_latency.median_ms,
                "outputs": [o.to_dict(tolerances=False) for o in self.differences],
                "passed": self.passed,
            }
        return d


def _placement_dict(placement: Placement) -> dict:
    if not placement.checked:
        return {"placement": None, "cpu_nodes": None, "placement_note": placement.note}
    return {"placement": placement.counts, "cpu_nodes": [n.to_dict() for n in placement.cpu_nodes]}


def run_model(
    path: str | os.PathLike,
    *,
    provider: str = "cpu",
    data: DataChoice = DataChoice(),
    compare: str | None = None,
    warmup: int = 5,
    runs: int = 50,
    allow_fallback: bool = False,
    opt_level: str = "all",
    atol: float | None = None,
    rtol: float | None = None,
) -> RunResult:
    """Time a model on a provider; with ``compare``, also the other model and their output differences."""
    loaded = model_io.load_model(path)
    batches, source = data.batches(loaded.model)
    session = create_session(loaded.path, provider, opt_level=opt_level, allow_fallback=allow_fallback)
    latency = time_session(session, batches[0], warmup, runs)
    alone = RunResult(
        str(path),
        provider,
        tuple(session.active_providers),
        session.fell_back,
        latency,
        source.description,
        placement=session.placement,
    )
    if compare is None:
        return alone
    other_loaded = model_io.load_model(compare)
    other = create_session(other_loaded.path, provider, opt_level=opt_level, allow_fallback=allow_fallback)
    if other.input_names != session.input_names:
        raise BnscopeError(
            f"{compare} has inputs {other.input_names}, {path} has {session.input_names}. "
            "Hint: --compare needs two versions of the same model"
        )
    other_latency = time_session(other, batches[0], warmup, runs)
    diffs = merge_diffs(
        [
            compare_outputs(
                dict(zip(session.output_names, session.run(b))), dict(zip(other.output_names, other.run(b))), atol, rtol
            )
            for b in batches
        ]
    )
    return replace(
        alone,
        compare_model=str(compare),
        compare_latency=other_latency,
        differences=tuple(diffs),
        compare_active_providers=tuple(other.active_providers),
        compare_fell_back=other.fell_back,
        compare_placement=other.placement,
    )
