"""Rendering of ``fold`` results: table, JSON, Markdown."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnscope.report.common import general_float, markdown_table
from bnscope.report.sink import renders

if TYPE_CHECKING:
    from bnscope.workflows.fold import FoldResult


def _fold_rows(result: FoldResult) -> list[list[str]]:
    rows = []
    for r in result.layers:
        where = f"{'<-' if r.direction == 'into_previous' else '->'} {r.target_op} {r.target}" if r.folded else r.reason
        rows.append([r.name, "folded" if r.folded else "kept", where or "", general_float(r.weight_range_growth)])
    return rows


@renders("FoldResult", "table")
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
        console.print(Text(f"wrote {result.output}", style="bold green"), soft_wrap=True)  # a path is never wrapped
    elif result.verification and not result.passed:
        console.print(
            Text(
                "verification failed: nothing written (see above; --atol/--rtol judge by fixed tolerances "
                "instead of the float floor, --no-verify writes the fold unverified)",
                style="bold red",
            )
        )
    else:
        console.print("dry run: nothing written")


def _verification(v, console: Console) -> None:
    status = Text("passed" if v.passed else "FAILED", style="green" if v.passed else "bold red")
    console.print(
        Text.assemble(
            "verification on ",
            v.provider,
            f" ({', '.join(v.active_providers)}), ",
            f"{v.batches} batch(es) of {v.data}: ",
            status,
        )
    )
    table = Table(header_style="bold")
    for col in VERIFICATION_COLUMNS:
        table.add_column(col)
    for o in v.outputs:
        *cells, ok = verification_row(o)
        table.add_row(*cells, Text(ok, style="green" if o.passed else "bold red"))
    console.print(table)
    for line in verification_notes(v):
        console.print(Text(line, style="dim" if line.startswith("floor") else "yellow"), soft_wrap=True)


VERIFICATION_COLUMNS = ("output", "max abs", "floor", "x floor", "judged by", "ok")


def verification_row(o) -> list[str]:
    """One output's cells: its difference, the original's floor, their ratio, the limit, the verdict."""
    return [
        o.name,
        general_float(o.max_abs),
        general_float(o.floor),
        general_float(o.ratio),
        _limit(o),
        "yes" if o.passed else "NO",
    ]


def _limit(o) -> str:
    if o.judged_by == "floor":
        from bnscope.numerics.compare import FLOOR_MULTIPLE  # on use: numerics imports numpy

        return f"<= {FLOOR_MULTIPLE:g}x floor"
    if o.judged_by == "finite":
        return "finite values"
    return f"atol {general_float(o.atol)}, rtol {general_float(o.rtol)}"


def verification_notes(v) -> list[str]:
    """Why outputs failed, the note on random data, and what the floor cost."""
    lines = [f"{o.name}: {o.reason}" for o in v.outputs if o.reason and not o.passed]
    if v.note:
        lines.append(f"note: {v.note}")
    if v.floor_seeds:
        lines.append(
            f"floor: the original with every float weight nudged by one ulp ({v.floor_seeds} draws over the "
            f"{v.batches} batch(es)), {v.floor_seconds:.2f} s"
        )
    else:
        lines.append("floor: not measured (a nudged original did not run); judged by atol/rtol")
    return lines


@renders("FoldResult", "markdown")
def fold_markdown(result: FoldResult) -> str:
    parts = [
        f"## bnscope fold: `{result.model}`\n\n{result.bn_before} BN before, {result.bn_after} after\n",
        markdown_table(["BN", "result", "into / why kept", "weight range x"], _fold_rows(result)),
    ]
    for v in result.verification:
        parts.append(f"\nverification on {v.provider}: **{'passed' if v.passed else 'FAILED'}**\n")
        parts.append(markdown_table(list(VERIFICATION_COLUMNS), [verification_row(o) for o in v.outputs]))
        parts += [f"\n> {line}" for line in verification_notes(v)]
    parts += [f"\n> warning: {w}" for w in result.warnings]
    return "\n".join(parts)
