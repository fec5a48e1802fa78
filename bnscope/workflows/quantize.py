"""``quantize``: fold, predict each layer's int8 risk from its BN, search the fewest 16-bit tensors
that reach a target SQNR, write onnxruntime's standard QDQ model, and measure it.

Steps, all in a staging folder of the system temp folder (nothing is written beside the output
until the end, when the QDQ model is moved into place atomically):

1. bnscope's verified fold (:func:`bnscope.workflows.fold.fold_model`);
2. Constant-node weights to initializers, opset 13+ (:mod:`bnscope.quant.prepare`);
3. exact cross-layer equalisation (:mod:`bnscope.quant.equalize`), checked on the data: the float
   outputs must stay within the fold tolerance, else it is dropped with a warning;
4. the data-free risk per folded layer (:mod:`bnscope.quant.risk`);
5. onnxruntime calibration once (MinMax) on the calibration part of ``--data``; the range of a tensor
   read only by a HardSwish starts at the knee (:mod:`bnscope.quant.knee`, exact); then the search
   (:mod:`bnscope.quant.plan`) measured on the held-out part: units are single activation tensors,
   ordered by the simulated output SQNR with each alone at 8 bits;
6. the chosen plan quantised and measured on ``--eval-data`` (default: the held-out part).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from bnscope.data.choice import DataChoice
from bnscope.data.sources import open_source
from bnscope.data.spec import input_specs, model_batch_size
from bnscope.errors import BnscopeError
from bnscope.numerics import quantmath as qm
from bnscope.onnxio import model_io
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.outputs import move_into_place
from bnscope.quant import measure as qmeasure
from bnscope.quant.equalize import equalize
from bnscope.quant.knee import knee_ranges
from bnscope.quant.ort_quant import Quantizer, activation_bits
from bnscope.quant.plan import prune, search, tensors_of
from bnscope.quant.prepare import prepare_for_quantization
from bnscope.quant.risk import (
    BnStats,
    chain_damage_db,
    knee_steps,
    predict_layer,
    risk_order,
    spearman_predicted_measured,
)
from bnscope.quant.simulate import Simulator
from bnscope.runtime.measure import compare_outputs
from bnscope.workflows.fold import fold_model
from bnscope.workflows.options import FoldSettings
from bnscope.workflows.outputs import check_run_outputs, refuse_overwrite
from bnscope.workflows.quantize_result import QuantizeResult

log = logging.getLogger(__name__)

DEFAULT_TARGET_DB = 18.0
MEASURE_BATCHES = 12  # held-out batches (at most) the search and the per-layer measurement run on
SCAN_BATCHES = 1  # held-out batches each tensor's damage alone is measured on
SIMULATION_MARGIN_DB = 1.0  # the simulated plan must clear the target by this much (held-out vs other data)


@dataclass(frozen=True)
class QuantizeSettings:
    """``data`` is the calibration data: a :class:`DataChoice` with a path (the CLI's one choice), or the
    older loose form, a path with ``batch_size`` (folded into the choice; afterwards both say the same)."""

    output: Path
    data: DataChoice | str | os.PathLike
    eval_data: Path | None = None
    target_sqnr_db: float = DEFAULT_TARGET_DB
    per_channel: bool = True
    equalize: bool = True
    holdout: float = 0.25
    batch_size: int | None = None
    force: bool = False
    latency: bool = True

    def __post_init__(self) -> None:
        choice = DataChoice.of(self.data)
        if choice.random or choice.loader is not None:
            option = "--random" if choice.random else "--loader"
            raise BnscopeError(f"quantize does not take {option}. Hint: give the calibration samples as --data PATH")
        if choice.path is None:
            raise BnscopeError("quantize needs calibration data. Hint: give --data PATH")
        if self.batch_size is not None and choice.batch_size not in (None, self.batch_size):
            raise BnscopeError(
                f"batch size {self.batch_size} and a DataChoice with batch size {choice.batch_size} given. "
                "Hint: put the batch size in the DataChoice"
            )
        if self.batch_size is not None:
            choice = replace(choice, batch_size=self.batch_size)
        object.__setattr__(self, "data", choice)
        object.__setattr__(self, "batch_size", choice.batch_size)


def quantize_model(path: str | Path, settings: QuantizeSettings, progress: Callable[[str], None] | None = None):
    """The CLI's one call. Returns a :class:`QuantizeResult`."""
    say = progress or (lambda text: log.info(text))
    path = Path(path)
    _check_settings(path, settings)
    loaded = model_io.load_model(path)
    _check_float32(loaded.model, path)
    stage = Path(tempfile.mkdtemp(prefix="bnscope-quantize-"))
    try:
        return _run(loaded, settings, stage, say)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _check_float32(model: onnx.ModelProto, path: Path) -> None:
    """onnxruntime's quantiser takes float32 activations: a float16/bfloat16 input would fail later as
    "cannot load the int8 simulation", blaming a valid model."""
    low = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}
    for value in model.graph.input:
        kind = low.get(value.type.tensor_type.elem_type)
        if kind:
            raise BnscopeError(
                f"{path}: input {value.name!r} is {kind}; quantize starts from a float32 model (onnxruntime's "
                "quantiser calibrates float32 activations). Hint: quantize the float32 model it came from"
            )


