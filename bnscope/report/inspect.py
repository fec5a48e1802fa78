"""Rendering of ``inspect`` results: table, JSON, Markdown."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnscope.report.common import SEVERITY_STYLE, markdown_table, short_float
from bnscope.report.sink import renders

if TYPE_CHECKING:
    from bnscope.workflows.inspect import InspectResult


def _fold_text(layer) -> str:
    if layer.fold.possible:
        arrow = "<-" if layer.fold.direction == "into_previous" else "->"
        return f"yes {arrow} {layer.fold.target}"
    return f"no: {layer.fold.reason}"


def _flags_text(layer) -> str:
    return ", ".join(f.code + (f"{list(f.channels[:4])}" if f.channels else "") for f in layer.flags) or "ok"


@renders("InspectResult", "table")
def _inspect_table(result: InspectResult, console: Console) -> None:
    m = result.model
    console.print(
        Text.assemble(
            (m.path, "bold"),
            f"  opset {m.opset}, IR {m.ir_version}, {m.producer or 'unknown producer'}, "
            f"{m.node_count} nodes, {m.bn_count} BatchNormalization",
        )
    )
    for vi in m.inputs:
        console.print(f"  input  {vi['name']}: {vi['dtype']} {vi['shape']}")
    for vi in m.outputs:
        console.print(f"  output {vi['name']}: {vi['dtype']} {vi['shape']}")
    if result.layers:
        table = Table(show_lines=False, header_style="bold")
        for col in ("#", "layer", "ch", "eps", "mom", "from", "to", "fold", "health"):
            table.add_column(col, overflow="fold")
        for i, layer in enumerate(result.layers):
            table.add_row(
                str(i),
                layer.name,
                str(layer.channels if layer.channels is not None else "?"),
                short_float(layer.epsilon),
                short_float(layer.momentum),
                layer.producer["op"],
                ", ".join(c["op"] for c in layer.consumers) or "-",
                Text(_fold_text(layer), style="green" if layer.fold.possible else "yellow"),
                Text(_flags_text(layer), style=SEVERITY_STYLE[layer.severity]),
            )
        console.print(table)
    for note in m.notes:
        console.print(Text.assemble(("note:", "cyan"), f" {note}"), highlight=False)
    for layer in result.layers:
        for flag in layer.flags:
            if flag.severity != "info":
                console.print(
                    Text.assemble(
                        (f"{flag.severity}: ", SEVERITY_STYLE[flag.severity]), f"{layer.name}: {flag.message}"
                    )
                )
    summary = result.to_dict()["summary"]
    text = (
        f"{summary['bn']} BN, {summary['foldable']} foldable, {summary['flags']['error']} error(s), "
        f"{summary['flags']['warning']} warning(s)"
    )
    console.print(Text(text, style="bold"))


@renders("InspectResult", "markdown")
def inspect_markdown(result: InspectResult) -> str:
    m = result.model
    head = (
        f"## bnscope inspect: `{m.path}`\n\nopset {m.opset}, IR {m.ir_version}, {m.producer or 'unknown producer'}, "
        f"{m.node_count} nodes, {m.bn_count} BatchNormalization, {result.foldable} foldable\n"
    )
    rows = [
        [
            str(i),
            f"`{layer.name}`",
            str(layer.channels),
            short_float(layer.epsilon),
            layer.producer["op"],
            ", ".join(c["op"] for c in layer.consumers),
            _fold_text(layer),
            _flags_text(layer),
        ]
        for i, layer in enumerate(result.layers)
    ]
    parts = [head]
    if rows:
        parts.append(markdown_table(["#", "layer", "ch", "eps", "from", "to", "fold", "health"], rows))
    parts.extend(f"\n> note: {n}" for n in m.notes)
    return "\n".join(parts)
