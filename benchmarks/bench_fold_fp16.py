"""Benchmark BN-fold precision on fp16 models: bnscope against onnxsim, onnxscript, onnxoptimizer
and onnxruntime BASIC (issue 4).

Run it with the benchmark venv (see ``benchmarks/README.md``)::

    /tmp/benchvenv/bin/python benchmarks/bench_fold_fp16.py [--models 20] [--markdown FILE]

What it does:

1. **Models.** ``--models`` small random fp16 models, model ``i`` seeded with ``SEED + i``: 3-5
   Conv(3x3)-BN-Relu layers (8-32 channels, bias on about half the Convs, 3x16x16 input); every
   fourth model adds GlobalAveragePool-Flatten-Gemm-BN. BN statistics are realistic: each Conv
   output channel's weights are scaled by 10**U(-0.5, 0.5), so the channels' variances spread over
   two decades; the running mean and variance are the channel's measured moments (float64 forward
   pass on 32 calibration samples) perturbed by 0.1 std and exp(N(0, 0.2)), gamma ~ U(0.5, 1.5),
   beta ~ N(0, 0.2), epsilon 1e-5. Every parameter is rounded to fp16 first; the **fp32 twin** is
   the same graph with those fp16-representable values stored as fp32.
2. **Folding.** Each fp16 model goes through every tool via ``bench_fold.run_tool``: bnscope's
   library call (``load_model`` + ``fold_batchnorm``: float64 maths, rounded once to the model's
   dtype), onnxsim, onnxscript's rewriter (the Conv/ConvTranspose/Gemm BN rules), onnxoptimizer
   (``fuse_bn_into_conv``) and onnxruntime's ``ORT_ENABLE_BASIC`` saved graph
   (``optimized_model_filepath``).
3. **Error.** The unfolded fp16 model, every folded fp16 model and the fp32 twin run with
   onnxruntime (CPU, ``ORT_DISABLE_ALL``, 1 thread) on the same seeded fp16-representable inputs
   (``bench_fold.make_feeds``, batch 4). Per model and tool, the relative error against the fp32
   twin is ``max|y - y32| / max|y32|`` (``rel max``); ``rel L2`` is ``||y - y32||_2 / ||y32||_2``
   (both in float64). The table gives the mean and max over models (and the means over the
   Conv-only and the Gemm-BN models), and the geometric mean over the Conv-only models of the
   tool's ``rel max`` divided by bnscope's (paired: the same model and inputs; on Gemm-BN models a
   tool that leaves that BN is not comparable with one that folds it).
4. **Structure.** BN removed (sum over models), and whether every tensor keeps its dtype: every
   float initializer, Constant, graph input/output and inferred value is still fp16 and no Cast
   node was added.

A bf16 probe builds a one-Conv (and one-BN) bf16 model and tries onnxruntime CPU on it; the
result is printed under the table (on onnxruntime CPU Conv has no bf16 kernel, so bf16 folding
precision is not measured here).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks import bench_fold, common

SEED = 4000
TOOLS = ("bnscope", "onnxsim", "onnxscript", "onnxoptimizer", "ort_basic")
LABELS = {
    "unfolded": "unfolded fp16 (no fold)",
    "reference": "reference fold (float64 once, built here)",
    "bnscope": "bnscope (float64, rounded once)",
    "onnxsim": "onnxsim",
    "onnxscript": "onnxscript rewriter",
    "onnxoptimizer": "onnxoptimizer fuse_bn_into_conv",
    "ort_basic": "onnxruntime BASIC (saved graph)",
}
CAL_SAMPLES = 32
BATCH = 4
OPSET = 17


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _f16(a) -> np.ndarray:
    """Rounded to fp16, returned as float64 (the value both twins store)."""
    return np.asarray(a, dtype=np.float64).astype(np.float16).astype(np.float64)


def _conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """ONNX Conv, 3x3, stride 1, pads 1, float64; x [N, C, H, W], w [M, C, 3, 3]."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # N C H W 3 3
    y = np.einsum("nchwij,mcij->nmhw", win, w, optimize=True)
    return y if b is None else y + b[None, :, None, None]


