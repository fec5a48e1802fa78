"""bnscope's statistics collector against plain inference and the naive approaches, same run.

    python benchmarks/bench_stats.py                    # full run (several minutes on 2 cores)
    python benchmarks/bench_stats.py --quick            # short run
    python benchmarks/bench_stats.py --provider cuda    # on a GPU (onnxruntime-gpu)
    python benchmarks/bench_stats.py --before main      # also the collector as of git ref main
    python benchmarks/bench_stats.py --parts graphs,wide,cli,memory

Candidates (see bench_stats_baselines.py for plain / calibrator / ingraph-reducemean) plus
bnscope's own collection loop (:func:`bnscope.stats.collect.collect_moments`: instrumented model,
validation of every batch, float64 Chan merge on the host) with each tap strategy:
``auto`` (what bnscope uses), ``input_sums`` and ``output_pool``. Every bnscope candidate's
moments are checked against the calibrator's float64 reference before timing.

Two diagnostics, not collectors, to split the cost:

* ``bnscope-runtime-only``: onnxruntime's ``run`` of bnscope's instrumented model (``auto``)
  with the benchmark's own session settings and no host merge: what the graph costs.
* ``floor-gap-y``: one GlobalAveragePool of every BN output and nothing else (means only, no
  variance): the cheapest tap there is on a BN tensor with standard ops. Any collector that reads
  the BN tensors costs at least this, because the extra consumer is what stops onnxruntime fusing
  the activation into the (NCHWc) Conv.
* ``floor-gap-y-y2``: the same plus GlobalAveragePool(y * y): the cheapest mean and variance found
  (GlobalLpPool, ReduceSumSquare and Einsum measured slower on MobileNet).
* ``bnscope-host-only``: bnscope's collection loop with the session replaced by a replay of the
  instrumented model's recorded outputs: what the host costs per batch.

Then (:mod:`benchmarks.bench_stats_startup`) the wide-BN model in-process and the command as a user
runs it, start-up included, each against a plain onnxruntime run of the same data.

Then memory: peak RSS of ``collect_moments`` over 10 and 1000 batches (same batch repeated,
so data memory is constant), each in a fresh process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
from onnx import helper

from benchmarks import bench_stats_baselines as baselines
from benchmarks import bench_stats_startup as startup
from benchmarks import common, models
from bnscope.data.spec import DataSource, input_specs
from bnscope.onnxio.model_io import LoadedModel
from bnscope.stats.collect import Collector, StatsOptions, collect_moments

PROVIDER = "cpu"


class MemorySource(DataSource):
    """In-memory batches as a bnscope DataSource (the benchmark feeds the same arrays to all)."""

    def __init__(self, model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]], repeat: int = 1):
        n = sum(len(next(iter(b.values()))) for b in batches) * repeat
        super().__init__(f"{len(batches) * repeat} in-memory batches", n, False, input_specs(model))
        self._arrays, self._repeat = list(batches), repeat

    def _plan(self, batch_size: int):
        for _ in range(self._repeat):
            for batch in self._arrays:
                yield lambda b=batch: b


def bnscope_factory(strategy: str):
    """bnscope's own loop (:class:`bnscope.stats.collect.Collector`): instrumented model and session built
    once, as a real run does; the timed call streams the batches (validation, run, float64 merge)."""

    def factory(model: onnx.ModelProto, batches, **_):
        size = len(next(iter(batches[0].values())))
        options = StatsOptions(batch_size=size, strategy=strategy, threads=baselines.THREADS, provider=PROVIDER)
        collector = Collector(LoadedModel(model, Path("bench.onnx")), options)
        source = MemorySource(model, batches)

        def call() -> dict:
            collected = collector.collect(source)
            return {name: (lm.moments.mean, lm.moments.variance()) for name, lm in collected.layers.items()}

        return call

    return factory


def runtime_only_factory(model: onnx.ModelProto, batches, **_):
    """onnxruntime alone on bnscope's instrumented model: the graph's cost without the host."""
    collector = Collector(LoadedModel(model, Path("bench.onnx")), StatsOptions(batch_size=baselines.BATCH))
    session = common.make_session(
        collector.instrumented.model, baselines.OPT_LEVEL, baselines.THREADS, providers=baselines.PROVIDERS
    )
    names = collector.instrumented.output_names
    return lambda: common.run_all(session, batches, names)


class _Replay:
    """Stands in for the statistics session: hands back recorded outputs, batch after batch."""

    def __init__(self, recorded: list):
        self.recorded, self.k = recorded, 0

    def run(self, feeds, names):
        outputs = self.recorded[self.k % len(self.recorded)]
        self.k += 1
        return outputs


def host_only_factory(model: onnx.ModelProto, batches, **_):
    """bnscope's loop (auto) with the runtime replaced by its recorded outputs: the host's cost."""
    options = StatsOptions(batch_size=baselines.BATCH, threads=baselines.THREADS, provider=PROVIDER)
    collector = Collector(LoadedModel(model, Path("bench.onnx")), options)
    names = collector.instrumented.output_names
    collector.session = _Replay([collector.session.run(b, names) for b in batches])
    source = MemorySource(model, batches)
    return lambda: collector.collect(source)


def before_factory(model: onnx.ModelProto, batches, **_):
    """The collector as of ``--before`` (auto), built once like bnscope-auto."""
    from bnscope_before.onnxio.model_io import LoadedModel as LoadedBefore
    from bnscope_before.stats.collect import Collector as CollectorBefore
    from bnscope_before.stats.collect import StatsOptions as OptionsBefore

    options = OptionsBefore(batch_size=baselines.BATCH, threads=baselines.THREADS, provider=PROVIDER)
    collector = CollectorBefore(LoadedBefore(model, Path("bench.onnx")), options)
    source = MemorySource(model, batches)

    def call() -> dict:
        collected = collector.collect(source)
        return {name: (lm.moments.mean, lm.moments.variance()) for name, lm in collected.layers.items()}

    return call


def floor_gap_factory(model: onnx.ModelProto, batches, *, squares: bool = False, **_):
    """GlobalAveragePool of every BN output, fetched: the cheapest tap on a BN tensor. With
    ``squares`` also GlobalAveragePool(y * y): the cheapest per-channel mean and variance found."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    bn_outputs = [n.output[0] for n in probe.graph.node if n.op_type == "BatchNormalization"]
    pooled = [f"floor/{i}" for i in range(len(bn_outputs))]
    probe.graph.node.extend(helper.make_node("GlobalAveragePool", [y], [p], name=p) for y, p in zip(bn_outputs, pooled))
    if squares:
        for i, y in enumerate(bn_outputs):
            probe.graph.node.append(helper.make_node("Mul", [y, y], [f"floor/{i}/y2"], name=f"floor/{i}/y2"))
            probe.graph.node.append(helper.make_node("GlobalAveragePool", [f"floor/{i}/y2"], [f"floor/{i}/m2"]))
            pooled.append(f"floor/{i}/m2")
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(p) for p in pooled)
    session = common.make_session(probe, baselines.OPT_LEVEL, baselines.THREADS, providers=baselines.PROVIDERS)
    return lambda: common.run_all(session, batches, pooled)


