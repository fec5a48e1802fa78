"""``fold`` and ``run``: fold BN, verify the result numerically, run models on execution providers.

Verification runs the original with optimisations OFF (onnxruntime folds Conv+BN itself at every
other level, which would hide a wrong fold) on CPU, and the folded model on CPU (also
unoptimised) and, when asked, on the deployment provider; every output is compared with
explicit tolerances (defaults by dtype, :func:`bnscope.runtime.measure.default_tolerances`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from bnscope.data.sources import open_source
from bnscope.data.spec import (
    DataSource,
    input_specs,
    model_batch_size,
    resolve_batch_size,
)
from bnscope.errors import BnscopeError
from bnscope.fold.plan import FoldOptions
from bnscope.fold.rewrite import FoldRecord, fold_batchnorm
from bnscope.onnxio import model_io
from bnscope.runtime.measure import (
    LatencyStats,
    OutputDiff,
    compare_outputs,
    time_session,
)
from bnscope.runtime.sessions import create_session
from bnscope.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)
GROWTH_WARNING = 10.0  # max|W'| / max|W| beyond this: per-tensor int8 loses resolution
IMBALANCE_WARNING = 100.0  # one channel's range over the median channel's


@dataclass(frozen=True)
class DataChoice:
    """Which inputs to feed: a path, a loader, or seeded random data (the default).

    ``batch_size`` None means the model's own batch size where it fixes one, else
    ``default_batch_size``; a batch size the model's fixed one contradicts is refused.
    """

    path: Path | None = None
    loader: str | None = None
    seed: int = 0
    batch_size: int | None = None
    max_batches: int = 4
    default_batch_size: int = 8

    def open(self, model: onnx.ModelProto) -> DataSource:
        random = self.path is None and self.loader is None
        return open_source(self.path, input_specs(model), random=random, loader=self.loader, seed=self.seed,
                           random_samples=self.batch_size_for(model) * self.max_batches)

    def batches(self, model: onnx.ModelProto) -> tuple[list[dict], DataSource]:
        """All verification batches in memory (a few), and their source for the report."""
        source = self.open(model)
        return list(source.batches(self.batch_size_for(model), self.max_batches)), source

    def batch_size_for(self, model: onnx.ModelProto) -> int:
        inputs = input_specs(model)
        size, fixed = resolve_batch_size(self.batch_size, inputs, self.default_batch_size), model_batch_size(inputs)
        if fixed is not None and size != fixed:
            raise BnscopeError(f"batch size {size} does not fit the model, which fixes its batch size to "
                               f"{fixed}. Hint: use batch size {fixed}, or leave it out")
        return size


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
            "passed": self.passed, "provider": self.provider, "active_providers": list(self.active_providers),
            "data": self.data, "batches": self.batches,
            "outputs": [o.to_dict() for o in self.outputs],
        }


@dataclass(frozen=True)
class FoldSettings:
    output: Path | None
    options: FoldOptions = FoldOptions()
    verify: bool = True
    dry_run: bool = False
    force: bool = False
    data: DataChoice = DataChoice()
    atol: float | None = None
    rtol: float | None = None
    providers: tuple[str, ...] = ("cpu",)
    allow_fallback: bool = False


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
            "schema_version": SCHEMA_VERSION, "model": self.model, "output": self.output,
            "bn_before": self.bn_before, "bn_after": self.bn_after,
            "layers": [r.to_dict() for r in self.layers],
            "verification": first,
            "verification_by_provider": [v.to_dict() for v in self.verification],
            "warnings": list(self.warnings),
        }


def fold_model(path: str | os.PathLike, settings: FoldSettings) -> FoldResult:
    """Fold, check, verify and (unless dry run or failed) write atomically. The CLI's one call."""
    path = Path(path)
    _check_output(path, settings)
    loaded = model_io.load_model(path)
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


class _Staging:
    """A temp folder beside the output for the folded model: onnxruntime and the checker read
    external-data and > 2 GB models by path. For external-data models the fold spills rewritten
    weights into it too, and the save copies untouched tensors byte for byte, so nothing of the
    model's data is held in memory or decoded that folding does not touch."""

    def __init__(self, loaded: model_io.LoadedModel, settings: FoldSettings):
        self.loaded, self.settings = loaded, settings
        folder = settings.output.parent if settings.output is not None else loaded.path.parent
        self.dir = Path(tempfile.mkdtemp(prefix=".bnscope-", dir=folder if os.access(folder, os.W_OK) else None))
        spill = self.dir / "spill.data" if loaded.has_external_data else None
        self.store = model_io.TensorStore(loaded, spill_to=spill)

    def __enter__(self) -> _Staging:
        return self

    def save(self, folded: onnx.ModelProto) -> Path:
        name = self.settings.output.name if self.settings.output is not None else "folded.onnx"
        external = self.loaded.has_external_data or None
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
    """Move the staged model (and its data file) into place; each rename is atomic."""
    output.parent.mkdir(parents=True, exist_ok=True)
    data = staged.with_name(staged.name + ".data")
    if data.exists():
        os.replace(data, output.with_name(output.name + ".data"))
    os.replace(staged, output)
    return output


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
        diffs = _merge_diffs([compare_outputs(g, e, settings.atol, settings.rtol) for g, e in zip(got, expected)])
        results.append(Verification(all(d.passed for d in diffs), provider, tuple(session.active_providers),
                                    source.description, len(batches), tuple(diffs)))
    return tuple(results)