def _bn_params(rng, z: np.ndarray, axis_reduce: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Running statistics near the measured moments of ``z`` per channel, fp16-representable."""
    mu, var = z.mean(axis=axis_reduce), z.var(axis=axis_reduce)
    c = mu.shape[0]
    return {
        "scale": _f16(rng.uniform(0.5, 1.5, c)),
        "B": _f16(rng.normal(0, 0.2, c)),
        "mean": _f16(mu + 0.1 * np.sqrt(var) * rng.standard_normal(c)),
        "var": _f16(var * np.exp(0.2 * rng.standard_normal(c))),
    }


def _bn_apply(z: np.ndarray, p: dict, eps: float) -> np.ndarray:
    shape = (1, -1) + (1,) * (z.ndim - 2)
    r = lambda k: p[k].reshape(shape)  # noqa: E731
    return r("scale") * (z - r("mean")) / np.sqrt(r("var") + eps) + r("B")


def make_spec(i: int) -> dict:
    """Model ``i``: layers and fp16-representable parameters (float64 arrays), seeded."""
    rng = np.random.default_rng(SEED + i)
    eps = 1e-5
    x = _f16(rng.standard_normal((CAL_SAMPLES, 3, 16, 16)))
    layers, c_in = [], 3
    for k in range(int(rng.integers(3, 6))):
        c_out = int(rng.choice([8, 16, 24, 32]))
        std = math.sqrt(2.0 / (9 * c_in)) * 10 ** rng.uniform(-0.5, 0.5, c_out)
        w = _f16(rng.standard_normal((c_out, c_in, 3, 3)) * std[:, None, None, None])
        b = _f16(rng.normal(0, 0.1, c_out)) if rng.random() < 0.5 else None
        z = _conv3x3(x, w, b)
        bn = _bn_params(rng, z, (0, 2, 3))
        x = np.maximum(_bn_apply(z, bn, eps), 0.0)
        layers.append({"kind": "conv", "name": f"l{k}", "W": w, "b": b, "bn": bn})
        c_in = c_out
    if i % 4 == 3:
        f_out = int(rng.choice([10, 16]))
        feat = x.mean(axis=(2, 3))
        std = math.sqrt(1.0 / c_in) * 10 ** rng.uniform(-0.5, 0.5, f_out)
        w = _f16(rng.standard_normal((f_out, c_in)) * std[:, None])
        b = _f16(rng.normal(0, 0.1, f_out))
        z = feat @ w.T + b
        layers.append({"kind": "gemm", "name": "fc", "W": w, "b": b, "bn": _bn_params(rng, z, (0,))})
    return {"index": i, "eps": eps, "layers": layers}


def folded_spec(spec: dict) -> dict:
    """``spec`` with every BN folded here, in float64, and rounded once to fp16: the floor of the
    round-once approach (``W' = W * s``, ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``)."""
    layers = []
    for ly in spec["layers"]:
        bn = ly["bn"]
        s = bn["scale"] / np.sqrt(bn["var"] + spec["eps"])
        b = ly["b"] if ly["b"] is not None else 0.0
        w = ly["W"] * s.reshape((-1,) + (1,) * (ly["W"].ndim - 1))
        layers.append({**ly, "W": _f16(w), "b": _f16((b - bn["mean"]) * s + bn["B"]), "bn": None})
    return {**spec, "layers": layers}


def build_model(spec: dict, dtype: int) -> onnx.ModelProto:
    """The graph of ``spec`` with every tensor of elem type ``dtype`` (FLOAT16 or FLOAT); a layer
    whose ``bn`` is None has no BN."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    inits, nodes = [], []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr.astype(np_dtype), name))
        return name

    h = "x"
    for ly in spec["layers"]:
        n = ly["name"]
        ins = [h, init(f"{n}.W", ly["W"])] + ([init(f"{n}.b", ly["b"])] if ly["b"] is not None else [])
        if ly["kind"] == "conv":
            nodes.append(
                helper.make_node("Conv", ins, [f"{n}.conv"], name=f"{n}.conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
            )
        else:
            nodes.append(helper.make_node("GlobalAveragePool", [h], ["gap"], name="gap"))
            nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
            ins[0] = "flat"
            nodes.append(helper.make_node("Gemm", ins, [f"{n}.conv"], name=f"{n}.gemm", transB=1))
        bn = ly["bn"]
        h = f"{n}.conv"
        if bn is not None:
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [h] + [init(f"{n}.bn.{k}", bn[k]) for k in ("scale", "B", "mean", "var")],
                    [f"{n}.bn"],
                    name=f"{n}.bn",
                    epsilon=spec["eps"],
                )
            )
            h = f"{n}.bn"
        if ly["kind"] == "conv":
            nodes.append(helper.make_node("Relu", [h], [f"{n}.relu"], name=f"{n}.relu"))
            h = f"{n}.relu"
    nodes.append(helper.make_node("Identity", [h], ["y"], name="out"))
    last = spec["layers"][-1]
    out_shape = ["N", last["W"].shape[0]] + ([16, 16] if last["kind"] == "conv" else [])
    graph = helper.make_graph(
        nodes,
        f"fp16_fold_{spec['index']}",
        [helper.make_tensor_value_info("x", dtype, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", dtype, out_shape)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bnscope-bench-fold-fp16"
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def float_types(model: onnx.ModelProto) -> tuple[set[str], int]:
    """(names of the float elem types of every tensor the model declares or infers, Cast nodes)."""
    types: set[int] = set()
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    types.update(t.data_type for t in g.initializer)
    types.update(a.t.data_type for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value")
    types.update(v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info])
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    names = {TensorProto.DataType.Name(t) for t in types if t in floats}
    return names, sum(n.op_type == "Cast" for n in g.node)


def run_model(path_or_model, feeds: dict) -> np.ndarray:
    sess = common.make_session(path_or_model, "disable", threads=1)
    return sess.run(["y"], feeds)[0]


def errors(y: np.ndarray, y32: np.ndarray) -> tuple[float, float]:
    d = y.astype(np.float64) - y32.astype(np.float64)
    r = y32.astype(np.float64)
    return float(np.abs(d).max() / np.abs(r).max()), float(np.linalg.norm(d) / np.linalg.norm(r))


def measure_model(i: int, work: Path, log) -> dict:
    spec = make_spec(i)
    m16, m32 = build_model(spec, TensorProto.FLOAT16), build_model(spec, TensorProto.FLOAT)
    src = work / f"m{i}.onnx"
    onnx.save(m16, src)
    feeds = bench_fold.make_feeds(str(src), BATCH, seed=SEED + i)
    y32 = run_model(m32, {k: v.astype(np.float32) for k, v in feeds.items()})
    n_bn = bench_fold._count_bn(m16)
    res = {"bn": n_bn, "layers": len(spec["layers"]), "gemm": spec["layers"][-1]["kind"] == "gemm", "tools": {}}
    y16 = run_model(str(src), feeds)
    res["tools"]["unfolded"] = {
        "ok": True,
        "bn_after": n_bn,
        "rel": errors(y16, y32),
        "types": ["FLOAT16"],
        "casts": 0,
        "dtype_ok": True,
    }
    y_ref = run_model(build_model(folded_spec(spec), TensorProto.FLOAT16), feeds)
    res["tools"]["reference"] = {
        "ok": True,
        "bn_after": 0,
        "rel": errors(y_ref, y32),
        "types": ["FLOAT16"],
        "casts": 0,
        "dtype_ok": True,
    }
    for tool in TOOLS:
        out = work / f"m{i}_{tool}.onnx"
        r: dict = {"ok": False}
        try:
            bench_fold.run_tool(tool, str(src), str(out), big=False)
            folded = onnx.load(out)
            types, casts = float_types(folded)
            r.update(
                bn_after=bench_fold._count_bn(folded),
                types=sorted(types),
                casts=casts,
                dtype_ok=types == {"FLOAT16"} and casts == 0,
            )
            y = run_model(str(out), feeds)
            r["rel"] = errors(y, y32)
            r["same_as_reference"] = bool(np.array_equal(y, y_ref))
            r["ok"] = True
        except Exception as exc:
            r["error"] = bench_fold._one_line(exc)
            log(f"  model {i} {tool}: {r['error']}")
        res["tools"][tool] = r
    return res


def bf16_probe() -> list[str]:
    """Can onnxruntime CPU run a bf16 Conv, or a bf16 BatchNormalization, at ORT_DISABLE_ALL? Opset 22,
    where ONNX's Conv admits bf16 (at opset 17 the model itself is invalid)."""
    import ml_dtypes

    notes = []
    rng = np.random.default_rng(SEED)
    bf = TensorProto.BFLOAT16

    def tensor(name, arr):
        t = helper.make_tensor(name, bf, arr.shape, arr.astype(ml_dtypes.bfloat16).view(np.uint16).tobytes(), raw=True)
        return t

    cases = {
        "Conv": (
            [helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
            [tensor("W", rng.standard_normal((4, 3, 3, 3)))],
        ),
        "BatchNormalization": (
            [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])],
            [tensor(k, rng.uniform(0.5, 1.5, 3)) for k in ("s", "b", "m", "v")],
        ),
    }
    for op, (nodes, inits) in cases.items():
        g = helper.make_graph(
            nodes,
            "bf16",
            [helper.make_tensor_value_info("x", bf, [1, 3, 8, 8])],
            [helper.make_tensor_value_info("y", bf, None)],
            inits,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 22)])
        m.ir_version = 10
        try:
            x = rng.standard_normal((1, 3, 8, 8)).astype(ml_dtypes.bfloat16)
            common.make_session(m, "disable", threads=1).run(None, {"x": x})
            notes.append(f"bf16 {op} (opset 22): runs on onnxruntime CPU")
        except Exception as exc:
            notes.append(f"bf16 {op} (opset 22): onnxruntime CPU refuses it ({bench_fold._one_line(exc)[:220]})")
    return notes


