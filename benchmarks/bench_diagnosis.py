"""What the diagnosis's second pass costs, as users run ``stats``, against plain inference, same run.

    python benchmarks/bench_diagnosis.py --parts wide,cli --rounds 5
    python benchmarks/bench_diagnosis.py --parts graphs --rounds 9     # train vs eval graph per batch
    python benchmarks/bench_diagnosis.py --resnet /work/models/i20/resnet18_bn_64.onnx --data x.npz

Three parts, each candidate alternated with its baseline (median of paired ratios over rounds):

* ``wide``: the wide-BN model (8 x [BN(512) -> Relu] on [256, 512, 2, 2], 32 batches of 256) through
  the public API, ``bnscope.collect_stats(model, data.npz)`` (load, instrument, session, collect,
  summarise), against ``np.load`` + ``onnxruntime.InferenceSession`` + ``run`` over the same
  batches: the defaults, ``diagnose="never"`` with each tap strategy, ``diagnose="always"``; on the
  data the running statistics describe (the defaults run no second pass: every layer is ok) and on
  the same data scaled by 1.2 and shifted by 0.3 (every layer drifts: the defaults diagnose).
* ``cli``: ``bnscope stats MODEL --data DATA.npz -b 16 --format json`` as a fresh process against a
  fresh plain onnxruntime script (load the .npz, create a session, run every batch) on a ResNet-18
  export (``--resnet``; without it the benchmark's ResNet-18-like), 2048 samples: the defaults and
  ``--diagnose never``, on in-domain data and on the same data scaled by 1.3 and shifted by 0.3
  (an input shift: the defaults run the second pass).
* ``graphs``: onnxruntime's ``run`` of the train-mode graph (each BN in training mode, or the
  standard ops) against the eval-mode graph, per batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx

from benchmarks import bench_stats_startup as startup
from benchmarks import common, models
from bnscope.onnxio.graph import GraphView
from bnscope.stats.instrument import instrument

SHIFTS = {"wide": (1.2, 0.3), "cli": (1.3, 0.3)}


def _shifted(x: np.ndarray, part: str) -> np.ndarray:
    scale, offset = SHIFTS[part]
    return (x * scale + offset).astype(np.float32)


def wide_rows(tmp: Path, rounds: int) -> list[dict]:
    import onnxruntime as ort

    from bnscope import collect_stats
    from bnscope.stats.collect import StatsOptions

    path, batch = tmp / "wide_bn.onnx", 256
    onnx.save(startup.wide_bn_model(), str(path))
    x = startup.wide_bn_data(32 * batch)
    rows = []
    for data_name, values in (("matching", x), ("shifted", _shifted(x, "wide"))):
        data = tmp / f"wide_{data_name}.npz"
        np.savez(data, x=values)

        def plain(data=data):
            arrays = np.load(data)["x"]
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for i in range(0, len(arrays), batch):
                session.run(None, {"x": arrays[i : i + batch]})

        def stats(data=data, diagnose="auto", strategy="auto"):
            options = StatsOptions(batch_size=batch, strategy=strategy)
            return lambda: collect_stats(path, data, options=options, diagnose=diagnose)

        candidates = {"plain": plain, "defaults": stats(), "always": stats(diagnose="always")}
        candidates.update(
            {f"never {s}": stats(diagnose="never", strategy=s) for s in ("auto", "input_sums", "output_pool")}
        )
        times = common.interleaved(candidates, rounds=rounds)
        rows += [{**row, "model": f"wide BN, {data_name} data"} for row in common.summarize(times, baseline="plain")]
    return rows


def cli_rows(tmp: Path, rounds: int, resnet: Path | None, data: Path | None, samples: int) -> list[dict]:
    script = tmp / "plain_script.py"
    script.write_text(startup.PLAIN_SCRIPT)
    if resnet is None:
        resnet = tmp / "resnet18_like.onnx"
        onnx.save(models.resnet18_like(size=64), str(resnet))
    if data is not None:
        x = next(iter(np.load(data).values()))[:samples]
    else:
        x = np.concatenate([b[models.INPUT] for b in models.calibration_batches("resnet18", 16, samples // 16, 64)])
    rows = []
    for data_name, values in (("in-domain", x), ("shifted", _shifted(x, "cli"))):
        path = tmp / f"resnet_{data_name}.npz"
        np.savez(path, x=values)
        bnscope = [sys.executable, "-m", "bnscope", "stats", str(resnet), "--data", str(path), "--format", "json"]
        bnscope += ["--batch-size", "16"]
        plain = [sys.executable, str(script), str(resnet), str(path), "16", "CPUExecutionProvider"]
        candidates = {
            "plain": startup._process(plain),
            "bnscope stats": startup._process(bnscope),
            "bnscope stats --diagnose never": startup._process(bnscope + ["--diagnose", "never"]),
        }
        times = common.interleaved(candidates, rounds=rounds)
        label = f"{resnet.name}, {len(values)} x {list(values.shape[1:])} {data_name}, batch 16"
        rows += [{**row, "model": label} for row in common.summarize(times, baseline="plain")]
    return rows


def graph_rows(rounds: int) -> list[dict]:
    """onnxruntime alone: the train-mode graphs against the eval-mode graph, per batch."""
    cases = {
        "wide BN": (startup.wide_bn_model(), [{"x": b} for b in np.split(startup.wide_bn_data(8 * 256), 8)]),
        "resnet18_like": (models.resnet18_like(size=64), list(models.calibration_batches("resnet18", 16, 8, 64))),
    }
    rows = []
    for name, (model, batches) in cases.items():
        view = GraphView(model)
        graphs = {"eval": instrument(model, view)}
        graphs.update({f"train ({ops})": instrument(model, view, mode="train", train_ops=ops) for ops in ("bn", "ops")})
        candidates = {}
        for label, graph in graphs.items():
            session = common.make_session(graph.model, "all", 2)
            candidates[label] = lambda s=session, g=graph, b=batches: common.run_all(s, b, g.output_names)
        times = common.interleaved(candidates, rounds=rounds)
        rows += [{**row, "model": name} for row in common.summarize(times, baseline="eval", per=len(batches))]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="wide,cli", help="comma-separated: wide, cli, graphs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resnet", type=Path, help="a ResNet-18 export (default: the benchmark's ResNet-18-like)")
    parser.add_argument("--data", type=Path, help="an .npz of in-domain samples for --resnet")
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    print(common.command_line())
    print(f"load average before: {os.getloadavg()}")
    columns = [("model", "model", ""), ("name", "candidate", ""), ("median_ms", "ms", ".0f")]
    columns.append(("paired_ratio", "x baseline", ".2f"))
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            if part == "wide":
                rows = wide_rows(Path(tmp), args.rounds)
            elif part == "cli":
                rows = cli_rows(Path(tmp), args.rounds, args.resnet, args.data, args.samples)
            else:
                rows = graph_rows(args.rounds)
            print(f"\n{part} (load average now {os.getloadavg()}):")
            print(common.format_table(rows, columns), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
