"""Rendering of ``fold`` and ``run`` results."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnscope.report.common import markdown_table, print_raw
from bnscope.schema import to_json
from bnscope.workflows.fold import FoldResult
from bnscope.workflows.run import RunResult


def _g(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def _fold_rows(result: FoldResult) -> list[list[str]]:
    rows = []
    for r in result.layers:
        where = f"{'<-' if r.direction == 'into_previous' else '->'} {r.target_op} {r.target}" if r.folded else r.reason
        rows.append([r.name, "folded" if r.folded else "kept", where or "", _g(r.weight_range_growth)])
    return rows


def emit_fold(result: FoldResult, fmt: str, console: Console) -> None:
    if fmt == "json":
        print_raw(console, to_json(result.to_dict()))
    elif fmt == "markdown":
        print_raw(console, fold_markdown(result))
    else:
        _fold_table(result, console)


def _fold_table(result: FoldResult, console: Console) -> None:
    table = Table(header_style="bold", title=f"{result.model}: {result.bn_before} BN -> {result.bn_after}")
    for col in ("BN", "result", "into / why kept", "weight range x"):
        table.add_column(col, overflow="fold")
    for row in _fold_rows(result):
        style = "green" if row[1] == "folded" else "yellow"
        table.add_row(row[0], Text(row[1], style=style), row[2], row[3])
    console.print(table)
    for w in result.warnings:
        console.print(Text("warning: " + w, style="yellow"))
    for v in result.verification:
        _verification(v, console)
    if result.output:
        console.print(Text(f"wrote {result.output}", style="bold green"))
    elif result.verification and not result.passed:
        console.print(Text("verification failed: nothing written (see the differences above; --atol/--rtol "
                           "or --no-verify if this is expected)", style="bold red"))
    else:
        console.print("dry run: nothing written")


def _verification(v, console: Console) -> None:
    status = Text("passed" if v.passed else "FAILED", style="green" if v.passed else "bold red")
    console.print(Text.assemble("verification on ", v.provider, f" ({', '.join(v.active_providers)}), ",
                                f"{v.batches} batch(es) of {v.data}: ", status))
    table = Table(header_style="bold")
    for col in ("output", "max abs", "max rel", "atol", "rtol", "ok"):
        table.add_column(col)
    for o in v.outputs:
        table.add_row(o.name, _g(o.max_abs), _g(o.max_rel), _g(o.atol), _g(o.rtol), "yes" if o.passed else "NO")
    console.print(table)


def fold_markdown(result: FoldResult) -> str:
    parts = [f"## bnscope fold: `{result.model}`\n\n{result.bn_before} BN before, {result.bn_after} after\n",
             markdown_table(["BN", "result", "into / why kept", "weight range x"], _fold_rows(result))]
    for v in result.verification:
        parts.append(f"\nverification on {v.provider}: **{'passed' if v.passed else 'FAILED'}**\n")
        parts.append(markdown_table(["output", "max abs", "max rel"],
                                    [[o.name, _g(o.max_abs), _g(o.max_rel)] for o in v.outputs]))
    parts += [f"\n> warning: {w}" for w in result.warnings]
    return "\n".join(parts)


def emit_run(result: RunResult, fmt: str, console: Console) -> None:
    if fmt == "json":
        print_raw(console, to_json(result.to_dict()))
        return
    lat = result.latency
    console.print(Text.assemble((result.model, "bold"), f" on {', '.join(result.active_providers)}",
                                (" (FELL BACK)" if result.fell_back else "", "bold red")))
    table = Table(header_style="bold")
    for col in ("model", "median ms", "p90 ms", "min ms", "samples/s"):
        table.add_column(col, justify="right")
    table.add_row(result.model, _g(lat.median_ms), _g(lat.p90_ms), _g(lat.min_ms), _g(lat.throughput_samples_per_s))
    if result.compare_model:
        c = result.compare_latency
        table.add_row(result.compare_model, _g(c.median_ms), _g(c.p90_ms), _g(c.min_ms), _g(c.throughput_samples_per_s))
    console.print(table)
    console.print(f"{lat.runs} runs after {lat.warmup} warm-up, batch {lat.batch_size}, data: {result.data}")
    if result.compare_model:
        console.print(f"latency ratio {result.model} / {result.compare_model}: "
                      f"{lat.median_ms / result.compare_latency.median_ms:.3f}")
        diff = Table(header_style="bold")
        for col in ("output", "max abs", "max rel", "ok"):
            diff.add_column(col)
        for o in result.differences:
            diff.add_row(o.name, _g(o.max_abs), _g(o.max_rel), "yes" if o.passed else "NO")
        console.print(diff)


def emit_recalibrate(result, fmt: str, console: Console) -> None:
    if fmt == "json":
        print_raw(console, to_json(result.to_dict()))
        return
    rows = [[c.name, str(c.pass_index), c.before.verdict, _g(c.before.max_abs_d), _g(c.before.max_abs_log_r),
             c.after.verdict, _g(c.after.max_abs_d), _g(c.after.max_abs_log_r)] for c in result.layers]
    headers = ["BN", "pass", "before", "max|d|", "max|log r|", "after", "max|d|", "max|log r|"]
    if fmt == "markdown":
        print_raw(console, f"## bnscope recalibrate ({result.method})\n\n" + markdown_table(headers, rows))
        return
    table = Table(header_style="bold", title=f"{result.model} -> {result.output} ({result.method}, "
                                              f"{result.passes} pass(es) over {result.data})")
    for col in headers:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if result.accuracy_before is not None:
        console.print(f"top-1 accuracy: {result.accuracy_before:.2%} -> {result.accuracy_after:.2%}")
    console.print(Text(f"wrote {result.output}", style="bold green"))
