"""Start-up as a user pays it: ``bnscope --help`` and a command on a small model, each a fresh process,
against ``python -c "import numpy, onnxruntime"`` (what any onnxruntime script pays), alternated in
every round (median of paired ratios over rounds); then where the time goes: ``python -X importtime``
of ``bnscope --help`` and of the small command, largest cumulative imports first, and the import of
ml_dtypes (onnx imports it; its 0.7.0 extension takes over a second here, see pyproject.toml).

    python benchmarks/bench_startup.py [--python /path/to/venv/bin/python] [--before main] [--rounds 15]

``--python`` picks the interpreter (and so the installed onnx, onnxruntime, ml_dtypes) the commands
run with; bnscope is this checkout (PYTHONPATH), or ``--before REF`` too, exported with ``git archive``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = ROOT / "sample_models" / "resnet_small.onnx"
SMALL_DATA = ROOT / "sample_models" / "resnet_small_calib.npz"


def commands(python: str) -> dict[str, list[str]]:
    bnscope = [python, "-m", "bnscope"]
    return {
        "python -c pass": [python, "-c", "pass"],
        "import numpy, onnxruntime": [python, "-c", "import numpy, onnxruntime"],
        "import numpy, onnxruntime, onnx": [python, "-c", "import numpy, onnxruntime, onnx"],
        # typer >= 0.29 parses a command's options with pydantic (typer._adapters), --help does not
        "import typer, rich.table, pydantic": [python, "-c", "import typer, rich.table, pydantic"],
        "bnscope --help": [*bnscope, "--help"],
        "bnscope stats --help": [*bnscope, "stats", "--help"],
        "bnscope inspect (small model)": [*bnscope, "inspect", str(SMALL_MODEL), "--format", "json"],
        "bnscope stats (small model, 64 samples)": [
            *bnscope,
            *("stats", str(SMALL_MODEL), "--data", str(SMALL_DATA), "--max-batches", "2", "--format", "json"),
        ],
    }


def runner(argv: list[str], env: dict[str, str], cwd: str, cpu: list[float]) -> Callable[[], None]:
    """Runs ``argv`` in ``cwd`` (not the checkout: ``python -m`` would import its bnscope first) and
    appends the process's CPU seconds (user + system) to ``cpu``."""

    def run() -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)

    return run


def importtime(argv: list[str], env: dict[str, str], top: int) -> list[tuple[str, float, float]]:
    """(module, self ms, cumulative ms) of the ``top`` largest cumulative imports of one run."""
    run = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]], env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True
    )
    rows = []
    for line in run.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            own, total, name = line.removeprefix("import time:").split("|")
            rows.append((name.rstrip(), int(own) / 1e3, int(total) / 1e3))
    return sorted(rows, key=lambda r: -r[2])[:top]


def export(ref: str, folder: Path) -> Path:
    """bnscope as of git ``ref`` under ``folder`` (for PYTHONPATH)."""
    folder.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "bnscope"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="The interpreter the commands run with.")
    parser.add_argument("--before", help="Also time bnscope as of this git ref (e.g. main).")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--top", type=int, default=14, help="Rows of each import breakdown.")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        candidates = {
            name: runner(argv, env, tmp, cpu.setdefault(name, [])) for name, argv in commands(args.python).items()
        }
        if args.before:
            before_env = {**env, "PYTHONPATH": str(export(args.before, Path(tmp) / "before"))}
            for name in ("bnscope --help", "bnscope inspect (small model)"):
                label = f"{name} @ {args.before}"
                candidates[label] = runner(commands(args.python)[name], before_env, tmp, cpu.setdefault(label, []))
        times = common.interleaved(candidates, rounds=args.rounds, warmup=1)
    print(f"interpreter: {args.python}; load average {os.getloadavg()[0]:.1f} at the end")
    print(_versions(args.python))
    print("\n| command (fresh process) | median ms | x import numpy, onnxruntime (paired) | ms over it | CPU ms |")
    print("|---|---:|---:|---:|---:|")
    rows = common.summarize(times, baseline="import numpy, onnxruntime")
    base = next(r["median_ms"] for r in rows if r["name"] == "import numpy, onnxruntime")
    for r in rows:
        cpu_ms = statistics.median(cpu[r["name"]]) * 1e3
        print(
            f"| {r['name']} | {r['median_ms']:.0f} | {r['paired_ratio']:.2f} | {r['median_ms'] - base:+.0f} | {cpu_ms:.0f} |"
        )

    for title, argv in (
        ("bnscope --help", commands(args.python)["bnscope --help"]),
        ("bnscope inspect (small model)", commands(args.python)["bnscope inspect (small model)"]),
        ("import ml_dtypes", [args.python, "-c", "import ml_dtypes"]),
    ):
        print(f"\npython -X importtime, {title}: the {args.top} largest cumulative imports (ms)")
        print("| module | self | cumulative |\n|---|---:|---:|")
        for name, own, total in importtime(argv, env, args.top):
            print(f"| `{name}` | {own:.1f} | {total:.1f} |")


def _versions(python: str) -> str:
    code = (
        "import importlib.metadata as m; print(', '.join(f'{d} {m.version(d)}' for d in "
        "('typer', 'rich', 'numpy', 'onnx', 'onnxruntime', 'ml_dtypes')))"
    )
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
