"""Numerical verification of a fold, judged against the original's own float floor.

The original runs with optimisations OFF (onnxruntime folds Conv+BN itself at every other level,
which would hide a wrong fold) on CPU, and the folded model on CPU (also unoptimised) and, when
asked, on the deployment provider. The original also runs ``SEEDS`` times with its weights nudged
by one unit in the last place (:mod:`bnscope.runtime.floor`): each output passes within
``FLOOR_MULTIPLE`` times that floor, or within explicit ``atol``/``rtol`` when given. The inputs
are the calibration data when given, else seeded random data, which the report calls a poor witness.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bnscope.errors import BnscopeError
from bnscope.numerics.compare import FLOOR_MULTIPLE
from bnscope.onnxio.external_data import TensorStore
from bnscope.onnxio.model_io import LoadedModel
from bnscope.runtime.floor import SEEDS, float_weights, judge_outputs, measure_floor
from bnscope.runtime.measure import OutputDiff
from bnscope.runtime.sessions import create_session
from bnscope.workflows.options import FoldSettings

RANDOM_WITNESS = (
    "verified on random inputs, a poor witness: they can drive a network into saturation (or leave "
    "it nowhere near its real operating range); pass --data with real samples"
)


@dataclass(frozen=True)
class Verification:
    passed: bool
    provider: str
    active_providers: tuple[str, ...]
    data: str
    batches: int
    outputs: tuple[OutputDiff, ...]
    floor_seconds: float = 0.0
    floor_seeds: int = 0
    note: str | None = None

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "provider": self.provider,
            "active_providers": list(self.active_providers),
            "data": self.data,
            "batches": self.batches,
            "outputs": [o.to_dict() for o in self.outputs],
            "floor": {"seeds": self.floor_seeds, "multiple": FLOOR_MULTIPLE, "seconds": self.floor_seconds},
            "note": self.note,
        }


def verify_fold(original: LoadedModel, folded: Path, settings: FoldSettings) -> tuple[Verification, ...]:
    """Compare folded vs original on the same inputs, per requested provider."""
    batches, source = settings.data.batches(original.model)
    reference = create_session(original.path, "cpu", opt_level="disable")
    expected = [_reference_outputs(reference, b) for b in batches]
    start = time.perf_counter()
    weights = float_weights(original.model, TensorStore(original).to_array)
    floors = measure_floor(str(original.path), weights, batches, expected)
    seconds, seeds = time.perf_counter() - start, (SEEDS if floors is not None else 0)
    del weights
    note = RANDOM_WITNESS if source.is_random else None
    results = []
    for provider in settings.providers:
        level = "disable" if provider == "cpu" else "all"
        session = create_session(folded, provider, opt_level=level, allow_fallback=settings.allow_fallback)
        got = [dict(zip(session.output_names, session.run(b))) for b in batches]
        other = provider != "cpu"
        diffs = judge_outputs(got, expected, floors, settings.atol, settings.rtol, other_kernels=other)
        results.append(
            Verification(
                all(d.passed for d in diffs),
                provider,
                tuple(session.active_providers),
                source.description,
                len(batches),
                tuple(diffs),
                seconds,
                seeds,
                note,
            )
        )
    return tuple(results)


def _reference_outputs(reference, batch) -> dict:
    """The original's outputs; when the original itself cannot run, the fold cannot be verified."""
    try:
        return dict(zip(reference.output_names, reference.run(batch)))
    except BnscopeError as exc:
        what = str(exc).split(". Hint:")[0]
        raise BnscopeError(
            f"the original model fails in onnxruntime, so the fold cannot be verified: {what}. "
            "Hint: check the original with `bnscope run MODEL`, give inputs it accepts with "
            "--data, or pass --no-verify to write the fold unverified"
        ) from exc
