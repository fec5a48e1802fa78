"""Numerical verification of a fold.

The original runs with optimisations OFF (onnxruntime folds Conv+BN itself at every other level,
which would hide a wrong fold) on CPU, and the folded model on CPU (also unoptimised) and, when
asked, on the deployment provider; every output is compared with explicit tolerances (defaults
by dtype, :func:`bnscope.runtime.measure.default_tolerances`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from bnscope.errors import BnscopeError
from bnscope.runtime.measure import (
    OutputDiff,
    compare_outputs,
)
from bnscope.runtime.sessions import create_session
from bnscope.workflows.options import FoldSettings


@dataclass(frozen=True)
class Verification:
    passed: bool
    provider: str
    active_providers: tuple[str, ...]
    data: str
    batches: int
    outputs: tuple[OutputDiff, ...]

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "provider": self.provider,
            "active_providers": list(self.active_providers),
            "data": self.data,
            "batches": self.batches,
            "outputs": [o.to_dict() for o in self.outputs],
        }


def verify_fold(original: Path, folded: Path, settings: FoldSettings) -> tuple[Verification, ...]:
    """Compare folded vs original on the same inputs, per requested provider."""
    model = onnx.load(str(original), load_external_data=False)
    batches, source = settings.data.batches(model)
    reference = create_session(original, "cpu", opt_level="disable")
    expected = [_reference_outputs(reference, b) for b in batches]
    results = []
    for provider in settings.providers:
        level = "disable" if provider == "cpu" else "all"
        session = create_session(folded, provider, opt_level=level, allow_fallback=settings.allow_fallback)
        got = [dict(zip(session.output_names, session.run(b))) for b in batches]
        diffs = merge_diffs([compare_outputs(g, e, settings.atol, settings.rtol) for g, e in zip(got, expected)])
        results.append(
            Verification(
                all(d.passed for d in diffs),
                provider,
                tuple(session.active_providers),
                source.description,
                len(batches),
                tuple(diffs),
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


def merge_diffs(per_batch: list[list[OutputDiff]]) -> list[OutputDiff]:
    """Worst case over batches, per output."""
    merged = []
    for diffs in zip(*per_batch):
        worst = max(diffs, key=lambda d: (not d.passed, d.max_abs))
        merged.append(
            OutputDiff(
                **{
                    **worst.__dict__,
                    "max_abs": max(d.max_abs for d in diffs),
                    "max_rel": max(d.max_rel for d in diffs),
                    "passed": all(d.passed for d in diffs),
                }
            )
        )
    return merged
