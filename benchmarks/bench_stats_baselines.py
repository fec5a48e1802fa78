"""Cost of collecting BN input statistics, against plain inference: the naive baselines.

    python benchmarks/bench_stats_baselines.py            # full run (~1 min on 2 cores)
    python benchmarks/bench_stats_baselines.py --quick    # a short run (~10 s)
    python -m benchmarks.bench_stats_baselines --json out.json

Models: ``resnet18_like`` and ``mobilenetv3_small_like`` (benchmarks/models.py) at 64x64,
batch 16, onnxruntime CPU, 2 intra-op threads, ORT_ENABLE_ALL. Every candidate processes the
same in-memory batches once per call and fetches every model output:

* ``plain``: inference only (the baseline).
* ``calibrator``: every BN input added as a graph output and reduced on the host in numpy
  float64 (sum and sum of squares per channel), as onnxruntime's quantisation calibrator
  collects tensors.
* ``ingraph-reducemean``: ``ReduceMean(x)`` and ``ReduceMean(x*x)`` (axes all but 1,
  keepdims 0) at every BN input, added to the graph; the host averages the per-batch moments.

Timing: candidates alternate within each round (:func:`benchmarks.common.interleaved`);
the table gives the median ms/batch and the paired ratio against ``plain`` (median over
rounds of candidate/plain in the same round). Before timing, every candidate's moments are
compared with the calibrator's float64 ones.

bnscope's own collector (or anything else) joins through ``run(candidates_extra=...)``: a
factory takes ``(model, batches)`` and returns a zero-argument callable that processes all
batches once. A callable that returns ``{bn_node_name: (mean, var)}`` gets its moments
checked too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
from onnx import helper

from benchmarks import common, models

Factory = Callable[[onnx.ModelProto, Sequence[Mapping[str, np.ndarray]]], Callable[[], Any]]

MODEL_BUILDERS = {
    "resnet18": models.resnet18_like,
    "mobilenetv3_small": models.mobilenetv3_small_like,
}
SIZE = 64
BATCH = 16
THREADS = 2
OPT_LEVEL = "all"
PROVIDERS = ["CPUExecutionProvider"]  # bench_stats --provider cuda puts CUDA first
FULL = {"rounds": 21, "batches": 32}
QUICK = {"rounds": 3, "batches": 6}


# ---------------------------------------------------------------------------------------------
# Graph helpers
# ---------------------------------------------------------------------------------------------


def bn_taps(model: onnx.ModelProto) -> list[tuple[str, str, int]]:
    """(BN node name, input tensor, rank) for every BatchNormalization; rank from shape
    inference (4 if unknown)."""
    ranks: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
            if vi.type.tensor_type.HasField("shape"):
                ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    except Exception:
        pass
    return [
        (n.name, n.input[0], ranks.get(n.input[0], 4)) for n in model.graph.node if n.op_type == "BatchNormalization"
    ]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def with_bn_inputs_as_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy whose graph outputs also include every BN input tensor (once each)."""
    m = _copy(model)
    have = {o.name for o in m.graph.output}
    taps = []
    for _, t, _ in bn_taps(model):
        if t not in have:
            m.graph.output.append(helper.make_empty_tensor_value_info(t))
            have.add(t)
        if t not in taps:
            taps.append(t)
    return m, taps