def fp16_kernel_note(work: Path) -> str:
    """How onnxruntime CPU runs fp16 Conv at ORT_DISABLE_ALL: its saved graph shows inserted Casts."""
    src, out = work / "m0.onnx", work / "m0_disable_all_saved.onnx"
    common.make_session(str(src), "disable", threads=1, optimized_path=out)
    m = onnx.load(out)
    ops = [n.op_type for n in m.graph.node]
    to = [a.i for n in m.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    return (
        f"onnxruntime CPU at ORT_DISABLE_ALL, model 0 (saved graph): {to.count(TensorProto.FLOAT)} Casts to fp32 "
        f"(input and parameters), {to.count(TensorProto.FLOAT16)} back to fp16, around {ops.count('Conv')} Conv / "
        f"{ops.count('BatchNormalization')} BN / {ops.count('Relu')} Relu: with one Cast back (the output) the "
        "graph ran in fp32 and no activation was rounded to fp16 between ops; the error measured here is the "
        "rounding of the stored (folded) parameters plus the output's"
    )


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    total_bn = sum(r["bn"] for r in results)
    for tool in ("unfolded", "reference", *TOOLS):
        per = [r["tools"][tool] for r in results]
        ok = [p for p in per if p["ok"]]
        rel = np.array([p["rel"][0] for p in ok])
        by_kind = {g: [p["rel"][0] for p, r in zip(per, results) if p["ok"] and r["gemm"] == g] for g in (False, True)}
        l2 = np.array([p["rel"][1] for p in ok])
        # paired with bnscope on the Conv-only models: on the Gemm-BN ones, tools that leave that BN
        # (run in fp32 on CPU) are not comparable with tools that fold it
        base = [
            (p["rel"][0], r["tools"]["bnscope"]["rel"][0])
            for p, r in zip(per, results)
            if p["ok"] and r["tools"]["bnscope"]["ok"] and not r["gemm"]
        ]
        removed = sum(r["bn"] - p["bn_after"] for p, r in zip(per, results) if p["ok"])
        bad_types = sorted({t for p in ok if not p["dtype_ok"] for t in p["types"]} - {"FLOAT16"})
        casts = sum(p["casts"] for p in ok)
        dtype_text = f"{sum(p['dtype_ok'] for p in ok)}/{len(per)}"
        if bad_types or casts:
            why = [", ".join(bad_types)] * bool(bad_types) + [f"{casts} Cast"] * bool(casts)
            dtype_text += " (" + "; ".join(why) + ")"
        rows.append(
            {
                "name": LABELS[tool],
                "n": f"{len(ok)}/{len(per)}",
                "rel_mean": rel.mean() if len(rel) else None,
                "rel_median": float(np.median(rel)) if len(rel) else None,
                "rel_max": rel.max() if len(rel) else None,
                "rel_conv": float(np.mean(by_kind[False])) if by_kind[False] else None,
                "rel_gemm": float(np.mean(by_kind[True])) if by_kind[True] else None,
                "l2_mean": l2.mean() if len(l2) else None,
                "vs_bnscope": math.exp(np.mean([math.log(a / b) for a, b in base])) if base else None,
                "bn_removed": f"{removed}/{total_bn}",
                "dtypes": dtype_text,
                "same": "-"
                if tool in ("unfolded", "reference")
                else f"{sum(p.get('same_as_reference', False) for p in per)}/{len(per)}",
            }
        )
    return rows


COLUMNS = [
    ("name", "tool", ""),
    ("n", "ran", ""),
    ("rel_mean", "rel max: mean", ".2e"),
    ("rel_median", "median", ".2e"),
    ("rel_max", "max", ".2e"),
    ("rel_conv", "mean, Conv-only models", ".2e"),
    ("rel_gemm", "mean, Gemm-BN models", ".2e"),
    ("l2_mean", "rel L2: mean", ".2e"),
    ("vs_bnscope", "x bnscope (geomean, Conv-only)", ".3f"),
    ("bn_removed", "BN removed", ""),
    ("dtypes", "all tensors fp16", ""),
    ("same", "output = reference fold's", ""),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=20)
    p.add_argument("--markdown", default=None, help="also write the table and notes here")
    args = p.parse_args(argv)
    command = common.command_line()
    print(f"$ {command}", flush=True)
    vers = bench_fold.versions()
    vtext = ", ".join(f"{k} {v}" for k, v in vers.items())
    print(f"versions: {vtext}", flush=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_fold_fp16_") as wd:
        work = Path(wd)
        results = []
        for i in range(args.models):
            results.append(measure_model(i, work, log))
            r = results[-1]
            log(
                f"model {i}: {r['layers']} layers, {r['bn']} BN{' (Gemm-BN)' if r['gemm'] else ''}: "
                + ", ".join(f"{t} {v['rel'][0]:.2e}" if v["ok"] else f"{t} failed" for t, v in r["tools"].items())
            )
        notes = [fp16_kernel_note(work), *bf16_probe()]
    rows = summarize(results)
    table = common.format_table(rows, COLUMNS)
    n_gemm = sum(r["gemm"] for r in results)
    head = (
        f"{args.models} fp16 models ({n_gemm} with Gemm-BN), {sum(r['bn'] for r in results)} BN; "
        f"reference: the fp32 twin; onnxruntime CPU, ORT_DISABLE_ALL, 1 thread, batch {BATCH}; "
        f"{time.perf_counter() - t0:.0f} s"
    )
    per_model = [
        "| model | layers | BN | " + " | ".join(("unfolded", "reference", *TOOLS)) + " |",
        "|---:|---:|---:|" + "---:|" * (len(TOOLS) + 2),
    ]
    for i, r in enumerate(results):
        cells = [
            f"{r['tools'][t]['rel'][0]:.2e}" if r["tools"][t]["ok"] else "failed"
            for t in ("unfolded", "reference", *TOOLS)
        ]
        layers = f"{r['layers']}{' +Gemm' if r['gemm'] else ''}"
        per_model.append(f"| {i} | {layers} | {r['bn']} | " + " | ".join(cells) + " |")
    text = "\n".join([head, "", table, "", *[f"- {n}" for n in notes]])
    print("\n" + text, flush=True)
    if args.markdown:
        Path(args.markdown).write_text(
            "\n".join(
                [
                    "# Fold precision on fp16 models (issue 4)",
                    "",
                    "Written by `benchmarks/bench_fold_fp16.py` "
                    "(see its docstring for the models and the error definitions).",
                    "",
                    f"Command: `{command}`",
                    "",
                    f"Date: {time.strftime('%Y-%m-%d %H:%M')}",
                    "",
                    f"Versions: {vtext}",
                    "",
                    text,
                    "",
                    "Per model, rel max (max|y - y32| / max|y32|):",
                    "",
                    *per_model,
                ]
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
