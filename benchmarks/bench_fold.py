"""Benchmark BN folding: bnscope against onnxsim, onnxoptimizer, onnxscript and onnxruntime.

Run it with a separate benchmark venv (the other tools are never project dependencies)::

    python3 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install -e . onnxsim onnxoptimizer onnxscript
    /tmp/benchvenv/bin/python benchmarks/bench_fold.py [--quick] [--skip-big] [--markdown FILE]

Three parts (``--parts coverage,time,latency`` picks some):

1. **coverage**: every model in ``sample_models/`` and ``../shared/real-models/`` (absent ones
   skipped) through every tool; per tool and model: BN removed, and whether the result is
   *valid*: ``onnx.checker`` full check passes, onnxruntime loads it, and on seeded random
   inputs its outputs match the original's, both run at ``ORT_DISABLE_ALL`` (onnxruntime would
   fold Conv+BN itself otherwise), within ``max|out - ref| <= 1e-3 * max|ref|`` per output (NaN
   must sit where the original has NaN). Batch 1 where the model fixes it, else 2. Each tool
   runs in its own subprocess, so a crash (even a segfault) is recorded, not fatal.
2. **time**: folding ResNet-50 (224) and a > 2 GB model with external data: bnscope's library
   call (``load_model`` + ``fold_batchnorm``) and full pipeline (``fold_model``, verification
   off) beside onnxruntime's BASIC-level saved graph, onnxsim, onnxscript and onnxoptimizer;
   wall time and peak RSS per run, each run in a fresh subprocess, tools interleaved per repeat;
   every tool's output of the first repeat is validated like in part 1.
3. **latency**: folded vs original on CPU at ``ORT_DISABLE_ALL``, ``BASIC`` and ``ALL``
   (ResNet-18 and MobileNetV3-small, 64x64, batch 16), all 12 sessions interleaved in shuffled
   rounds; medians and the folded/original ratio per level.

Nothing here is a pass/fail test; it prints tables (markdown) and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = ROOT / "sample_models"
REAL_DIR = (ROOT / ".." / "shared" / "real-models").resolve()
TOOLS = ("bnscope", "onnxsim", "onnxoptimizer", "onnxscript", "ort_basic")
TIME_TOOLS = (
    "bnscope_lib",
    "bnscope_pipeline",
    "bnscope_cli",
    "bnscope_verify",
    "ort_basic",
    "onnxsim",
    "onnxscript",
    "onnxoptimizer",
)
REL_TOL = 1e-3
SEED = 0


# =============================================================================================
# Worker side: one job per subprocess (``--worker JSON``); prints one JSON line as its result
# =============================================================================================


def _rss_kib(field: str) -> int:
    """VmRSS (current) or VmHWM (peak) of this process in KiB, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _count_bn(model) -> int:
    def walk(graph):
        n = 0
        for node in graph.node:
            n += node.op_type == "BatchNormalization"
            for attr in node.attribute:
                if attr.g.node:
                    n += walk(attr.g)
                for g in attr.graphs:
                    n += walk(g)
        return n

    return walk(model.graph)


def _bn_count_of_file(path: str) -> int:
    import onnx

    return _count_bn(onnx.load(path, load_external_data=False))


def _fuse_bn_rules():
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    return [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]


