"""Stream calibration batches through an instrumented model and collect, per BN layer, float64
moments of the BN input (O(C) state per layer whatever the number of batches).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from bnscope import numerics
from bnscope.data.nonfinite import nonfinite_count, nonfinite_error
from bnscope.data.spec import (
    DataSource,
    input_specs,
    resolve_batch_size,
)
from bnscope.errors import BnscopeError
from bnscope.onnxio.bn import is_batchnorm
from bnscope.onnxio.external_data import TensorStore
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.model_io import LoadedModel
from bnscope.runtime.external import session_with_external_data
from bnscope.runtime.sessions import create_session
from bnscope.stats.accumulate import TapAccumulator
from bnscope.stats.instrument import instrument

log = logging.getLogger(__name__)


Progress = Callable[[int, int | None], None]
NONFINITE_WHY = "they would make every statistic they reach NaN"
NONFINITE_HINT = (
    "clean the data, or pass --allow-nonfinite to collect anyway (the layers they reach are reported broken)"
)


@dataclass
class BatchResult:
    """One batch's float64 count, mean and M2 per channel (all layers end to end, see
    :class:`TapAccumulator`), its sample count, and, when a statistic was not finite, the NaN/Inf
    values per input (found only then)."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    samples: int
    finite: bool = True
    nonfinite: dict[str, int] = field(default_factory=dict)


def batch_result(accumulator: TapAccumulator, outputs: dict[str, np.ndarray], batch) -> BatchResult:
    """The :class:`BatchResult` of the instrumented model's ``outputs`` on ``batch``."""
    count, mean, m2 = accumulator.batch(outputs)
    finite = accumulator.finite
    return BatchResult(count, mean, m2, _samples(batch), finite, {} if finite else nonfinite_count(batch))


# Runs a collector's batches elsewhere: (collector, source, shard) -> each batch's result, in batch order.
Runner = Callable[["Collector", DataSource, "tuple[int, int] | None"], Iterator[BatchResult]]


def _close(results) -> None:
    """Stops a runner's iterator early (a generator's cleanup runs now, not at garbage collection)."""
    close = getattr(results, "close", None)
    if close:
        close()


@dataclass(frozen=True)
class StatsOptions:
    """How to collect. Defaults: batches of 32, all data, eval mode, CPU, auto tap strategy."""

    batch_size: int | None = None  # None: the model's fixed batch size, else 32
    max_batches: int | None = None
    mode: str = "eval"
    provider: str = "cpu"
    allow_fallback: bool = False
    strategy: str = "auto"
    shard: tuple[int, int] | None = None
    threads: int | None = None
    allow_nonfinite: bool = False  # NaN/Inf in the data: an input error, or counted and reported


@dataclass
class LayerMoments:
    """Everything collected for one layer: mergeable across batches, runs and shards."""

    name: str
    moments: numerics.Moments
    spread: numerics.BatchSpread
    strategy: str

    def merge(self, other: LayerMoments) -> LayerMoments:
        return LayerMoments(
            self.name, self.moments.merge(other.moments), self.spread.merge(other.spread), self.strategy
        )


@dataclass
class CollectedMoments:
    layers: dict[str, LayerMoments]
    samples: int
    batches: int
    nonfinite_inputs: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

    def merge(self, other: CollectedMoments) -> CollectedMoments:
        """Both collections' moments, layer by layer (the same layers), and their counts summed."""
        layers = {name: moments.merge(other.layers[name]) for name, moments in self.layers.items()}
        return CollectedMoments(
            layers,
            self.samples + other.samples,
            self.batches + other.batches,
            self.nonfinite_inputs + other.nonfinite_inputs,
            {**self.skipped, **other.skipped},
        )


def collect_moments(
    loaded: LoadedModel,
    source: DataSource,
    options: StatsOptions = StatsOptions(),
    progress: Progress | None = None,
    view: GraphView | None = None,
    runner: Runner | None = None,
) -> CollectedMoments:
    """Run every batch through the instrumented model and merge per-layer moments in float64.

    ``runner`` runs the batches elsewhere (:mod:`bnscope.distributed`: a Ray cluster) and hands back
    each batch's :class:`BatchResult` in batch order; the merge here is the same either way.
    """
    return Collector(loaded, options, view, runner).collect(source, progress)


