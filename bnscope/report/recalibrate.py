"""Rendering of ``recalibrate`` results: table, JSON, Markdown."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnscope.report.common import general_float, markdown_table
from bnscope.report.sink import renders

if TYPE_CHECKING:
    from bnscope.workflows.recalibrate import RecalibrateResult

HEADERS = ["BN", "pass", "before", "max|d|", "max|log r|", "after", "max|d|", "max|log r|"]


def _rows(result: RecalibrateResult) -> list[list[str]]:
    return [
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


@renders("RecalibrateResult", "markdown")
def recalibrate_markdown(result: RecalibrateResult) -> str:
    text = f"## bnscope recalibrate ({result.method})\n\n" + markdown_table(HEADERS, _rows(result))
    return "\n".join([text, "", *(f"- {line}" for line in [*repair_lines(result), *_accuracy_lines(result)])])


def _accuracy_lines(result: RecalibrateResult) -> list[str]:
    """With --eval-data: top-1 before -> after (the table and markdown both say it)."""
    if result.accuracy_before is None:
        return []
    how = " (as exported: its training-mode BNs normalise each batch with its own statistics)"
    return [
        f"top-1 accuracy: {result.accuracy_before:.2%}{how if result.repairs else ''} -> {result.accuracy_after:.2%}"
    ]


@renders("RecalibrateResult", "table")
def _recalibrate_table(result: RecalibrateResult, console: Console) -> None:
    table = Table(
        header_style="bold",
        title=f"{result.model} -> {result.output} ({result.method}, {result.passes} pass(es) over {result.data})",
    )
    for col in HEADERS:
        table.add_column(col)
    for row in _rows(result):
        table.add_row(*row)
    console.print(table)
    for line in repair_lines(result):
        console.print(line, highlight=False)
    for line in _accuracy_lines(result):
        console.print(line, highlight=False)
    console.print(Text(f"wrote {result.output}", style="bold green"), soft_wrap=True)  # a path is never wrapped


def repair_lines(result) -> list[str]:
    """Training-mode repairs and where the written model ran, in plain words."""
    lines = []
    for r in result.repairs:
        if not r.repaired:
            lines.append(f"{r.name}: training_mode=1 left as it is: {r.reason}")
            continue
        line = f"{r.name}: training_mode=1 -> inference BN with the re-estimated statistics"
        if r.kept_as_constants:
            line += f"; its outputs {', '.join(r.kept_as_constants)} are read, so kept as constants of them"
        lines.append(line)
    for provider, outcome in result.runs.items():
        lines.append(f"runs on {provider}: {outcome}")
    return lines
