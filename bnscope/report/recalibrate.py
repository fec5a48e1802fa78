"""Rendering of ``recalibrate`` results: table, JSON, Markdown."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnscope.report.common import general_float, markdown_table, print_raw
from bnscope.schema import to_json


def emit_recalibrate(result, fmt: str, console: Console) -> None:
    if fmt == "json":
        print_raw(console, to_json(result.to_dict()))
        return
    rows = [
        [
            c.name,
            str(c.pass_index),
            c.before.verdict,
            general_float(c.before.max_abs_d),
            general_float(c.before.max_abs_log_r),
            c.after.verdict,
            general_float(c.after.max_abs_d),
            general_float(c.after.max_abs_log_r),
        ]
        for c in result.layers
    ]
    headers = ["BN", "pass", "before", "max|d|", "max|log r|", "after", "max|d|", "max|log r|"]
    if fmt == "markdown":
        print_raw(console, f"## bnscope recalibrate ({result.method})\n\n" + markdown_table(headers, rows))
        return
    table = Table(
        header_style="bold",
        title=f"{result.model} -> {result.output} ({result.method}, {result.passes} pass(es) over {result.data})",
    )
    for col in headers:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if result.accuracy_before is not None:
        console.print(f"top-1 accuracy: {result.accuracy_before:.2%} -> {result.accuracy_after:.2%}")
    console.print(Text(f"wrote {result.output}", style="bold green"), soft_wrap=True)  # a path is never wrapped