class Collector:
    """An instrumented model and its session, built once; :meth:`collect` streams data through it."""

    def __init__(
        self,
        loaded: LoadedModel,
        options: StatsOptions = StatsOptions(),
        view: GraphView | None = None,
        runner: Runner | None = None,
    ):
        self.options = _resolve_batch_size(options, loaded)
        view = view or GraphView(loaded.model, TensorStore(loaded))
        self.loaded, self.view, self.runner = loaded, view, runner
        self.instrumented, self.session = self._build("bn" if options.mode == "train" else "ops")

    def _build(self, train_ops: str):
        """The instrumented model and its session. Train mode first tries each BN in training mode
        (one fused kernel); a runtime that refuses it gets the standard ops (see stats.train_ops).
        With a runner, whose workers build their own sessions, a session is built here only to make
        that choice as one process would."""
        options, loaded = self.options, self.loaded
        instrumented = instrument(
            loaded.model, self.view, mode=options.mode, strategy=options.strategy, train_ops=train_ops
        )
        if not instrumented.taps or (self.runner is not None and train_ops != "bn"):
            return instrumented, None
        try:
            session = session_for(loaded, instrumented.model, options)
            return instrumented, None if self.runner is not None else session
        except BnscopeError as exc:
            if train_ops != "bn" or not _has_training_bn(instrumented.model):
                raise
            log.info("this runtime cannot run BatchNormalization in training mode (%s); using standard ops", exc)
            return self._build("ops")

    def collect(
        self, source: DataSource, progress: Progress | None = None, shard: tuple[int, int] | None = None
    ) -> CollectedMoments:
        """Stream the batches (of ``shard``, default the options' shard) through the session."""
        options, taps = self.options, self.instrumented.taps
        if shard is not None:
            options = replace(options, shard=shard)
        state = {
            t.layer: LayerMoments(
                t.layer, numerics.Moments.empty(t.channels), numerics.BatchSpread.empty(t.channels), t.strategy
            )
            for t in taps
        }
        result = CollectedMoments(state, 0, 0, skipped=dict(self.instrumented.skipped))
        if not taps:
            return result
        total = _batch_total(source, options)
        accumulator = TapAccumulator(self.instrumented)
        run = self.runner or Collector.batch_results
        results = run(self, source, options.shard)
        for batch in results:
            accumulator.add_batch(batch.count, batch.mean, batch.m2)
            if not batch.finite:  # only then were the inputs searched for NaN/Inf, and named
                error = nonfinite_error(source, batch.nonfinite, result.batches + 1, NONFINITE_WHY, NONFINITE_HINT)
                if error is not None and not options.allow_nonfinite:
                    raise error
                result.nonfinite_inputs += sum(batch.nonfinite.values())
            result.samples += batch.samples
            result.batches += 1
            if progress:
                progress(result.batches, total)
            if result.batches == 1 and self._far_off_centre(accumulator):  # known after one batch
                _close(results)
                return self._collect_exactly(source, progress, options.shard)
        if self._far_off_centre(accumulator):
            return self._collect_exactly(source, progress, options.shard)
        for name, (moments, spread) in accumulator.layer_moments().items():
            state[name].moments, state[name].spread = moments, spread
        return result

    def batch_results(self, source: DataSource, shard: tuple[int, int] | None = None) -> Iterator[BatchResult]:
        """Each batch's (of ``shard``) float64 moments, all layers end to end, in batch order (this
        process's session)."""
        names, options = self.instrumented.output_names, self.options
        accumulator = TapAccumulator(self.instrumented)
        for batch in source.batches(options.batch_size, options.max_batches, shard):
            yield batch_result(accumulator, dict(zip(names, self.session.run(batch, names))), batch)

    def _far_off_centre(self, accumulator: TapAccumulator) -> bool:
        """Whether auto tapped a BN output whose float32 moments lost precision (the data are far
        from its running statistics); logged by layer."""
        far = accumulator.far_off_centre() if self.options.strategy == "auto" else []
        if far:
            log.info("%s: data far from the running statistics; collecting with input_sums", ", ".join(far))
        return bool(far)

    def _collect_exactly(self, source: DataSource, progress: Progress | None, shard) -> CollectedMoments:
        """Collect from the start with input_sums taps, exact however far the data are."""
        exact = replace(self.options, strategy="input_sums")
        return Collector(self.loaded, exact, self.view, self.runner).collect(source, progress, shard)


def _has_training_bn(model: onnx.ModelProto) -> bool:
    return any(is_batchnorm(node) and len(node.output) > 1 for node in model.graph.node)


def _samples(batch) -> int:
    return len(next(iter(batch.values())))


def _resolve_batch_size(options: StatsOptions, loaded: LoadedModel) -> StatsOptions:
    return replace(options, batch_size=resolve_batch_size(options.batch_size, input_specs(loaded.model), 32))


def session_for(loaded: LoadedModel, model: onnx.ModelProto, options: StatsOptions):
    """A session for the instrumented copy. With external data, onnxruntime reads the data files where
    they are (see :mod:`bnscope.runtime.external`): nothing is written beside the model."""
    # Spinning workers (onnxruntime's default): the host's merge between runs is 0.4 ms a batch, and
    # putting the workers to sleep and waking them costs more (wide-BN benchmark: 1.56x plain a batch
    # spinning, 1.90x not; benchmarks/RESULTS.md).
    settings = {"allow_fallback": options.allow_fallback, "threads": options.threads, "spin": True}
    settings["label"] = str(loaded.path)
    if not loaded.has_external_data:
        return create_session(model, options.provider, **settings)
    return session_with_external_data(model, loaded.base_dir, options.provider, **settings)


def _batch_total(source: DataSource, options: StatsOptions) -> int | None:
    if source.samples is None or source.is_random and source.samples is None:
        return None
    total = -(-source.samples // options.batch_size)
    if options.max_batches is not None:
        total = min(total, options.max_batches)
    if options.shard:
        index, count = options.shard
        total = len(range(index, total, count))
    return total
