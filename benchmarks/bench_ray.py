"""``--ray local`` against one process, as a user runs them (fresh processes, start-up included).

For each MODEL=DATA pair, ``bnscope stats MODEL --data DATA --format json`` (one process) and the
same with ``--ray local --workers W`` run alternately for ``--rounds`` rounds; the table gives the
median wall seconds and the median of the paired ratios (ray / one). The last round's reports are
compared: verdicts and diagnosis must be equal, and the largest relative difference of any layer's
batch mean / variance is printed. ``--recalibrate`` also writes the model both ways once and gives
the largest relative difference of any BN running mean / variance. ``--startup`` times
``ray.init(num_cpus=2, include_dashboard=False)`` alone. Needs Ray (``pip install ".[ray]"``).

    python benchmarks/bench_ray.py sample_models/resnet_small.onnx=sample_models/resnet_small_shifted.npz \
        /work/models/i18/resnet18.onnx=/work/models/i18/data/photos_128.npz --rounds 2 --recalibrate --startup
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def bnscope(*args) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "bnscope", *map(str, args)], capture_output=True, text=True, env=ENV, cwd=ROOT
    )
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"bnscope {' '.join(map(str, args))} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done


def largest_difference(got: dict, want: dict) -> float:
    worst = 0.0
    for a, b in zip(got["layers"], want["layers"], strict=True):
        for key in ("batch_mean", "batch_var"):
            x, y = np.asarray(a[key], dtype=float), np.asarray(b[key], dtype=float)
            worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-30), initial=0.0)))
    return worst


def same_findings(got: dict, want: dict) -> bool:
    keys = ("verdicts", "first_not_ok", "reading")
    findings = all(got["summary"].get(k) == want["summary"].get(k) for k in keys)
    causes = [d["cause"] for d in got["summary"].get("diagnosis", [])] == [
        d["cause"] for d in want["summary"].get("diagnosis", [])
    ]
    verdicts = [a["verdict"] for a in got["layers"]] == [b["verdict"] for b in want["layers"]]
    return findings and causes and verdicts


def stats_case(model: str, data: str, rounds: int, workers: int) -> dict:
    common = [model, "--data", data, "--format", "json"]
    one, ray, ratios = [], [], []
    for _ in range(rounds):
        a, single = bnscope("stats", *common)
        b, on_ray = bnscope("stats", *common, "--ray", "local", "--workers", workers)
        one.append(a)
        ray.append(b)
        ratios.append(b / a)
    got, want = json.loads(on_ray.stdout), json.loads(single.stdout)
    return {
        "case": f"stats {Path(model).name}",
        "one": statistics.median(one),
        "ray": statistics.median(ray),
        "ratio": statistics.median(ratios),
        "same": same_findings(got, want) and single.returncode == on_ray.returncode,
        "difference": largest_difference(got, want),
        "batches": want["data"].get("batches"),
    }


def bn_statistics(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    names = [n.input[k] for n in model.graph.node if n.op_type == "BatchNormalization" for k in (3, 4)]
    return {name: values[name].astype(np.float64) for name in names if name in values}


def recalibrate_case(model: str, data: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        one_path, ray_path = Path(folder) / "one.onnx", Path(folder) / "ray.onnx"
        a, _ = bnscope("recalibrate", model, "--data", data, "-o", one_path)
        b, _ = bnscope("recalibrate", model, "--data", data, "-o", ray_path, "--ray", "local", "--workers", workers)
        want, got = bn_statistics(one_path), bn_statistics(ray_path)
    worst = max(float(np.max(np.abs(got[k] - v) / np.maximum(np.abs(v), 1e-30))) for k, v in want.items())
    return {
        "case": f"recalibrate {Path(model).name}",
        "one": a,
        "ray": b,
        "ratio": b / a,
        "same": want.keys() == got.keys(),
        "difference": worst,
        "batches": None,
    }


def startup(rounds: int) -> list[float]:
    code = (
        "import time, ray; t = time.perf_counter(); ray.init(num_cpus=2, include_dashboard=False, "
        "logging_level='ERROR'); print(time.perf_counter() - t); ray.shutdown()"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True) for _ in range(rounds)]
    return [float(r.stdout.strip().splitlines()[-1]) for r in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", help="MODEL=DATA")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--recalibrate", action="store_true")
    parser.add_argument("--startup", action="store_true")
    args = parser.parse_args()
    rows = []
    for pair in args.pairs:
        model, data = pair.split("=", 1)
        rows.append(stats_case(model, data, args.rounds, args.workers))
        if args.recalibrate:
            rows.append(recalibrate_case(model, data, args.workers))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (1 min)")
    print(f"| case | one process s | --ray local --workers {args.workers} s | ratio | same findings | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['one']:.1f} | {r['ray']:.1f} | {r['ratio']:.2f} | "
            f"{'yes' if r['same'] else 'NO'} | {r['difference']:.1e} |"
        )
    if args.startup:
        times = startup(3)
        print(f"\nray.init(num_cpus=2) alone: {', '.join(f'{t:.1f}' for t in times)} s")


if __name__ == "__main__":
    main()
