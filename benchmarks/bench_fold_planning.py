"""Benchmark fold planning and BN lineage against the number of BNs: is it linear?

Models (built here, seeded, 4 channels so that weights cost nothing and only the graph's size counts):

* ``conv_bn_N``: x -> N x [Conv(1x1) -> BatchNormalization] -> y (N = 1000, 2000, 4000 by default);
* ``bn_chain_N``: x -> N x BatchNormalization -> y (each BN merges into the one before it).

For each model, in a fresh subprocess per run (the candidates interleaved per round):

* ``fold``: ``load_model`` + ``fold_batchnorm`` (planning and rewriting, no verification, nothing
  written), the library call behind ``bnscope fold --dry-run --no-verify``;
* ``lineage``: ``bn_upstream`` (which BNs feed which, what ``stats`` and ``recalibrate`` ask) and
  one read of the largest set (the last BN's: every BN before it). Reading every set is quadratic by
  nature (their sizes sum to N^2/2 on a chain); the sets are decoded only where they are read.

``--before REF`` also times the code of a git ref (exported with ``git archive``) in the same rounds;
a run past ``--timeout`` seconds is recorded as such. Run::

    python benchmarks/bench_fold_planning.py [--sizes 1000,2000,4000] [--chain 10000] [--before main]
        [--rounds 3] [--timeout 300] [--parts fold,lineage] [--markdown FILE]

Nothing here is a pass/fail test; it prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, environment, median  # noqa: E402

CHANNELS = 4

_TIMER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from bnscope.fold.rewrite import fold_batchnorm
from bnscope.onnxio import model_io
from bnscope.onnxio.graph import GraphView
from bnscope.stats.lineage import bn_upstream
loaded = model_io.load_model(sys.argv[2])
t = time.perf_counter()
if sys.argv[3] == "fold":
    folded, records = fold_batchnorm(loaded.model, store=model_io.TensorStore(loaded))
    check = sum(r.folded for r in records)
else:
    view = GraphView(loaded.model)
    upstream = bn_upstream(view)
    check = len(upstream[view.node_name(view.bn_indices()[-1])])  # the largest set: every BN before the last
print(json.dumps({"seconds": time.perf_counter() - t, "check": check}))
"""


def _bn(i: int, x: str, y: str, rng: np.random.Generator, nodes: list, inits: list) -> None:
    values = {
        "s": rng.standard_normal(CHANNELS),
        "b": rng.standard_normal(CHANNELS),
        "m": rng.standard_normal(CHANNELS),
        "v": np.abs(rng.standard_normal(CHANNELS)) + 0.1,
    }
    inits.extend(numpy_helper.from_array(v.astype(np.float32), f"bn{i}_{k}") for k, v in values.items())
    names = [x] + [f"bn{i}_{k}" for k in values]
    nodes.append(helper.make_node("BatchNormalization", names, [y], name=f"bn{i}"))


def _model(nodes: list, inits: list, out: str) -> onnx.ModelProto:
    shape = [1, CHANNELS, 4, 4]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def conv_bn_stack(n: int, seed: int = 0) -> onnx.ModelProto:
    rng, nodes, inits, x = np.random.default_rng(seed), [], [], "x"
    for i in range(n):
        inits.append(
            numpy_helper.from_array(rng.standard_normal((CHANNELS, CHANNELS, 1, 1)).astype(np.float32), f"w{i}")
        )
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        _bn(i, f"c{i}", f"y{i}", rng, nodes, inits)
        x = f"y{i}"
    return _model(nodes, inits, x)


def bn_chain(n: int, seed: int = 0) -> onnx.ModelProto:
    rng, nodes, inits, x = np.random.default_rng(seed), [], [], "x"
    for i in range(n):
        _bn(i, x, f"y{i}", rng, nodes, inits)
        x = f"y{i}"
    return _model(nodes, inits, x)


def _time(code_root: str, model: Path, what: str, timeout: float) -> dict:
    try:
        done = subprocess.run(
            [sys.executable, "-c", _TIMER, code_root, str(model), what],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    except subprocess.TimeoutExpired:
        return {"seconds": None, "timed_out": True}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _export(ref: str, into: Path) -> str:
    archive = subprocess.run(["git", "archive", ref, "bnscope"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return str(into)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2000,4000", help="Conv+BN layer counts")
    parser.add_argument("--chain", type=int, default=10000, help="BN->BN chain length (0: none)")
    parser.add_argument("--before", default=None, help="a git ref to time in the same rounds")
    parser.add_argument("--before-max", type=int, default=2000, help="largest model the ref runs (it may be quadratic)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--parts", default="fold,lineage", help="fold, lineage or both")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    cases = [(f"{n} Conv+BN layers", n, conv_bn_stack) for n in map(int, args.sizes.split(",")) if n]
    if args.chain:
        cases.append((f"{args.chain} BN->BN chain", args.chain, bn_chain))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fold-planning-") as tmp:
        candidates = {"bnscope": str(ROOT)}
        if args.before:
            (Path(tmp) / "before").mkdir()
            candidates["before"] = _export(args.before, Path(tmp) / "before")
        for label, n, build in cases:
            path = Path(tmp) / f"m{n}.onnx"
            onnx.save(build(n), path)
            for what in args.parts.split(","):
                times: dict[str, list] = {name: [] for name in candidates}
                for k in range(args.rounds):
                    order = list(candidates) if k % 2 == 0 else list(reversed(candidates))
                    for name in order:
                        if name == "before" and n > args.before_max:
                            continue
                        times[name].append(_time(candidates[name], path, what, args.timeout))
                rows.append((label, n, what, times))
                print(_row(label, n, what, times), flush=True)
    table = _table(rows, args.before)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


def _cell(runs: list[dict]) -> str:
    if not runs:
        return "not run"
    if any(r.get("timed_out") for r in runs):
        return "timed out"
    return f"{median([r['seconds'] for r in runs]):.2f} s"


def _row(label, n, what, times) -> str:
    ours = times["bnscope"]
    per_bn = f"{1e3 * median([r['seconds'] for r in ours]) / n:.2f} ms" if ours and not ours[0].get("timed_out") else ""
    cells = [label, what, _cell(ours), per_bn]
    if "before" in times:
        cells.append(_cell(times["before"]))
    return "| " + " | ".join(cells) + " |"


def _table(rows, before) -> str:
    env = environment()
    head = ["model", "part", "bnscope (median)", "per BN"] + ([f"before ({before})"] if before else [])
    lines = [
        f"`{command_line()}`",
        "",
        f"{env['processor']}, {env['cpus']} CPUs, Python {env['python']}, onnx {env['onnx']}, no GPU; "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += [_row(*row) for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