class _NothingFoldedFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("nothing was folded")


def _check_settings(path: Path, settings: QuantizeSettings) -> None:
    if not 0 < settings.holdout < 1:
        raise BnscopeError(f"--holdout {settings.holdout} is not between 0 and 1. Hint: use e.g. 0.25")
    if not math.isfinite(settings.target_sqnr_db):
        raise BnscopeError("--target-sqnr must be a finite number of dB. Hint: use e.g. 18")
    refuse_overwrite(path, settings.output, settings.force, hint="choose another -o")
    for option, data in (("--data", settings.data.path), ("--eval-data", settings.eval_data)):
        if data is not None and not Path(data).exists():
            raise BnscopeError(f"{option} {data} does not exist. Hint: check the data path")
    check_run_outputs(
        path, {"-o": settings.output}, data=settings.data.path, others={"--eval-data": settings.eval_data}
    )


def _run(loaded: model_io.LoadedModel, settings: QuantizeSettings, stage: Path, say) -> QuantizeResult:
    say("folding BatchNormalization (verified)")
    fold_log, hide = logging.getLogger(fold_model.__module__), _NothingFoldedFilter()
    fold_log.addFilter(hide)  # fold's warning names the hidden stage file: said below in quantize's words
    try:
        fold = fold_model(loaded, FoldSettings(output=stage / "folded.onnx", force=True))
    finally:
        fold_log.removeFilter(hide)
    for warning in fold.warnings:
        if warning.startswith("nothing was folded"):
            log.warning("%s; quantising the model as it is", warning.split(";")[0])
    if not fold.passed:
        raise BnscopeError("the folded model does not match the original. Hint: run 'bnscope fold' to see why")
    prepared = prepare_for_quantization(onnx.load(str(stage / "folded.onnx")), str(loaded.path))
    calib, holdout, evaluation, descriptions = _feeds(prepared, settings)
    warnings: list[str] = []
    pairs: list = []
    if settings.equalize:
        equalized, pairs = equalize(prepared)
        if pairs and _equal_outputs(equalized, prepared, holdout[0]):
            prepared = equalized
        elif pairs:
            warnings.append("cross-layer equalisation changed the float outputs beyond tolerance; left out")
            pairs = []
    float_path = stage / "float.onnx"
    onnx.save(prepared, str(float_path))
    view = GraphView(prepared)
    layers = _predict(loaded.model, fold.layers, view)
    say(f"calibrating on {descriptions[0]} and quantising to int8")
    quantizer = Quantizer(float_path, calib, stage, per_channel=settings.per_channel)
    first = quantizer.quantize(stage / "try.onnx")
    activations = activation_bits(onnx.load(str(first))).int8
    calibrated = quantizer.calibrated_ranges()
    knees = knee_ranges(prepared, calibrated)  # exact: HardSwish maps everything below its knee to 0
    ranges = {**calibrated, **knees}
    measuring = holdout[:MEASURE_BATCHES]
    names, reference = qmeasure.run_all(float_path, measuring, "the float model")
    simulator = Simulator(prepared, ranges, activations, measuring, reference, settings.per_channel)
    say(f"measuring each layer's damage ({len(layers)} layers)")
    layers = _measure_layers(prepared, view, layers, measuring, calibrated, simulator)
    units = _units(simulator, activations, say)
    everything = set(activations)

    def simulated(tensors: list[str]) -> float:
        sqnr = simulator.sqnr_db(everything - set(tensors))
        say(f"  {len(tensors)} tensors at 16 bits: {sqnr:.2f} dB (simulated, held-out data)")
        return sqnr

    say(f"searching the fewest 16-bit tensors for {settings.target_sqnr_db:g} dB ({len(units)} candidates)")
    goal = settings.target_sqnr_db + SIMULATION_MARGIN_DB
    found = search(units, simulated, goal)
    chosen, pruned = tensors_of(units, found.chosen), []
    if found.reached:  # hand back whole units (a chain's tensors together) wherever the goal still holds
        kept, pruned = prune(units[: found.chosen], simulated, goal)
        chosen = tensors_of(kept, len(kept))
    say(f"quantising with {len(chosen)} tensors at 16 bits")
    final = quantizer.quantize(stage / "quantized.onnx", chosen, knees)
    bits = activation_bits(onnx.load(str(final)))
    say(f"evaluating on {descriptions[1]}")
    if evaluation is holdout:  # the float outputs on its first MEASURE_BATCHES batches are known already
        rest = holdout[len(measuring) :]
        reference = reference + (qmeasure.run_all(float_path, rest, "the float model")[1] if rest else [])
    else:
        names, reference = qmeasure.run_all(float_path, evaluation, "the float model")
    outputs = qmeasure.output_sqnr(names, reference, qmeasure.run_all(final, evaluation, "the QDQ model")[1])
    latency = qmeasure.compare_latency(float_path, final, evaluation[0]) if settings.latency else None
    written = move_into_place(final, settings.output)
    return QuantizeResult(
        model=str(loaded.path),
        output=str(written),
        target_sqnr_db=settings.target_sqnr_db,
        per_channel=settings.per_channel,
        calibration=descriptions[0],
        evaluation=descriptions[1],
        sqnr_db=qmeasure.mean_sqnr(outputs),
        outputs=tuple(outputs),
        int8=bits.int8,
        int16=bits.int16,
        layers=tuple(layers),
        rank_correlation=spearman_predicted_measured(layers),
        rank_correlation_output=spearman_predicted_measured(layers, "measured_output_sqnr_db"),
        equalized=tuple(pairs),
        steps=(*found.steps, *pruned),
        reached=found.reached and qmeasure.mean_sqnr(outputs) >= settings.target_sqnr_db,
        latency=latency,
        folded=sum(r.folded for r in fold.layers),
        warnings=tuple(warnings),
    )


