"""Rendering of ``stats`` results: table with a drift bar chart, JSON, Markdown, CSV."""

from __future__ import annotations

import csv
import io
import math
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnscope.report.common import csv_text, markdown_table
from bnscope.report.sink import renders

if TYPE_CHECKING:
    from bnscope.stats.summary import StatsResult

VERDICT_STYLE = {
    "ok": "green",
    "drift": "yellow",
    "unsure": "dim",
    "stale": "magenta",
    "inherited": "dim yellow",
    "dead": "blue",
    "broken": "bold red",
}
CAUSE_TITLE = {
    "never_updated": "never updated",
    "input_shift": "input shift",
    "stale_layers": "stale layers",
    "train_eval_mismatch": "train/eval mismatch",
    "stale_or_mismatch": "unsure: stale or train/eval mismatch",
    "insufficient_data": "too little data",
}
BAR_WIDTH = 30


def _num(x: float, digits: int = 3) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _header(result: StatsResult) -> str:
    d = result.data
    return f"{result.model}: mode {result.mode}, {d['samples']} samples in {d['batches']} batches from {d['source']}"


def _layer_table(result: StatsResult, console: Console, extras: bool) -> Table:
    """One row per layer. No vertical rules and collapsed padding, so the main columns fit 80
    terminal columns; numbers and verdicts never wrap ("verdic|t"). Narrower than 72 columns rich
    would drop columns rather than wrap those, so every column may wrap there."""
    table = Table(
        header_style="bold", box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False, show_edge=False
    )
    keep_words = console.width >= 72
    for col, justify in (
        ("#", "right"),
        ("layer", "left"),
        ("ch", "right"),
        ("verdict", "left"),
        ("max|d|", "right"),
        ("mean|d|", "right"),
        ("max|log r|", "right"),
        ("±d", "right"),
        ("over", "right"),
        ("noise", "right"),
    ):
        table.add_column(col, justify=justify, overflow="fold", no_wrap=keep_words and col != "layer")
    for col in _extra_columns(result) if extras else ():
        table.add_column(col, justify="right" if "max" in col else "left", overflow="fold")
    for layer in result.layers:
        table.add_row(
            str(layer.index),
            layer.name,
            str(layer.channels),
            Text(layer.verdict, style=VERDICT_STYLE[layer.verdict]),
            _num(layer.max_abs_d),
            _num(layer.mean_abs_d),
            _num(layer.max_abs_log_r),
            _num(2 * layer.max_se_d, 2),
            f"{layer.fraction_over:.0%}",
            _num(layer.noise, 2) if math.isfinite(layer.noise) else "-",  # one batch: no batch-to-batch spread
            *([values[layer.name] for values in _extra_columns(result).values()] if extras else []),
        )
    return table


def _extra_columns(result: StatsResult) -> dict[str, dict[str, str]]:
    """The worst channels, the companion pass's max|d| and the causes, by layer (columns when they
    fit, else lines)."""
    columns = {"worst ch": {layer.name: ",".join(map(str, layer.worst_channels[:3])) for layer in result.layers}}
    if result.companion_mode:
        columns[f"{result.companion_mode} max|d|"] = {
            layer.name: _num(other.max_abs_d) if (other := result.companion_of(layer.name)) else ""
            for layer in result.layers
        }
    causes = result.causes()
    if causes:
        columns["cause"] = {layer.name: causes.get(layer.name, "") for layer in result.layers}
    return columns


def _print_layer_table(result: StatsResult, console: Console) -> None:
    """The table with all its columns when it fits the console, else the main ones and, below, one
    line per layer for the rest (so 80 columns never break words)."""
    table = _layer_table(result, console, extras=True)
    extras = _extra_columns(result)
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    if natural <= console.width:
        console.print(table)
        return
    console.print(_layer_table(result, console, extras=False))
    for layer in result.layers:
        cells = [f"{col} {values[layer.name]}" for col, values in extras.items() if values[layer.name]]
        if cells:
            console.print(Text(f"{layer.name}: {', '.join(cells)}"), highlight=False)


@renders("StatsResult", "table")
def _stats_table(result: StatsResult, console: Console, per_channel: bool = False) -> None:
    console.print(Text(_header(result), style="bold"))
    if result.data.get("random"):
        console.print(Text("RANDOM DATA: statistics of random inputs mean nothing about real data", style="bold red"))
    _print_layer_table(result, console)
    _drift_bars(result, console)
    if per_channel:
        for layer in result.layers:
            _channel_table(layer, console)
    for name, reason in result.skipped.items():
        console.print(f"skipped {name}: {reason}", highlight=False)
    if result.skipped:
        console.print(f"{len(result.skipped)} BN not measured: --fail-on-drift fails on them", highlight=False)
    counts = result.counts()
    console.print(Text(", ".join(f"{n} {v}" for v, n in counts.items() if n) or "no layers", style="bold"))
    for line in result.reading:
        console.print(Text("- " + line))
    for line in diagnosis_lines(result):
        console.print(Text(line), highlight=False)


