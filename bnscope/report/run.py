"""Rendering of ``run`` results: table, JSON, Markdown."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnscope.report.common import general_float
from bnscope.report.sink import renders

if TYPE_CHECKING:
    from bnscope.runtime.placement import Placement
    from bnscope.workflows.run import RunResult


@renders("RunResult", "table")
def _run_table(result: RunResult, console: Console) -> None:
    lat = result.latency
    console.print(
        Text.assemble(
            (result.model, "bold"),
            f" on {', '.join(result.active_providers)}",
            (" (FELL BACK)" if result.fell_back else "", "bold red"),
        )
    )
    table = Table(header_style="bold")
    for col in ("model", "median ms", "p90 ms", "min ms", "samples/s"):
        table.add_column(col, justify="right")
    table.add_row(
        result.model,
        general_float(lat.median_ms),
        general_float(lat.p90_ms),
        general_float(lat.min_ms),
        general_float(lat.throughput_samples_per_s),
    )
    if result.compare_model:
        c = result.compare_latency
        table.add_row(
            result.compare_model,
            general_float(c.median_ms),
            general_float(c.p90_ms),
            general_float(c.min_ms),
            general_float(c.throughput_samples_per_s),
        )
    console.print(table)
    console.print(f"{lat.runs} runs after {lat.warmup} warm-up, batch {lat.batch_size}, data: {result.data}")
    console.print(_placement_line(result.placement), highlight=False, soft_wrap=True)
    if result.compare_model:
        console.print(
            f"{result.compare_model} on {', '.join(result.compare_active_providers)}"
            f"{' (FELL BACK)' if result.compare_fell_back else ''}, {_placement_line(result.compare_placement)}",
            highlight=False,
            soft_wrap=True,
        )
        console.print(
            f"latency ratio {result.model} / {result.compare_model}: "
            f"{lat.median_ms / result.compare_latency.median_ms:.3f}"
        )
        diff = Table(header_style="bold")
        for col in ("output", "max abs", "max rel", "ok"):
            diff.add_column(col)
        for o in result.differences:
            diff.add_row(o.name, general_float(o.max_abs), general_float(o.max_rel), "yes" if o.passed else "NO")
        console.print(diff)


def _placement_line(placement: Placement) -> str:
    if not placement.checked:
        return f"placement {placement.note}"
    counts = ", ".join(f"{ep} {n}" for ep, n in placement.counts.items())
    line = f"placement (nodes per provider): {counts}"
    return f"{line}; {placement.describe_cpu_nodes()}" if placement.cpu_nodes else line