def _feeds(model: onnx.ModelProto, settings: QuantizeSettings):
    """(calibration, held-out, evaluation) feed lists and the descriptions of calibration and evaluation."""
    inputs = input_specs(model)
    choice = settings.data
    size = choice.batch_size or model_batch_size(inputs) or 1
    source = open_source(choice.path, inputs)
    batches = list(source.batches(size, choice.max_batches))
    if len(batches) < 2:
        raise BnscopeError(
            f"{source.description} gives {len(batches)} batch of {size}; quantize needs at least 2 (one to "
            "calibrate, one held out). Hint: give more samples, or a smaller --batch-size"
        )
    held = max(1, round(len(batches) * settings.holdout))
    calib, holdout = batches[:-held], batches[-held:]
    calib_text = f"{source.description}, {len(calib)} batches of {size}"
    if settings.eval_data is None:
        return calib, holdout, holdout, (calib_text, f"the held-out {len(holdout)} batches of {source.description}")
    other = open_source(settings.eval_data, inputs)
    return calib, holdout, list(other.batches(size)), (calib_text, other.description)


def _equal_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feed) -> bool:
    names, got = qmeasure.run_all(a, [feed], "the equalised model")
    _, ref = qmeasure.run_all(b, [feed], "the folded model")
    diffs = compare_outputs(dict(zip(names, got[0])), dict(zip(names, ref[0])))
    return all(d.passed for d in diffs)


