"""Shared benchmark helpers: sessions, interleaved timing, medians/ratios, peak memory.

Timing on a small noisy machine: build every candidate first, then call
:func:`interleaved`, which runs each candidate once per round in a rotating order (and
reversed on odd rounds), so slow drift (thermal, neighbours, page cache) lands on every
candidate alike. Report medians; :func:`summarize` also gives the *paired* ratio (the median
over rounds of candidate/baseline measured in the same round), which cancels drift better
than a ratio of medians.

Memory: ``ru_maxrss`` is a high-water mark for the whole process, so comparing two workloads
in one process measures the larger one twice. :func:`measure_in_subprocess` runs a function in
a fresh interpreter (``spawn``) and reports its peak over the high-water mark left by imports;
:func:`command_peak_memory` does the same for a command line (``os.wait4`` gives that child's
own rusage).
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "none": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}


# ---------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------


def make_session(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    opt_level: str = "all",
    threads: int = 2,
    *,
    providers: Sequence = ("CPUExecutionProvider",),
    optimized_path: str | os.PathLike | None = None,
    **config: str,
):
    """An onnxruntime ``InferenceSession`` for benchmarking.

    ``model`` is a ModelProto, serialized bytes or a path (use a path for a model with external
    data). ``opt_level`` is one of ``OPT_LEVELS`` (or an ``ORT_*`` name). ``threads`` intra-op
    threads, 1 inter-op thread, sequential execution, no thread spinning after a run (so an
    idle candidate does not steal a core from the next one). ``optimized_path`` saves the
    optimised graph; extra ``config`` entries go to ``add_session_config_entry``.
    """
    import onnxruntime as ort

    level = OPT_LEVELS.get(opt_level, opt_level)
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    return ort.InferenceSession(model, so, providers=list(providers))


def run_all(session, batches: Sequence[Mapping[str, np.ndarray]], outputs=None) -> list:
    """Runs ``session`` on every batch; returns the last batch's outputs."""
    out = None
    for feed in batches:
        out = session.run(outputs, feed)
    return out


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def time_fn(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def interleaved(
    candidates: Mapping[str, Callable[[], Any]],
    rounds: int = 5,
    inner: int = 1,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Times every candidate once per round, alternating the order, to cancel drift.

    Returns ``{name: [seconds per call, one per round]}``; each value is the mean over ``inner``
    back-to-back calls. Round ``r`` runs the candidates rotated by ``r`` and reversed when ``r``
    is odd, so no candidate always runs first or right after the same neighbour. ``warmup``
    untimed calls per candidate come first (in order).
    """
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        if r % 2:
            order.reverse()
        for name in order:
            fn = candidates[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
        if progress:
            progress(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.1f} ms" for n in names))
    return times


def summarize(times: Mapping[str, Sequence[float]], baseline: str | None = None, per: int = 1) -> list[dict[str, Any]]:
    """Rows ``{name, median_ms, min_ms, q1_ms, q3_ms, ratio, paired_ratio, n}``.

    Times are divided by ``per`` (e.g. batches per call, for ms/batch). ``ratio`` is median over
    the baseline's median; ``paired_ratio`` the median of the per-round ratios (needs the same
    number of rounds, as :func:`interleaved` gives). ``baseline`` defaults to the first name.
    """
    names = list(times)
    baseline = baseline or names[0]
    base = np.asarray(times[baseline], dtype=float)
    rows = []
    for name in names:
        t = np.asarray(times[name], dtype=float)
        q1, med, q3 = np.percentile(t, [25, 50, 75])
        row = {
            "name": name,
            "median_ms": med * 1e3 / per,
            "min_ms": t.min() * 1e3 / per,
            "q1_ms": q1 * 1e3 / per,
            "q3_ms": q3 * 1e3 / per,
            "ratio": med / float(np.median(base)),
            "paired_ratio": None,
            "n": len(t),
        }
        if len(t) == len(base):
            row["paired_ratio"] = float(np.median(t / base))
        rows.append(row)
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table; ``columns`` are (key, header, format spec) e.g. ("ratio", "x", ".2f");
    columns with a format spec are right-aligned, text columns (spec "") left-aligned."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" if not spec else "---:" for _, _, spec in columns) + "|"
    lines = [head, sep]
    for row in rows:
        cells = []
        for key, _, spec in columns:
            v = row.get(key)
            cells.append("-" if v is None else format(v, spec) if spec else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------------------------------
# Environment and command line
# ---------------------------------------------------------------------------------------------


def command_line() -> str:
    """The exact command that started this process (``sys.orig_argv``), shell-quoted."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return shlex.join(argv)


def environment() -> dict[str, Any]:
    """Versions and machine facts worth printing above a result table."""
    import onnxruntime as ort

    return {
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _maxrss_to_mb(value: float) -> float:
    # Linux reports KiB, macOS bytes
    return value / (2**20 if sys.platform == "darwin" else 1024)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (``ru_maxrss``)."""
    return _maxrss_to_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB (Linux ``/proc``; else the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def _child(conn, fn, args, kwargs) -> None:
    try:
        before_peak, before_now = peak_rss_mb(), current_rss_mb()
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
        conn.send(
            (
                "ok",
                {
                    "result": result,
                    "seconds": seconds,
                    "peak_rss_mb": peak_rss_mb(),
                    "baseline_rss_mb": before_now,
                    "baseline_peak_mb": before_peak,
                },
            )
        )
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def measure_in_subprocess(fn: Callable, *args, timeout: float | None = None, **kwargs) -> dict[str, Any]:
    """Runs ``fn(*args, **kwargs)`` in a fresh interpreter and measures its memory.

    ``fn`` and its arguments must be picklable (a module-level function; not a lambda) and
    its module importable from a fresh process (a script needs an ``if __name__ ==
    "__main__":`` guard). Returns ``{result, seconds, peak_rss_mb, baseline_rss_mb,
    baseline_peak_mb, delta_mb}``: the child's peak RSS over its life, its RSS and peak just
    before the call (imports, arguments), and ``delta_mb = peak_rss_mb - baseline_rss_mb``,
    the memory the call itself added. Exceptions in the child become ``RuntimeError``.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs))
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            proc.kill()
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} exceeded {timeout} s")
        status, payload = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(
            f"the child process died with exit code {proc.exitcode}: see its stderr above (a "
            "negative code is a signal, -9 often the OOM killer; a calling script needs an "
            "'if __name__ == \"__main__\":' guard)"
        ) from None
    finally:
        proc.join()
        parent.close()
    if status != "ok":
        raise RuntimeError(f"in the child process: {payload}")
    payload["delta_mb"] = payload["peak_rss_mb"] - payload["baseline_rss_mb"]
    return payload


def command_peak_memory(argv: Sequence[str], *, cwd=None, env=None, capture: bool = True) -> dict[str, Any]:
    """Runs a command; returns ``{returncode, seconds, peak_rss_mb, stdout, stderr}`` where the
    peak RSS is that child's own (``os.wait4``), not the process-wide children maximum.
    (A command that forks workers reports its largest single process only.)"""
    pipe = subprocess.PIPE if capture else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=pipe, stderr=pipe)
    bufs: dict[str, bytes] = {}
    readers = []
    if capture:  # drain the pipes in threads: Popen.communicate would reap the child itself
        for key, stream in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            th = threading.Thread(target=lambda k=key, s=stream: bufs.__setitem__(k, s.read()))
            th.start()
            readers.append(th)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    for th in readers:
        th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()
    return {
        "returncode": proc.returncode,
        "seconds": seconds,
        "peak_rss_mb": _maxrss_to_mb(usage.ru_maxrss),
        "stdout": bufs["stdout"].decode(errors="replace") if capture else None,
        "stderr": bufs["stderr"].decode(errors="replace") if capture else None,
    }