def with_reducemean_taps(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """A copy with ReduceMean(x), ReduceMean(x*x) (axes all but 1, keepdims 0) at every BN
    input; returns it and ``{input tensor: (mean output, mean-of-square output)}``."""
    m = _copy(model)
    outs: dict[str, tuple[str, str]] = {}
    for _, t, rank in bn_taps(model):
        if t in outs:
            continue
        axes = [0] + list(range(2, rank))
        safe = t.replace("/", "_")
        sq, mo, so = f"{safe}__sq", f"{safe}__mean", f"{safe}__sqmean"
        m.graph.node.extend(
            [
                helper.make_node("ReduceMean", [t], [mo], name=f"{safe}__rm", axes=axes, keepdims=0),
                helper.make_node("Mul", [t, t], [sq], name=f"{safe}__mul"),
                helper.make_node("ReduceMean", [sq], [so], name=f"{safe}__rsq", axes=axes, keepdims=0),
            ]
        )
        m.graph.output.extend([helper.make_empty_tensor_value_info(mo), helper.make_empty_tensor_value_info(so)])
        outs[t] = (mo, so)
    return m, outs


# ---------------------------------------------------------------------------------------------
# Candidate factories: (model, batches) -> zero-argument callable
# ---------------------------------------------------------------------------------------------


def plain_factory(
    model: onnx.ModelProto, batches, *, threads: int = THREADS, opt_level: str = OPT_LEVEL
) -> Callable[[], Any]:
    """Inference only, every model output fetched."""
    sess = common.make_session(model, opt_level, threads, providers=PROVIDERS)

    def call():
        for feed in batches:
            sess.run(None, feed)

    return call


def calibrator_factory(
    model: onnx.ModelProto, batches, *, threads: int = THREADS, opt_level: str = OPT_LEVEL
) -> Callable[[], dict]:
    """BN inputs as graph outputs; per-channel sum and sum of squares in numpy float64."""
    aug, taps = with_bn_inputs_as_outputs(model)
    sess = common.make_session(aug, opt_level, threads, providers=PROVIDERS)
    names = [o.name for o in aug.graph.output]
    index = {t: names.index(t) for t in taps}
    bn = [(node, t) for node, t, _ in bn_taps(model)]

    def call() -> dict:
        acc = {t: [0, 0.0, 0.0] for t in taps}
        for feed in batches:
            outs = sess.run(names, feed)
            for t in taps:
                x = outs[index[t]].astype(np.float64)
                axes = (0,) + tuple(range(2, x.ndim))
                a = acc[t]
                a[0] += x.size // x.shape[1]
                a[1] = a[1] + x.sum(axis=axes)
                a[2] = a[2] + np.square(x).sum(axis=axes)
        stats = {}
        for t, (n, s, ss) in acc.items():
            mean = s / n
            stats[t] = (mean, ss / n - mean * mean)
        return {node: stats[t] for node, t in bn}

    return call


def ingraph_reducemean_factory(
    model: onnx.ModelProto, batches, *, threads: int = THREADS, opt_level: str = OPT_LEVEL
) -> Callable[[], dict]:
    """ReduceMean(x), ReduceMean(x*x) in the graph; the host averages per-batch moments
    (weighted by batch size)."""
    aug, outs = with_reducemean_taps(model)
    sess = common.make_session(aug, opt_level, threads, providers=PROVIDERS)
    names = [o.name for o in aug.graph.output]
    index = {t: (names.index(mo), names.index(so)) for t, (mo, so) in outs.items()}
    bn = [(node, t) for node, t, _ in bn_taps(model)]
    first_input = model.graph.input[0].name

    def call() -> dict:
        acc = {t: [0, 0.0, 0.0] for t in outs}
        for feed in batches:
            res = sess.run(names, feed)
            w = len(feed[first_input])
            for t, (i, j) in index.items():
                a = acc[t]
                a[0] += w
                a[1] = a[1] + w * res[i].astype(np.float64)
                a[2] = a[2] + w * res[j].astype(np.float64)
        stats = {}
        for t, (n, s, ss) in acc.items():
            mean = s / n
            stats[t] = (mean, ss / n - mean * mean)
        return {node: stats[t] for node, t in bn}

    return call


BUILTIN: dict[str, Factory] = {
    "plain": plain_factory,
    "calibrator": calibrator_factory,
    "ingraph-reducemean": ingraph_reducemean_factory,
}
DESCRIPTIONS = {
    "plain": "plain inference (baseline)",
    "calibrator": "BN inputs as graph outputs + numpy float64 reduce",
    "ingraph-reducemean": "ReduceMean(x), ReduceMean(x*x) at BN inputs",
}


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _check(reference: Mapping, got: Any) -> str:
    """Worst relative difference of (mean, var) against the float64 reference, as text."""
    if not isinstance(got, Mapping) or set(got) != set(reference):
        return "not checked"
    worst_m = worst_v = 0.0
    for node, (rm, rv) in reference.items():
        gm, gv = (np.asarray(a, np.float64) for a in got[node][:2])
        scale = np.sqrt(np.maximum(rv, 1e-12))
        worst_m = max(worst_m, float(np.max(np.abs(gm - rm) / scale)))
        worst_v = max(worst_v, float(np.max(np.abs(gv - rv) / np.maximum(rv, 1e-12))))
    return f"max |dmean|/std {worst_m:.1e}, max |dvar|/var {worst_v:.1e}"


def run(
    candidates_extra: Mapping[str, Factory] | None = None,
    *,
    quick: bool = False,
    model_names: Sequence[str] = tuple(MODEL_BUILDERS),
    rounds: int | None = None,
    batches: int | None = None,
    inner: int = 1,
    json_path: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Times plain inference and the statistics approaches on each model; prints the tables.

    ``candidates_extra`` adds ``{name: factory}``; a factory takes ``(model, batches)`` (the
    model as built, batches a list of feed dicts) and returns a zero-argument callable that
    processes all batches once. Returns ``{"command", "environment", "config", "models":
    {model: {"rows": [...], "times_s": {...}, "checks": {...}, "bn": n}}}`` and writes it as
    JSON to ``json_path`` if given.
    """
    cfg = dict(QUICK if quick else FULL)
    if rounds:
        cfg["rounds"] = rounds
    if batches:
        cfg["batches"] = batches
    command = common.command_line()
    env = common.environment()
    log(f"$ {command}")
    log(
        f"# {env['processor']}, {env['cpus']} CPUs; python {env['python']}, onnxruntime "
        f"{env['onnxruntime']}, onnx {env['onnx']}, numpy {env['numpy']}"
    )
    log(
        f"# {SIZE}x{SIZE}, batch {BATCH}, {cfg['batches']} batches per call, {cfg['rounds']} "
        f"interleaved rounds, {THREADS} intra-op threads, ORT_ENABLE_ALL, {PROVIDERS[0]}"
    )
    factories: dict[str, Factory] = dict(BUILTIN)
    for name, factory in (candidates_extra or {}).items():
        if name in factories:
            raise ValueError(f"candidate {name!r} already exists")
        factories[name] = factory
    result: dict[str, Any] = {
        "command": command,
        "environment": env,
        "config": {**cfg, "size": SIZE, "batch": BATCH, "threads": THREADS, "opt_level": "ORT_ENABLE_ALL"},
        "models": {},
    }
    for model_name in model_names:
        t0 = time.perf_counter()
        model = MODEL_BUILDERS[model_name](size=SIZE)
        feeds = list(models.calibration_batches(model_name, BATCH, cfg["batches"], SIZE))
        fns = {name: factory(_copy(model), feeds) for name, factory in factories.items()}
        reference = fns["calibrator"]()
        checks = {
            name: ("reference" if name == "calibrator" else "-" if name == "plain" else _check(reference, fn()))
            for name, fn in fns.items()
        }
        n_bn = len(bn_taps(model))
        log(f"\n## {model_name}: {n_bn} BN (setup {time.perf_counter() - t0:.1f} s)")
        times = common.interleaved(fns, rounds=cfg["rounds"], inner=inner)
        rows = common.summarize(times, baseline="plain", per=cfg["batches"])
        for row in rows:
            row["approach"] = DESCRIPTIONS.get(row["name"], row["name"])
            row["check"] = checks[row["name"]]
        log(
            common.format_table(
                rows,
                [
                    ("name", "candidate", ""),
                    ("approach", "approach", ""),
                    ("median_ms", "ms/batch", ".2f"),
                    ("paired_ratio", "x plain", ".2f"),
                    ("q1_ms", "q1", ".2f"),
                    ("q3_ms", "q3", ".2f"),
                ],
            )
        )
        for row in rows:
            if row["name"] != "plain":
                log(f"  {row['name']}: moments vs float64 calibrator: {row['check']}")
        result["models"][model_name] = {"bn": n_bn, "rows": rows, "times_s": times, "checks": checks}
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1, default=float))
        log(f"\nwrote {json_path}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (fewer rounds, batches)")
    ap.add_argument("--models", nargs="+", choices=list(MODEL_BUILDERS), default=list(MODEL_BUILDERS))
    ap.add_argument("--rounds", type=int, help="interleaved rounds (overrides the preset)")
    ap.add_argument("--batches", type=int, help="batches per call (overrides the preset)")
    ap.add_argument("--json", dest="json_path", help="write the results as JSON here")
    args = ap.parse_args(argv)
    run(quick=args.quick, model_names=args.models, rounds=args.rounds, batches=args.batches, json_path=args.json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
