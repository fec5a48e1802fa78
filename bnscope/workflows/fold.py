"""``fold``: fold BN, verify the result numerically (see ``verify``), write it atomically.

The folded model is staged in a folder of the system temp folder (onnxruntime and the checker read
external-data and > 2 GB models by path), checked, verified, then moved into place (renamed, or
copied to a hidden ``.tmp`` beside the output and renamed): nothing else is written, and a killed
run leaves no file that looks like a finished output.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from bnscope.errors import BnscopeError
from bnscope.fold.rewrite import FoldRecord, fold_batchnorm
from bnscope.onnxio import model_io
from bnscope.onnxio.outputs import move_into_place, writing
from bnscope.schema import SCHEMA_VERSION
from bnscope.workflows.options import FoldSettings
from bnscope.workflows.outputs import NAME_MAX, check_run_outputs
from bnscope.workflows.verify import Verification, verify_fold

log = logging.getLogger(__name__)


GROWTH_WARNING = 10.0  # max|W'| / max|W| beyond this: per-tensor int8 loses resolution


IMBALANCE_WARNING = 100.0  # one channel's range over the median channel's


@dataclass(frozen=True)
class FoldResult:
    model: str
    output: str | None
    bn_before: int
    bn_after: int
    layers: tuple[FoldRecord, ...]
    verification: tuple[Verification, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verification)

    def to_dict(self) -> dict:
        first = self.verification[0].to_dict() if self.verification else None
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "output": self.output,
            "bn_before": self.bn_before,
            "bn_after": self.bn_after,
            "layers": [r.to_dict() for r in self.layers],
            "verification": first,
            "verification_by_provider": [v.to_dict() for v in self.verification],
            "warnings": list(self.warnings),
        }


def fold_model(path: str | os.PathLike | model_io.LoadedModel, settings: FoldSettings) -> FoldResult:
    """Fold, check, verify and (unless dry run or failed) write atomically. The CLI's one call.

    ``path`` may be a model already loaded (``check`` loads it once for all its rules).
    """
    given = path if isinstance(path, model_io.LoadedModel) else None
    path = given.path if given is not None else Path(path)
    _check_output(path, settings)
    loaded = given or model_io.load_model(path)
    with _Staging(loaded, settings) as staging:
        folded, records = fold_batchnorm(loaded.model, settings.options, staging.store)
        staged = staging.save(folded)
        _check_folded(staged)
        verification: tuple[Verification, ...] = ()
        if settings.verify:
            verification = verify_fold(loaded.path, staged, settings)
        written = None
        if not settings.dry_run and all(v.passed for v in verification):
            written = str(_publish(staged, settings.output))
    bn_after = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    warnings = tuple(_quantisation_warnings(records))
    return FoldResult(str(path), written, len(records), bn_after, tuple(records), verification, warnings)


def _check_output(path: Path, settings: FoldSettings) -> None:
    if settings.dry_run:
        return
    if settings.output is None:
        raise BnscopeError("no output path. Hint: pass -o OUT.onnx, or --dry-run to only report")
    if model_io.same_file(path, settings.output) and not settings.force:
        raise BnscopeError(f"refusing to overwrite the input model {path}. Hint: choose another -o, or pass --force")
    data = settings.data
    check_run_outputs(path, {"-o": settings.output}, data=data.path, loader=data.loader, model_writable=settings.force)


class _Staging:
    """A folder in the system temp folder for the folded model: onnxruntime and the checker read
    external-data and > 2 GB models by path. For external-data models the fold spills rewritten
    weights into it too, and the save copies untouched tensors byte for byte, so nothing of the
    model's data is held in memory or decoded that folding does not touch."""

    def __init__(self, loaded: model_io.LoadedModel, settings: FoldSettings):
        self.loaded, self.settings = loaded, settings
        self.dir = Path(tempfile.mkdtemp(prefix="bnscope-fold-"))
        spill = self.dir / "spill.data" if loaded.has_external_data else None
        self.store = model_io.TensorStore(loaded, spill_to=spill)

    def __enter__(self) -> _Staging:
        return self

    def save(self, folded: onnx.ModelProto) -> Path:
        name = self.settings.output.name if self.settings.output is not None else "folded.onnx"
        external = self.loaded.has_external_data or None
        with writing(self.dir / name, "the folded model to the temp folder"):
            return model_io.save_model(folded, self.dir / name, external=external, store=self.store)

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _check_folded(path: Path) -> None:
    """The folded model must pass the full checker; a failure here is a bnscope bug."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise RuntimeError(f"the folded model fails onnx.checker: {str(exc).splitlines()[0]}") from exc


def _publish(staged: Path, output: Path) -> Path:
    """Move the staged model (and its data file first) into place; each move is atomic."""
    data = staged.with_name(staged.name + ".data")
    if len(os.fsencode(data.name)) <= NAME_MAX and data.exists():  # a longer name cannot exist
        move_into_place(data, output.with_name(output.name + ".data"))
    return move_into_place(staged, output)


def _quantisation_warnings(records: list[FoldRecord]):
    for r in records:
        if r.weight_range_growth is not None and r.weight_range_growth > GROWTH_WARNING:
            yield (
                f"{r.name}: folding grew {r.target}'s weight range {r.weight_range_growth:.1f}x "
                "(per-tensor int8 quantisation loses resolution; check for tiny running variances)"
            )
        if r.channel_range_imbalance is not None and r.channel_range_imbalance > IMBALANCE_WARNING:
            yield (
                f"{r.name}: one output channel of {r.target} spans {r.channel_range_imbalance:.0f}x the median "
                "channel's range (use per-channel quantisation)"
            )