def diagnosis_lines(result: StatsResult) -> list[str]:
    """The diagnosis in plain words (most important first), then the sample budget."""
    basis = f"eval and train mode, {result.mode} shown" if result.companion_mode else f"{result.mode} mode only"
    if not result.diagnosis:
        lines = [] if not result.layers or not result.passed else ["diagnosis: the statistics match"]
    else:
        lines = [f"diagnosis ({basis}):"]
        for k, finding in enumerate(result.diagnosis, 1):
            lines.append(f"{k}. {CAUSE_TITLE.get(finding.cause, finding.cause)}: {finding.message}")
            lines.append(f"   what to do: {finding.action}")
    return lines + _budget_lines(result)


def _budget_lines(result: StatsResult) -> list[str]:
    budget = result.to_dict(per_channel=False)["summary"]["sample_budget"]
    if budget["resolution_d"] is None:
        return []
    needed = ", ".join(f"|d| {row['abs_d']:g}: {row['samples']}" for row in budget["samples_needed"])
    return [
        f"sample budget: {result.data['samples']} samples resolve |d| to ±{budget['resolution_d']:.2f} "
        f"(2 standard errors, worst layer); samples needed for {needed}"
    ]


def _drift_bars(result: StatsResult, console: Console) -> None:
    """A compact per-layer chart of max |d| (#) and max |log r| (=) against depth."""
    layers = result.layers
    finite = [v for layer in layers for v in (layer.max_abs_d, layer.max_abs_log_r) if math.isfinite(v)]
    if not layers or not finite:
        return
    top = max(max(finite), result.thresholds.max_d, 1e-12)
    console.print(
        Text(
            f"drift by depth (bar = max|d| '#', max|log r| '='; full width = {top:.3g}; "
            f"'|' marks max_d {result.thresholds.max_d:g})",
            style="dim",
        )
    )
    names = max(len(layer.name[-40:]) for layer in layers)
    width = max(8, min(BAR_WIDTH, (console.width - 7 - names) // 2))
    mark = min(width - 1, int(round(result.thresholds.max_d / top * width)))
    for layer in layers:
        line = Text(f"{layer.index:>4} ")
        for value, char in ((layer.max_abs_d, "#"), (layer.max_abs_log_r, "=")):
            n = 0 if not math.isfinite(value) else int(round(value / top * width))
            bar = (char * n).ljust(width)
            bar = bar[:mark] + ("|" if bar[mark] == " " else bar[mark]) + bar[mark + 1 :]
            line.append(bar, style=VERDICT_STYLE[layer.verdict])
            line.append(" ")
        line.append(layer.name[-40:], style="dim")
        console.print(line)


def _channel_table(layer, console: Console) -> None:
    table = Table(title=f"{layer.name} ({layer.verdict})", header_style="bold")
    for col in ("ch", "batch mean", "running mean", "batch var", "running var", "d", "log r", "kl"):
        table.add_column(col, justify="right")
    for c in range(layer.channels):
        table.add_row(
            str(c),
            *(
                f"{getattr(layer, k)[c]:.5g}"
                for k in ("batch_mean", "running_mean", "batch_var", "running_var", "d", "log_r", "kl")
            ),
        )
    console.print(table)


@renders("StatsResult", "markdown")
def stats_markdown(result: StatsResult, per_channel: bool = False) -> str:
    rows = [
        [
            str(layer.index),
            f"`{layer.name}`",
            str(layer.channels),
            f"**{layer.verdict}**",
            _num(layer.max_abs_d),
            _num(layer.max_abs_log_r),
            f"{layer.fraction_over:.0%}",
            layer.why,
        ]
        for layer in result.layers
    ]
    parts = [
        f"## bnscope stats\n\n{_header(result)}\n",
        markdown_table(["#", "layer", "ch", "verdict", "max abs d", "max abs log r", "over", "why"], rows),
        "",
    ]
    parts += [f"- {line}" for line in result.reading]
    parts += [f"- not measured: `{name}`: {reason}" for name, reason in result.skipped.items()]
    parts += [""] + diagnosis_lines(result)
    if per_channel:
        for layer in result.layers:
            parts.append(f"\n### `{layer.name}`\n")
            parts.append(
                markdown_table(
                    ["ch", "batch mean", "running mean", "batch var", "running var", "d", "log r"],
                    [
                        [str(c)]
                        + [
                            f"{getattr(layer, k)[c]:.5g}"
                            for k in ("batch_mean", "running_mean", "batch_var", "running_var", "d", "log_r")
                        ]
                        for c in range(layer.channels)
                    ],
                )
            )
    return "\n".join(parts)


@renders("StatsResult", "csv")
def stats_csv(result: StatsResult, per_channel: bool = False) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if per_channel:
        keys = ("batch_mean", "batch_var", "running_mean", "running_var", "d", "log_r", "kl")
        writer.writerow(["layer", "index", "channel", *keys])
        for layer in result.layers:
            for c in range(layer.channels):
                writer.writerow(
                    [csv_text(layer.name), layer.index, c, *(repr(float(getattr(layer, k)[c])) for k in keys)]
                )
    else:
        keys = ("max_abs_d", "mean_abs_d", "max_abs_log_r", "mean_abs_log_r", "fraction_over")
        writer.writerow(["layer", "index", "channels", "count", "verdict", *keys])
        for layer in result.layers:
            writer.writerow(
                [
                    csv_text(layer.name),
                    layer.index,
                    layer.channels,
                    layer.count,
                    csv_text(layer.verdict),
                    *(repr(float(getattr(layer, k))) for k in keys),
                ]
            )
    return out.getvalue().rstrip("\n")
