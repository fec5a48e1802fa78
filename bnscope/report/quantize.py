"""Rendering of ``quantize`` results: table, JSON, Markdown.

The layer table lists the riskiest layers first (lowest predicted SQNR), the predicted and measured
range of the folded Conv's output, the int8 steps across its activation's knee, and the predicted
and measured damage; every layer is in the JSON.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnscope.report.common import general_float, markdown_table
from bnscope.report.sink import renders

if TYPE_CHECKING:
    from bnscope.workflows.quantize_result import QuantizeResult

TABLE_LAYERS = 10  # the riskiest layers shown in table and Markdown (all in JSON)


def _db(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _range(r: tuple[float, float] | None) -> str:
    return "-" if r is None else f"{general_float(r[0])}..{general_float(r[1])}"


def _summary(result: QuantizeResult) -> list[str]:
    verdict = "reached" if result.reached else "NOT reached"
    lines = [
        f"SQNR {result.sqnr_db:.2f} dB (mean over {len(result.outputs)} outputs; target {result.target_sqnr_db:g} dB "
        f"{verdict}) on {result.evaluation}",
        f"activations: {len(result.int8)} int8, {len(result.int16)} int16 ({result.fraction_int8:.1%} at 8 bits); "
        f"weights int8 {'per channel' if result.per_channel else 'per tensor'}",
        f"{result.folded} BN folded; {len(result.equalized)} conv pairs equalised (exactly)",
    ]
    if result.rank_correlation is not None:
        lines.append(f"predicted vs measured layer damage: Spearman {result.rank_correlation:.2f}")
    if result.latency is not None:
        lat = result.latency
        lines.append(f"latency: float {lat.float_ms:.2f} ms, QDQ {lat.quantized_ms:.2f} ms ({lat.speedup:.2f}x)")
    return lines


def _layer_rows(result: QuantizeResult) -> list[list[str]]:
    sixteen = set(result.int16)
    rows = []
    for r in result.layers[:TABLE_LAYERS]:
        bits = "16" if r.chain.start in sixteen else "8"
        rows.append(
            [
                r.conv,
                r.chain.activation.split(" ")[0][:12],
                _range(r.predicted_range),
                _range(r.measured_range),
                general_float(r.knee_steps),
                _db(r.predicted_sqnr_db),
                _db(r.measured_sqnr_db),
                bits,
            ]
        )
    return rows


HEADERS = ["conv", "activation", "predicted", "measured", "knee steps", "pred dB", "meas dB", "bits"]


@renders("QuantizeResult", "table")
def _table(result: QuantizeResult, console: Console) -> None:
    table = Table(header_style="bold", title=f"{result.model}: riskiest layers first (output range, int8 SQNR)")
    for col in HEADERS:
        table.add_column(col, overflow="fold")
    for row in _layer_rows(result):
        table.add_row(*row)
    console.print(table)
    outputs = Table(header_style="bold")
    outputs.add_column("output", overflow="fold")
    outputs.add_column("SQNR dB")
    for o in result.outputs:
        outputs.add_row(o.name, _db(o.sqnr_db))
    console.print(outputs)
    for line in _summary(result):
        console.print(line, highlight=False, soft_wrap=True)
    for w in result.warnings:
        console.print(Text("warning: " + w, style="yellow"))
    console.print(Text(f"wrote {result.output}", style="bold green"), soft_wrap=True)


@renders("QuantizeResult", "markdown")
def quantize_markdown(result: QuantizeResult) -> str:
    parts = [f"## bnscope quantize: {result.model}", ""]
    parts += [f"- {line}" for line in _summary(result)]
    parts += ["", markdown_table(["output", "SQNR dB"], [[o.name, _db(o.sqnr_db)] for o in result.outputs]), ""]
    parts += [markdown_table(HEADERS, _layer_rows(result))]
    parts += [f"\n- warning: {w}" for w in result.warnings]
    parts += ["", f"Wrote {result.output}."]
    return "\n".join(parts)
