"""What the diagnosis's second pass costs: collection in train mode against eval mode, same run.

    python benchmarks/bench_diagnosis.py            # 9 interleaved rounds
    python benchmarks/bench_diagnosis.py --quick    # 3 rounds

``stats`` collects in eval mode (as deployed); when a layer is not ok, ``--diagnose auto`` adds a
train-mode pass over the same data (each BN replaced by the arithmetic of batch normalisation),
so a diagnosed run costs 1 + (train / eval) of a plain one. Both collectors are built once and
stream the same batches (:class:`bnscope.stats.collect.Collector`), rounds interleaved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, models
from bnscope.onnxio.model_io import LoadedModel
from bnscope.stats.collect import Collector, StatsOptions

BUILDERS = {"resnet18": models.resnet18_like, "mobilenetv3_small": models.mobilenetv3_small_like}


class _Batches:
    """The smallest DataSource: fixed in-memory batches."""

    description, is_random, samples = "benchmark batches", False, None

    def __init__(self, batches):
        self._batches = batches

    def batches(self, batch_size, max_batches=None, shard=None):
        return iter(self._batches)


def bench(name: str, rounds: int, batches: int = 16, batch: int = 16) -> list[dict]:
    loaded = LoadedModel(BUILDERS[name](), Path(f"{name}.onnx"))
    source = _Batches(list(models.calibration_batches(name, batch, batches)))
    collectors = {
        mode: Collector(loaded, StatsOptions(batch_size=batch, mode=mode, threads=2)) for mode in ("eval", "train")
    }
    times = common.interleaved(
        {mode: (lambda c=c: c.collect(source)) for mode, c in collectors.items()}, rounds=rounds, warmup=1
    )
    return [{"model": name, **row} for row in common.summarize(times, baseline="eval", per=batches)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 9")
    args = parser.parse_args(argv)
    rows = [row for name in BUILDERS for row in bench(name, 3 if args.quick else 9)]
    print(common.command_line())
    columns = [("model", "model", ""), ("name", "mode", ""), ("median_ms", "ms/batch", ".2f")]
    print(common.format_table(rows, columns + [("paired_ratio", "x eval", ".2f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