def _reference_outputs(reference, batch) -> dict:
    """The original's outputs; when the original itself cannot run, the fold cannot be verified."""
    try:
        return dict(zip(reference.output_names, reference.run(batch)))
    except BnscopeError as exc:
        what = str(exc).split(". Hint:")[0]
        raise BnscopeError(f"the original model fails in onnxruntime, so the fold cannot be verified: {what}. "
                           "Hint: check the original with `bnscope run MODEL`, give inputs it accepts with "
                           "--data, or pass --no-verify to write the fold unverified") from exc


def _merge_diffs(per_batch: list[list[OutputDiff]]) -> list[OutputDiff]:
    """Worst case over batches, per output."""
    merged = []
    for diffs in zip(*per_batch):
        worst = max(diffs, key=lambda d: (not d.passed, d.max_abs))
        merged.append(OutputDiff(**{**worst.__dict__, "max_abs": max(d.max_abs for d in diffs),
                                    "max_rel": max(d.max_rel for d in diffs),
                                    "passed": all(d.passed for d in diffs)}))
    return merged


def _quantisation_warnings(records: list[FoldRecord]):
    for r in records:
        if r.weight_range_growth is not None and r.weight_range_growth > GROWTH_WARNING:
            yield (f"{r.name}: folding grew {r.target}'s weight range {r.weight_range_growth:.1f}x "
                   "(per-tensor int8 quantisation loses resolution; check for tiny running variances)")
        if r.channel_range_imbalance is not None and r.channel_range_imbalance > IMBALANCE_WARNING:
            yield (f"{r.name}: one output channel of {r.target} spans {r.channel_range_imbalance:.0f}x the median "
                   "channel's range (use per-channel quantisation)")


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

    @property
    def passed(self) -> bool:
        return all(d.passed for d in self.differences)

    def to_dict(self) -> dict:
        d = {
            "schema_version": SCHEMA_VERSION, "model": self.model, "provider": self.provider,
            "active_providers": list(self.active_providers), "fell_back": self.fell_back,
            "data": self.data, "latency": dict(self.latency.__dict__),
        }
        if self.compare_model:
            d["compare"] = {
                "model": self.compare_model, "latency": dict(self.compare_latency.__dict__),
                "latency_ratio": self.latency.median_ms / self.compare_latency.median_ms,
                "outputs": [o.to_dict(tolerances=False) for o in self.differences],
                "passed": self.passed,
            }
        return d


def run_model(
    path: str | os.PathLike, *, provider: str = "cpu", data: DataChoice = DataChoice(), compare: str | None = None,
    warmup: int = 5, runs: int = 50, allow_fallback: bool = False, opt_level: str = "all",
    atol: float | None = None, rtol: float | None = None,
) -> RunResult:
    """Time a model on a provider; with ``compare``, also the other model and their output differences."""
    loaded = model_io.load_model(path)
    batches, source = data.batches(loaded.model)
    session = create_session(loaded.path, provider, opt_level=opt_level, allow_fallback=allow_fallback)
    latency = time_session(session, batches[0], warmup, runs)
    if compare is None:
        return RunResult(str(path), provider, tuple(session.active_providers), session.fell_back, latency,
                         source.description)
    other_loaded = model_io.load_model(compare)
    other = create_session(other_loaded.path, provider, opt_level=opt_level, allow_fallback=allow_fallback)
    if other.input_names != session.input_names:
        raise BnscopeError(f"{compare} has inputs {other.input_names}, {path} has {session.input_names}. "
                           "Hint: --compare needs two versions of the same model")
    other_latency = time_session(other, batches[0], warmup, runs)
    diffs = _merge_diffs([
        compare_outputs(dict(zip(session.output_names, session.run(b))),
                        dict(zip(other.output_names, other.run(b))), atol, rtol) for b in batches
    ])
    return RunResult(str(path), provider, tuple(session.active_providers), session.fell_back, latency,
                     source.description, str(compare), other_latency, tuple(diffs))