def _ort_basic_save(src: str, out: str, external: bool) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = out
    so.log_severity_level = 3
    if external:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", Path(out).name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_tool(tool: str, src: str, out: str, big: bool, data: str | None = None) -> dict:
    """Runs one folding tool on the model file ``src``, writing ``out`` (except bnscope_lib,
    which is the in-memory library call). ``data``: verification inputs (.npz) for
    bnscope_verify. Returns timings of the parts, in seconds."""
    t = {}
    t0 = time.perf_counter()
    if tool in ("bnscope", "bnscope_lib"):
        import onnx

        from bnscope.fold.plan import FoldOptions
        from bnscope.fold.rewrite import fold_batchnorm
        from bnscope.onnxio import model_io

        # load_model runs onnx.checker: a model that fails it (e.g. nodes not topologically
        # sorted) is refused with a BnscopeError, which the table shows as "refused"
        loaded = model_io.load_model(src)
        store = model_io.TensorStore(loaded)
        t["load"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        folded, records = fold_batchnorm(loaded.model, FoldOptions(), store)
        t["fold"] = time.perf_counter() - t1
        t["bn_after"] = _count_bn(folded)
        t["kept"] = {r.name: r.reason for r in records if not r.folded}
        if tool == "bnscope":
            if loaded.has_external_data:
                model_io.materialize_external_data(loaded, folded)
            onnx.save(folded, out)
    elif tool in ("bnscope_pipeline", "bnscope_verify"):
        from bnscope.workflows import fold as deploy
        from bnscope.workflows import options as fold_options

        verify_s = []
        real_verify = deploy.verify_fold

        def timed_verify(*args, **kwargs):
            v0 = time.perf_counter()
            try:
                return real_verify(*args, **kwargs)
            finally:
                verify_s.append(time.perf_counter() - v0)

        deploy.verify_fold = timed_verify
        choice = fold_options.DataChoice(path=Path(data)) if data else fold_options.DataChoice()
        res = deploy.fold_model(
            src, fold_options.FoldSettings(output=Path(out), verify=tool == "bnscope_verify", data=choice)
        )
        t["bn_after"] = res.bn_after
        if verify_s:
            t["verify"] = verify_s[0]
            t["verify_passed"] = res.passed
    elif tool == "bnscope_cli":
        # what a user runs: a fresh interpreter, imports, load, fold, checker, atomic save
        import resource

        proc = subprocess.run(
            [sys.executable, "-m", "bnscope", "-q", "fold", src, "-o", out, "--no-verify", "--format", "json"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"bnscope fold exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
        t["bn_after"] = json.loads(proc.stdout)["bn_after"]
        t["child_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    elif tool == "onnxsim":
        import onnx
        import onnxsim

        if big:
            _, ok = onnxsim.simplify(src, output_path=out)
        else:
            model_opt, ok = onnxsim.simplify(onnx.load(src))
            onnx.save(model_opt, out)
        t["check_ok"] = bool(ok)
    elif tool == "onnxoptimizer":
        import onnx
        import onnxoptimizer

        model = onnx.load(src)
        t["load"] = time.perf_counter() - t0
        opt = onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
        if big:
            onnx.save(
                opt,
                out,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=Path(out).name + ".data",
                size_threshold=1024,
            )
        else:
            onnx.save(opt, out)
    elif tool == "onnxscript":
        import onnx_ir as ir
        from onnxscript.rewriter import rewrite

        model = ir.load(src)
        t["load"] = time.perf_counter() - t0
        model = rewrite(model, pattern_rewrite_rules=_fuse_bn_rules())
        ir.save(model, out, external_data=(Path(out).name + ".data") if big else None)
    elif tool == "ort_basic":
        _ort_basic_save(src, out, external=big)
    else:
        raise ValueError(tool)
    t["total"] = time.perf_counter() - t0
    return t


def make_feeds(model_path: str, batch: int | None = None, seed: int = SEED) -> dict:
    """Seeded random inputs for every real graph input (initializers listed as inputs are
    left to their values). A fixed dimension is kept; a symbolic batch axis gets ``batch``
    (default 2), any other symbolic axis 1."""
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(model_path, load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = []
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            else:
                shape.append((batch or 2) if k == 0 else 1)
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype.kind == "f":
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[inp.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def _session(path: str, level: str = "disable"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _run(sess, feeds) -> dict:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def compare(got: dict, ref: dict) -> tuple[bool, float, str]:
    """(match, worst relative error, why not). Relative to max|ref| of each output."""
    import numpy as np

    worst = 0.0
    if set(got) != set(ref):
        return False, float("inf"), f"outputs differ: {sorted(set(got) ^ set(ref))}"
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape or g.dtype != r.dtype:
            return False, float("inf"), f"{name}: {g.dtype}{list(g.shape)} vs {r.dtype}{list(r.shape)}"
        if g.dtype.kind not in "fc":
            if not np.array_equal(g, r):
                return False, float("inf"), f"{name}: values differ"
            continue
        g64, r64 = g.astype(np.float64), r.astype(np.float64)
        if not np.array_equal(np.isnan(g64), np.isnan(r64)):
            return False, float("inf"), f"{name}: NaN pattern differs"
        fin = np.isfinite(r64)
        if not np.array_equal(np.isinf(g64), np.isinf(r64)) or not np.array_equal(
            g64[~fin & ~np.isnan(r64)], r64[~fin & ~np.isnan(r64)]
        ):
            return False, float("inf"), f"{name}: Inf pattern differs"
        if fin.any():
            scale = max(float(np.abs(r64[fin]).max()), 1e-12)
            rel = float(np.abs(g64[fin] - r64[fin]).max()) / scale
            worst = max(worst, rel)
    ok = worst <= REL_TOL
    return ok, worst, "" if ok else f"max rel error {worst:.2e} > {REL_TOL:g}"


def validate(original: str, candidates: dict[str, str], batch: int | None, ref_npz: str | None) -> dict:
    """Checks each candidate (tool -> path) against the original; see the module doc."""
    import numpy as np
    import onnx

    feeds = make_feeds(original, batch)
    ref, ref_error = None, None
    try:
        if ref_npz and Path(ref_npz).exists():
            with np.load(ref_npz) as z:
                ref = {k: z[k] for k in z.files}
        else:
            sess = _session(original)
            ref = _run(sess, feeds)
            del sess
            if ref_npz:
                np.savez(ref_npz, **ref)
    except Exception as exc:
        ref_error = _one_line(exc)
    out = {"ref_error": ref_error}
    for tool, path in candidates.items():
        r = {"checker": None, "ort_load": None, "match": None, "max_rel": None, "why": ""}
        try:
            onnx.checker.check_model(path, full_check=True)
            r["checker"] = True
        except Exception as exc:
            r["checker"], r["why"] = False, "checker: " + _one_line(exc)
        try:
            sess = _session(path)
            r["ort_load"] = True
            if ref is not None:
                got = _run(sess, feeds)
                r["match"], r["max_rel"], why = compare(got, ref)
                if why:
                    r["why"] = (r["why"] + "; " if r["why"] else "") + why
            del sess
        except Exception as exc:
            if r["ort_load"] is None:
                r["ort_load"] = False
                r["why"] = (r["why"] + "; " if r["why"] else "") + "onnxruntime load: " + _one_line(exc)
            else:
                r["match"] = False
                r["why"] = (r["why"] + "; " if r["why"] else "") + "onnxruntime run: " + _one_line(exc)
        out[tool] = r
    return out


def pipeline_verdict(src: str, out: str) -> dict:
    """What ``bnscope fold`` (full pipeline, verification on) says about the model."""
    from bnscope.errors import BnscopeError
    from bnscope.workflows.fold import fold_model
    from bnscope.workflows.options import FoldSettings

    try:
        res = fold_model(src, FoldSettings(output=Path(out)))
    except BnscopeError as exc:
        return {"verdict": "refused", "why": _one_line(exc)}
    status = "written" if res.output else "verification failed"
    return {
        "verdict": status,
        "bn_after": res.bn_after,
        "why": "" if res.output else str([o for v in res.verification for o in v.outputs]),
    }


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


def worker(job: dict) -> dict:
    kind = job["kind"]
    base_rss = _rss_kib("VmRSS")
    if kind == "tool":
        t = run_tool(job["tool"], job["src"], job["out"], job.get("big", False), job.get("data"))
        if "bn_after" not in t and Path(job["out"]).exists():
            t["bn_after"] = _bn_count_of_file(job["out"])
        t.update(base_rss_mib=base_rss / 1024, peak_rss_mib=_rss_kib("VmHWM") / 1024)
        if "child_peak_rss_mib" in t:  # the CLI ran in its own process: its peak, from a cold start
            t.update(base_rss_mib=None, peak_rss_mib=t.pop("child_peak_rss_mib"))
        return t
    if kind == "validate":
        return validate(job["original"], job["candidates"], job.get("batch"), job.get("ref_npz"))
    if kind == "pipeline":
        return pipeline_verdict(job["src"], job["out"])
    raise ValueError(kind)


def _import_tool_modules(job: dict) -> None:
    """Import a tool's modules before the base RSS is read, so peak - base is the work."""
    if job.get("kind") != "tool":
        return
    tool = job["tool"]
    import onnx  # noqa: F401

    if tool.startswith("bnscope"):
        import bnscope.fold.rewrite
        import bnscope.workflows.fold  # noqa: F401
    elif tool == "onnxsim":
        import onnxsim  # noqa: F401
    elif tool == "onnxoptimizer":
        import onnxoptimizer  # noqa: F401
    elif tool == "onnxscript":
        import onnx_ir  # noqa: F401
        import onnxscript.rewriter  # noqa: F401

        _fuse_bn_rules()
    elif tool == "ort_basic":
        import onnxruntime  # noqa: F401


def worker_main(arg: str) -> int:
    job = json.loads(arg)
    try:
        _import_tool_modules(job)
        result = {"ok": True, **worker(job)}
    except BaseException as exc:
        result = {
            "ok": False,
            "error": _one_line(exc),
            "error_type": type(exc).__name__,
            "traceback": traceback.format_exc()[-2000:],
        }
        if job.get("kind") == "tool":
            result["peak_rss_mib"] = _rss_kib("VmHWM") / 1024
    print("@@RESULT@@" + json.dumps(result, default=str), flush=True)
    return 0


# =============================================================================================
# Parent side
# =============================================================================================


def spawn(job: dict, timeout: float) -> dict:
    """Runs one job in a fresh interpreter; a crash, signal or timeout becomes a result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f} s", "wall": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("@@RESULT@@"):
            res = json.loads(line[len("@@RESULT@@") :])
            res["wall"] = wall
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    why = f"process died (exit {proc.returncode})" + (f": {' | '.join(tail)}" if tail else "")
    return {"ok": False, "error": why[:400], "wall": wall}


def coverage_models() -> list[Path]:
    models = sorted(SAMPLE_DIR.glob("*.onnx"))
    if REAL_DIR.is_dir():
        models += sorted(REAL_DIR.glob("*.onnx"))
    return models


def fixed_batch(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return None  # fixed: make_feeds keeps it (1 for every fixed-batch model here)
    return 2


def part_coverage(work: Path, log) -> dict:
    rows = []
    for path in coverage_models():
        bn_before = _bn_count_of_file(str(path))
        row = {
            "model": path.name,
            "where": "real" if path.parent == REAL_DIR else "sample",
            "bn": bn_before,
            "tools": {},
            "orig_checker": _checker_text(path),
        }
        mdir = work / path.stem
        mdir.mkdir(parents=True, exist_ok=True)
        outputs = {}
        for tool in TOOLS:
            out = mdir / f"{tool}.onnx"
            res = spawn({"kind": "tool", "tool": tool, "src": str(path), "out": str(out)}, 600)
            cell = {"crash": None if res["ok"] else res["error"], "seconds": res.get("total")}
            if res.get("error_type") == "BnscopeError":  # a clean refusal, not a crash
                cell["crash"], cell["refused"] = None, res["error"]
            if res["ok"] and out.exists():
                cell["bn_after"] = res.get("bn_after", _bn_count_of_file(str(out)))
                cell["removed"] = bn_before - cell["bn_after"]
                outputs[tool] = str(out)
                if tool == "bnscope":
                    cell["kept"] = res.get("kept", {})
                if tool == "onnxsim":
                    cell["check_ok"] = res.get("check_ok")
            elif res["ok"]:
                cell["crash"] = "no output written"
            elif cell.get("refused"):
                cell["removed"] = 0
            row["tools"][tool] = cell
        batch = fixed_batch(path)
        val = spawn({"kind": "validate", "original": str(path), "candidates": outputs, "batch": batch}, 600)
        if not val["ok"]:  # one candidate crashed the validator: one at a time
            val = {"ref_error": None}
            for tool, out in outputs.items():
                one = spawn({"kind": "validate", "original": str(path), "candidates": {tool: out}, "batch": batch}, 600)
                val[tool] = (
                    one.get(tool)
                    if one["ok"]
                    else {"checker": None, "ort_load": False, "match": None, "why": "validator died: " + one["error"]}
                )
                if one["ok"]:
                    val["ref_error"] = one.get("ref_error")
        row["ref_error"] = val.get("ref_error")
        for tool in TOOLS:
            cell = row["tools"][tool]
            if tool in outputs:
                v = val.get(tool, {})
                cell.update(
                    checker=v.get("checker"),
                    ort_load=v.get("ort_load"),
                    match=v.get("match"),
                    max_rel=v.get("max_rel"),
                    why=v.get("why", ""),
                )
                if row["ref_error"]:
                    cell["valid"] = bool(v.get("checker") and v.get("ort_load"))
                    cell["valid_note"] = "no reference (original does not run in onnxruntime)"
                else:
                    cell["valid"] = bool(v.get("checker") and v.get("ort_load") and v.get("match"))
            else:
                cell["valid"] = False
        pipe = spawn({"kind": "pipeline", "src": str(path), "out": str(mdir / "pipeline.onnx")}, 600)
        row["pipeline"] = pipe if pipe["ok"] else {"verdict": "crash", "why": pipe["error"]}
        rows.append(row)
        log(
            f"  {path.name}: BN {bn_before}; "
            + ", ".join(f"{t} {_cell_text(row['tools'][t], row)}" for t in TOOLS)
            + f"; pipeline {row['pipeline']['verdict']}"
        )
        shutil.rmtree(mdir, ignore_errors=True)
    return {"rows": rows}


def _checker_text(path: Path) -> str:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        return "ok"
    except Exception as exc:
        return "fails: " + _one_line(exc)


def _cell_text(cell: dict, row: dict) -> str:
    if cell.get("crash"):
        return "crash"
    if cell.get("refused"):
        return "refused"
    mark = "*" if row.get("ref_error") and cell.get("valid") else ""
    return f"{cell['removed']}/{'valid' if cell['valid'] else 'INVALID'}{mark}"


def coverage_markdown(cov: dict) -> str:
    rows = cov["rows"]
    head = "| model | original passes checker | BN | " + " | ".join(TOOLS) + " | bnscope pipeline |"
    lines = [head, "|" + "---|" * (len(TOOLS) + 4)]
    totals = {t: [0, 0, 0, 0, 0] for t in TOOLS}  # removed, valid, outputs, crashes, refusals
    for row in rows:
        cells = []
        for t in TOOLS:
            c = row["tools"][t]
            cells.append(_cell_text(c, row))
            totals[t][0] += c.get("removed", 0) or 0
            totals[t][1] += bool(c.get("valid"))
            totals[t][2] += "bn_after" in c
            totals[t][3] += bool(c.get("crash"))
            totals[t][4] += bool(c.get("refused"))
        chk = "yes" if row["orig_checker"] == "ok" else "**no**"
        lines.append(
            f"| {row['model']} | {chk} | {row['bn']} | " + " | ".join(cells) + f" | {row['pipeline']['verdict']} |"
        )
    nbn = sum(r["bn"] for r in rows)
    lines.append(
        f"| **total ({len(rows)} models)** | | **{nbn}** | "
        + " | ".join(
            f"**{v[0]} removed; {v[1]}/{v[2]} outputs valid; {v[3]} crash, {v[4]} refused**" for v in totals.values()
        )
        + f" | {sum(r['pipeline']['verdict'] == 'written' for r in rows)} written |"
    )
    notes = [
        "",
        "Cells: BN removed / validity; `refused`: a clean error (BnscopeError), no output; "
        "`crash`: an exception or a dead process. `*`: the original does not run in onnxruntime, so "
        "valid means checker + load only. Failures and notes:",
        "",
    ]
    for row in rows:
        if row["orig_checker"] != "ok":
            notes.append(f"- {row['model']}: the original {row['orig_checker']}")
        if row.get("ref_error"):
            notes.append(f"- {row['model']}: reference run failed: {row['ref_error']}")
        for t in TOOLS:
            c = row["tools"][t]
            if c.get("crash"):
                notes.append(f"- {row['model']} / {t}: crashed: {c['crash']}")
            elif c.get("refused"):
                notes.append(f"- {row['model']} / {t}: refused: {c['refused']}")
            elif not c.get("valid") or c.get("why"):
                notes.append(f"- {row['model']} / {t}: {'INVALID' if not c.get('valid') else 'note'}: {c.get('why')}")
            if t == "onnxsim" and c.get("check_ok") is False:
                notes.append(f"- {row['model']} / onnxsim: simplify() returned check_ok=False")
        p = row["pipeline"]
        if p["verdict"] != "written":
            notes.append(f"- {row['model']} / bnscope pipeline: {p['verdict']}: {p.get('why', '')}")
    return "\n".join(lines + notes)


# ---------------------------------------------------------------------------------------------
# Part 2: fold time and peak RSS
# ---------------------------------------------------------------------------------------------


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def time_case(
    name: str,
    src: Path,
    work: Path,
    repeats: int,
    tools: tuple[str, ...],
    big: bool,
    timeout: float,
    log,
    data: Path | None = None,
) -> dict:
    runs = {t: [] for t in tools}
    skip: dict[str, str] = {}
    validated = {}
    for rep in range(repeats):
        order = list(tools[rep % len(tools) :] + tools[: rep % len(tools)])  # rotate positions
        for tool in order:
            if tool in skip:
                continue
            outdir = work / f"{name}_{tool}"
            shutil.rmtree(outdir, ignore_errors=True)
            outdir.mkdir(parents=True)
            out = outdir / "out.onnx"
            res = spawn(
                {
                    "kind": "tool",
                    "tool": tool,
                    "src": str(src),
                    "out": str(out),
                    "big": big,
                    "data": str(data) if data else None,
                },
                timeout,
            )
            runs[tool].append(res)
            log(
                f"  {name} rep {rep + 1}/{repeats} {tool}: "
                + (
                    f"{res.get('total', 0):.2f} s, peak RSS {res.get('peak_rss_mib', 0):.0f} MiB"
                    if res["ok"]
                    else f"FAILED: {res['error']}"
                )
            )
            if not res["ok"]:
                skip[tool] = res["error"]  # a tool that cannot do it is not retried
            elif rep == 0 and out.exists():
                val = spawn(
                    {
                        "kind": "validate",
                        "original": str(src),
                        "candidates": {tool: str(out)},
                        "batch": 4,
                        "ref_npz": str(work / f"{name}_ref.npz"),
                    },
                    timeout,
                )
                validated[tool] = val.get(tool) if val["ok"] else {"why": "validator died: " + val["error"]}
                if val["ok"] and val.get("ref_error"):
                    validated[tool]["why"] = "reference failed: " + val["ref_error"]
                log(f"    validated: {validated[tool]}")
            shutil.rmtree(outdir, ignore_errors=True)
    summary = {}
    for tool in tools:
        ok = [r for r in runs[tool] if r["ok"]]
        summary[tool] = {
            "runs": len(runs[tool]),
            "ok_runs": len(ok),
            "error": skip.get(tool),
            "median_s": _median([r.get("total") for r in ok]),
            "all_s": [round(r["total"], 3) for r in ok],
            "median_fold_s": _median([r.get("fold") for r in ok]),
            "median_load_s": _median([r.get("load") for r in ok]),
            "median_verify_s": _median([r.get("verify") for r in ok]),
            "verify_passed": all(r.get("verify_passed", True) for r in ok),
            "peak_rss_mib": _median([r.get("peak_rss_mib") for r in ok])
            if ok
            else _median([r.get("peak_rss_mib") for r in runs[tool]]),
            "base_rss_mib": _median([r.get("base_rss_mib") for r in ok]),
            "bn_after": ok[0].get("bn_after") if ok else None,
            "validation": validated.get(tool),
        }
    return summary


def time_markdown(name: str, bn: int, summary: dict, size_note: str) -> str:
    lines = [
        f"**{name}** ({size_note}, {bn} BN)",
        "",
        "| tool | median s | runs (s) | peak RSS MiB (import baseline) | BN left | output valid |",
        "|---|---|---|---|---|---|",
    ]
    for tool, s in summary.items():
        if s["median_s"] is None:
            lines.append(f"| {tool} | failed | - | {_fmt(s['peak_rss_mib'], 0)} | - | {s['error']} |")
            continue
        med = f"{s['median_s']:.2f}"
        if s.get("median_fold_s") is not None and tool == "bnscope_lib":
            med += f" (load {s['median_load_s']:.2f} + fold_batchnorm {s['median_fold_s']:.2f})"
        if s.get("median_verify_s") is not None:
            med += f" (verification {s['median_verify_s']:.2f}, {'passed' if s['verify_passed'] else 'FAILED'})"
        v = s.get("validation")
        if v is None:
            vtxt = "not checked" if tool != "bnscope_lib" else "(in memory; see pipeline)"
        else:
            good = v.get("checker") and v.get("ort_load") and v.get("match")
            vtxt = ("yes" if good else "NO") + (
                f" (max rel {v['max_rel']:.1e})" if v.get("max_rel") is not None else ""
            )
            if not good:
                vtxt += f": {v.get('why')}"
        lines.append(
            f"| {tool} | {med} | {', '.join(f'{x:.2f}' for x in s['all_s'])} | "
            f"{_fmt(s['peak_rss_mib'], 0)} ({_fmt(s['base_rss_mib'], 0)}) | {s['bn_after']} | {vtxt} |"
        )
    return "\n".join(lines)


def _fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def _verification_npz(models, name: str, work: Path, **kwargs) -> Path:
    """32 samples of the model's own distribution for bnscope_verify (fold's default, 4 batches of 8):
    the big model's H and W are symbolic, so seeded random data cannot be drawn for it."""
    import numpy as np

    batches = list(models.calibration_batches(name, batch=8, batches=4, seed=2, **kwargs))
    path = work / f"{name}_verify.npz"
    np.savez(path, input=np.concatenate([b["input"] for b in batches]))
    return path


def part_time(work: Path, args, log) -> dict:
    sys.path.insert(0, str(ROOT))
    import onnx

    from benchmarks import models

    out = {}
    reps = 1 if args.quick else args.repeats
    work.mkdir(parents=True, exist_ok=True)
    r50_path = work / "resnet50_like_224.onnx"
    t0 = time.perf_counter()
    r50 = models.resnet50_like(224, stats_samples=0 if args.quick else 16)
    onnx.save(r50, str(r50_path))
    log(f"  built resnet50_like(224) in {time.perf_counter() - t0:.1f} s ({r50_path.stat().st_size / 1e6:.0f} MB)")
    out["resnet50"] = {
        "bn": _count_bn(r50),
        "bytes": r50_path.stat().st_size,
        "summary": time_case(
            "resnet50",
            r50_path,
            work,
            reps,
            TIME_TOOLS,
            False,
            900,
            log,
            _verification_npz(models, "resnet50", work, size=224),
        ),
    }
    del r50
    if args.skip_big:
        out["big"] = {"skipped": "--skip-big"}
        return out
    big_dir = work / "big"
    t0 = time.perf_counter()
    big_path = models.big_external_model(big_dir, target_bytes=args.big_bytes)
    build_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in big_dir.iterdir())
    log(f"  built big_external_model in {build_s:.1f} s ({size / 1e9:.2f} GB)")
    with open(big_dir / "weights.bin", "rb") as f:  # warm the page cache for every tool alike
        while f.read(64 << 20):
            pass
    big_reps = 1 if args.quick else args.big_repeats
    out["big"] = {
        "bn": _bn_count_of_file(str(big_path)),
        "bytes": size,
        "build_s": build_s,
        "summary": time_case(
            "big",
            big_path,
            work,
            big_reps,
            TIME_TOOLS,
            True,
            1200,
            log,
            _verification_npz(models, "big_external", work),
        ),
    }
    shutil.rmtree(big_dir, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# Part 3: latency folded vs original
# ---------------------------------------------------------------------------------------------


def part_latency(args, log) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import onnxruntime as ort

    from benchmarks import models
    from bnscope.fold.rewrite import fold_batchnorm

    levels = {
        "DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    threads = args.threads
    cases = {
        "resnet18_like": ("resnet18", models.resnet18_like(64)),
        "mobilenetv3_small_like": ("mobilenetv3_small", models.mobilenetv3_small_like(64)),
    }
    sessions, feeds, info = {}, {}, {}
    for mname, (cal, model) in cases.items():
        folded, records = fold_batchnorm(model)
        info[mname] = {"bn": _count_bn(model), "bn_after_fold": _count_bn(folded)}
        feeds[mname] = next(models.calibration_batches(cal, batch=16, batches=1, size=64, seed=1))
        for variant, m in (("original", model), ("folded", folded)):
            blob = m.SerializeToString()
            for lname, level in levels.items():
                so = ort.SessionOptions()
                so.graph_optimization_level = level
                so.intra_op_num_threads = threads
                so.inter_op_num_threads = 1
                so.log_severity_level = 3
                sessions[(mname, variant, lname)] = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
        # outputs agree at every level (the folded model against the unoptimised original)
        ref = sessions[(mname, "original", "DISABLE_ALL")].run(None, feeds[mname])[0]
        for lname in levels:
            got = sessions[(mname, "folded", lname)].run(None, feeds[mname])[0]
            info[mname][f"max_rel_{lname}"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    rounds = 3 if args.quick else args.latency_rounds
    per_round = 5 if args.quick else args.latency_runs
    # Interleaving: each round visits the 6 (model, level) pairs in a shuffled order and, per
    # pair, alternates original and folded run by run (who goes first is random), so both see
    # the same machine load; per-pair ratios of adjacent runs are kept too.
    times = {k: [] for k in sessions}
    pair_ratios = {(m, lv): [] for m in cases for lv in levels}
    rng = random.Random(SEED)
    pairs = list(pair_ratios)
    for _ in range(rounds):
        rng.shuffle(pairs)
        for mname, lname in pairs:
            feed = feeds[mname]
            so, sf = sessions[(mname, "original", lname)], sessions[(mname, "folded", lname)]
            for _ in range(2):
                so.run(None, feed)
                sf.run(None, feed)
            for _ in range(per_round):
                first = rng.random() < 0.5
                t = {}
                for variant in ("original", "folded") if first else ("folded", "original"):
                    sess = so if variant == "original" else sf
                    t0 = time.perf_counter()
                    sess.run(None, feed)
                    t[variant] = time.perf_counter() - t0
                    times[(mname, variant, lname)].append(t[variant])
                pair_ratios[(mname, lname)].append(t["folded"] / t["original"])
    result = {"threads": threads, "rounds": rounds, "runs_per_round": per_round, "models": {}}
    for mname in cases:
        rows = {}
        for lname in levels:
            o, f = (times[(mname, v, lname)] for v in ("original", "folded"))
            pr = sorted(pair_ratios[(mname, lname)])
            rows[lname] = {
                "original_ms": statistics.median(o) * 1e3,
                "folded_ms": statistics.median(f) * 1e3,
                "ratio": statistics.median(f) / statistics.median(o),
                "paired_ratio_median": statistics.median(pr),
                "paired_ratio_iqr": [pr[len(pr) // 4], pr[(3 * len(pr)) // 4]],
                "original_min_ms": min(o) * 1e3,
                "folded_min_ms": min(f) * 1e3,
                "min_ratio": min(f) / min(o),
            }
        result["models"][mname] = {**info[mname], "levels": rows}
        log(
            f"  {mname}: "
            + ", ".join(
                f"{k} {v['original_ms']:.2f} -> {v['folded_ms']:.2f} ms "
                f"(x{v['ratio']:.3f}, paired x{v['paired_ratio_median']:.3f})"
                for k, v in rows.items()
            )
        )
    return result


def latency_markdown(lat: dict) -> str:
    lines = [
        f"CPUExecutionProvider, intra-op threads {lat['threads']}, batch 16, 64x64; "
        f"{lat['rounds']} shuffled rounds; per round and (model, level), {lat['runs_per_round']} "
        "alternating original/folded run pairs after 2 warm-up runs each.",
        "",
        "| model | level | original ms (median) | folded ms (median) | folded/original (medians) | "
        "paired ratio median [IQR] | min ms orig / folded (ratio) | max rel diff vs original@DISABLE_ALL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mname, m in lat["models"].items():
        for lname, r in m["levels"].items():
            lo, hi = r["paired_ratio_iqr"]
            lines.append(
                f"| {mname} ({m['bn']} BN -> {m['bn_after_fold']}) | {lname} | {r['original_ms']:.2f} | "
                f"{r['folded_ms']:.2f} | **{r['ratio']:.3f}** | {r['paired_ratio_median']:.3f} "
                f"[{lo:.3f}, {hi:.3f}] | {r['original_min_ms']:.2f} / {r['folded_min_ms']:.2f} ({r['min_ratio']:.3f}) | "
                f"{m[f'max_rel_{lname}']:.1e} |"
            )
    lines += ["", "GPU-provider latency: not run (no GPU on this machine)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def versions() -> dict:
    out = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "bnscope"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        out["bnscope commit"] = head + (" (bnscope/ has uncommitted changes)" if dirty else "")
    except Exception:
        pass
    for mod in ("bnscope", "onnx", "onnxruntime", "numpy", "onnxsim", "onnxoptimizer", "onnxscript", "onnx_ir"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception as exc:
            out[mod] = f"NOT AVAILABLE ({_one_line(exc)})"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one repeat, few latency rounds, random ResNet-50 stats")
    p.add_argument("--skip-big", action="store_true", help="skip the > 2 GB external-data model")
    p.add_argument("--parts", default="coverage,time,latency")
    p.add_argument("--repeats", type=int, default=5, help="fold-time repeats for ResNet-50")
    p.add_argument("--big-repeats", type=int, default=3, help="fold-time repeats for the > 2 GB model")
    p.add_argument("--big-bytes", type=float, default=2.3e9)
    p.add_argument("--latency-rounds", type=int, default=12)
    p.add_argument("--latency-runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (latency)")
    p.add_argument("--workdir", default=None, help="temp folder (default: a new one in $TMPDIR, deleted)")
    p.add_argument("--json", default=None, help="write all results as JSON here")
    p.add_argument("--markdown", default=None, help="write the tables as markdown here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)

    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"$ {command}", flush=True)
    parts = set(args.parts.split(","))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = {"command": command, "versions": versions(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), flush=True)
    md = [f"Command: `{command}`", "", "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items())]
    ctx = contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory(prefix="bench_fold_")
    with ctx as wd:
        work = Path(wd)
        work.mkdir(parents=True, exist_ok=True)
        if "coverage" in parts:
            log("coverage ...")
            t0 = time.perf_counter()
            results["coverage"] = part_coverage(work / "coverage", log)
            text = coverage_markdown(results["coverage"])
            print(f"\n## Coverage ({time.perf_counter() - t0:.0f} s)\n\n{text}", flush=True)
            md += ["", "## Coverage", "", text]
        if "latency" in parts:
            log("latency ...")
            results["latency"] = part_latency(args, log)
            text = latency_markdown(results["latency"])
            print(f"\n## Latency\n\n{text}", flush=True)
            md += ["", "## Latency", "", text]
        if "time" in parts:
            log("fold time ...")
            results["time"] = part_time(work / "time", args, log)
            texts = []
            r = results["time"]["resnet50"]
            texts.append(time_markdown("resnet50_like(224)", r["bn"], r["summary"], f"{r['bytes'] / 1e6:.0f} MB"))
            b = results["time"]["big"]
            if "skipped" in b:
                texts.append(f"> 2 GB model: skipped ({b['skipped']})")
            else:
                texts.append(
                    time_markdown(
                        "big_external_model",
                        b["bn"],
                        b["summary"],
                        f"{b['bytes'] / 1e9:.2f} GB external data, built in {b['build_s']:.0f} s",
                    )
                )
            text = "\n\n".join(texts)
            print(f"\n## Fold time\n\n{text}", flush=True)
            md += ["", "## Fold time", "", text]
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
