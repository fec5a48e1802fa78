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
from bnscope.onnxio.bn import is_batchnorm, training_mode
from bnscope.onnxio.nodes import default_opset
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
            "folded": sum(r.folded for r in self.layers),
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
        _check_folded(staged, loaded)
        verification: tuple[Verification, ...] = ()
        if settings.verify:
            verification = verify_fold(loaded, staged, settings)
        written = None
        if not settings.dry_run and all(v.passed for v in verification):
            written = str(_publish(staged, settings.output))
    bn_after = sum(is_batchnorm(n) for n in folded.graph.node)
    warnings = tuple(_nothing_folded(records, written)) + tuple(_quantisation_warnings(records))
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


def _check_folded(path: Path, original: model_io.LoadedModel) -> None:
    """The folded model must pass the full checker (strict shape inference included). When the input
    fails it too, the input is at fault (an input error naming the problem); otherwise the fold broke
    the model, a bnscope bug."""
    problem = _checker_problem(path)
    if problem is None:
        return
    given = _checker_problem(original.path)
    if given is None:
        raise RuntimeError(f"the folded model fails onnx.checker: {problem}")
    opset = default_opset(original.model)
    training = [n.name or n.output[0] for n in original.model.graph.node if is_batchnorm(n) and training_mode(n, opset)]
    hint = "fix or re-export the model (onnx.checker.check_model(path, full_check=True) shows every problem)"
    if training:
        hint = (
            f"{len(training)} BatchNormalization layer(s) are in training mode ({', '.join(training[:4])}"
            f"{', ...' if len(training) > 4 else ''}); bnscope recalibrate MODEL --data DATA -o OUT makes them "
            "inference BNs with statistics re-estimated on your data, which fold"
        )
    raise BnscopeError(f"{original.path}: onnx's checker rejects the model: {given}. Hint: {hint}")


def _checker_problem(path: Path) -> str | None:
    """The first line of what onnx's full check finds wrong with the model at ``path``, or None."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, or whatever a hostile file raises
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return lines[0] if lines else type(exc).__name__
    return None


def _publish(staged: Path, output: Path) -> Path:
    """Move the staged model (and its data file first) into place; each move is atomic."""
    data = staged.with_name(staged.name + ".data")
    if len(os.fsencode(data.name)) <= NAME_MAX and data.exists():  # a longer name cannot exist
        move_into_place(data, output.with_name(output.name + ".data"))
    return move_into_place(staged, output)


def _nothing_folded(records: list[FoldRecord], written: str | None):
    """A fold that removes nothing says so (stderr and the result's warnings): the output is the input."""
    if any(r.folded for r in records):
        return
    if records:
        what = f"nothing was folded: all {len(records)} BatchNormalization layer(s) were kept (each layer's reason says why)"
    else:
        what = "nothing was folded: the model has no BatchNormalization layer"
    if written:
        what += f"; {written} computes exactly what the input does"
    log.warning(what)
    yield what


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