def _predict(original: onnx.ModelProto, records, view: GraphView) -> list:
    """The data-free risk of every BN folded into the Conv before it, riskiest first."""
    source = GraphView(original)
    by_name = {view.node_name(i): i for i in range(len(view.nodes))}
    layers = []
    for record in records:
        conv = by_name.get(record.target or "")
        if not record.folded or record.direction != "into_previous" or conv is None:
            continue
        if view.nodes[conv].op_type != "Conv":
            continue
        bn = source.nodes[source.index_of(record.name)]
        gamma, beta = (source.constant(bn.input[i]) for i in (1, 2))
        if gamma is None or beta is None:
            continue
        stats = BnStats(np.asarray(gamma.value, np.float64).ravel(), np.asarray(beta.value, np.float64).ravel())
        layers.append(predict_layer(view, conv, record.name, stats))
    return risk_order(layers)


def _measure_layers(model, view: GraphView, layers: list, feeds, ranges, simulator: Simulator) -> list:
    """Measured range, knee steps, local damage, output damage (this layer's chain alone at 8 bits, the
    rest float, on one held-out batch) and int32 bias overflow per layer."""
    starts: dict[str, list[np.ndarray]] = {}
    qmeasure.collect(model, [r.chain.start for r in layers], feeds, lambda n, v: starts.setdefault(n, []).append(v))
    measured = []
    for r in layers:
        values = np.concatenate([v.reshape(v.shape[0], v.shape[1], -1) for v in starts[r.chain.start]], axis=2)
        known = r.chain.start in ranges
        start_range = ranges[r.chain.start] if known else (float(values.min()), float(values.max()))
        damage = chain_damage_db(view, r.chain, values[..., None], ranges)
        measured.append(
            replace(
                r,
                measured_range=start_range,
                measured_knee_steps=knee_steps(r.chain, start_range),
                measured_sqnr_db=damage,
                measured_output_sqnr_db=simulator.sqnr_db(set(r.chain.tensors), feeds=1),
                bias_overflow=_bias_overflow(view, r.conv, ranges),
            )
        )
    return measured


def _bias_overflow(view: GraphView, conv_name: str, ranges) -> int | None:
    conv = view.nodes[view.index_of(conv_name)]
    if len(conv.input) < 3 or not conv.input[2] or conv.input[0] not in ranges:
        return None
    weight, bias = view.constant(conv.input[1]), view.constant(conv.input[2])
    if weight is None or bias is None:
        return None
    scale = qm.activation_scale(*ranges[conv.input[0]])
    return qm.bias_overflows(bias.value, scale, qm.weight_scales(weight.value, per_channel=True))


def _units(simulator: Simulator, activations: tuple[str, ...], say) -> list[tuple[str, ...]]:
    """Every activation tensor alone, by the simulated output SQNR with only that tensor at 8 bits (the
    rest float) on ``SCAN_BATCHES`` held-out batches, lowest first. Neither the BN prediction nor a
    tensor's own SQNR finds PicoDet's worst tensors: a Concat whose channels span 0.5 to 53 keeps
    its own SQNR high (the wide channels dominate it) while its narrow channels are wiped out."""
    say(f"measuring each activation tensor's damage alone ({len(activations)} tensors)")
    alone = {t: simulator.sqnr_db({t}, feeds=SCAN_BATCHES) for t in activations}
    return [(t,) for t in sorted(activations, key=lambda t: (alone[t], t))]