def collect_repeated(model_name: str, repeat: int) -> dict:
    """Peak-memory probe: collect over ``repeat`` x 10 batches of the same data."""
    model = baselines.MODEL_BUILDERS[model_name](baselines.SIZE)
    batches = list(models.calibration_batches(model_name, batch=baselines.BATCH, batches=10, size=baselines.SIZE))
    source = MemorySource(model, batches, repeat=repeat)
    collected = collect_moments(
        LoadedModel(model, Path("bench.onnx")),
        source,
        StatsOptions(batch_size=baselines.BATCH, threads=baselines.THREADS),
    )
    return {"batches": collected.batches, "layers": len(collected.layers)}


def memory_table(model_name: str) -> str:
    rows = []
    for repeat in (1, 100):
        m = common.measure_in_subprocess(collect_repeated, model_name, repeat)
        rows.append(
            {
                "model": model_name,
                "batches": m["result"]["batches"],
                "peak": m["peak_rss_mb"],
                "delta": m["delta_mb"],
                "seconds": m["seconds"],
            }
        )
    return common.format_table(
        rows,
        [
            ("model", "model", ""),
            ("batches", "batches", "d"),
            ("peak", "peak RSS MB", ".0f"),
            ("delta", "added by the run MB", ".0f"),
            ("seconds", "seconds", ".1f"),
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    global PROVIDER
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--before", metavar="REF", help="also time bnscope as of this git ref (e.g. main)")
    parser.add_argument("--parts", default="graphs,wide,cli,memory", help="comma-separated subset")
    parser.add_argument("--no-memory", action="store_true", help="same as leaving memory out of --parts")
    parser.add_argument("--rounds", type=int, help="rounds for the graphs part (overrides the preset)")
    parser.add_argument(
        "--models", nargs="+", choices=list(baselines.MODEL_BUILDERS), default=list(baselines.MODEL_BUILDERS)
    )
    parser.add_argument("--startup-rounds", type=int, default=None, help="rounds for the wide and cli parts")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(",")) - ({"memory"} if args.no_memory else set())
    PROVIDER = args.provider
    if args.provider == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            parser.error("this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)")
    baselines.PROVIDERS[:0] = ["CUDAExecutionProvider"] if args.provider == "cuda" else []
    with tempfile.TemporaryDirectory() as tmp:
        before = startup.export_before(args.before, Path(tmp)) if args.before else None
        if "graphs" in parts:
            extra = {f"bnscope-{s}": bnscope_factory(s) for s in ("auto", "input_sums", "output_pool")}
            if args.before:
                extra[f"before-{args.before}-auto"] = before_factory
            extra["bnscope-runtime-only"] = runtime_only_factory
            extra["bnscope-host-only"] = host_only_factory
            extra["floor-gap-y"] = floor_gap_factory
            extra["floor-gap-y-y2"] = lambda model, batches, **_: floor_gap_factory(model, batches, squares=True)
            baselines.run(extra, quick=args.quick, rounds=args.rounds, model_names=args.models)
        rounds = args.startup_rounds or (3 if args.quick else 9)
        print(startup.tables(rounds, args.provider, tuple(p for p in ("wide", "cli") if p in parts), before))
    if "memory" in parts:
        print("\nPeak memory of collect_moments, 10 vs 1000 batches (fresh process each):")
        print(memory_table("mobilenetv3_small"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
