"""The statistics part of the HTML report: drift per layer as a chart, the worst layers channel by
channel, layers that could not be tapped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bnscope.report.html_parts import SERIES, VERDICT_COLOUR, WIDTH, html_section, html_table, verdict_span
from bnscope.report.svg import (
    Axis,
    clamp_note,
    draw_frame,
    draw_legend,
    draw_marker,
    escape,
    fmt,
    line_segments,
    padded_range,
    svg_document,
    tag,
)
from bnscope.stats.summary import VERDICTS, LayerStats, StatsResult

WORST_LAYERS = 3


# -- 1. drift by depth ---------------------------------------------------------------------------
def drift_section(stats: StatsResult) -> str:
    layers = stats.layers
    lead = (
        "Largest per-channel |d| (mean shift in running-std units) and |log r| (log variance ratio) of each "
        "BN layer, in graph order. Marker colour is the layer's verdict; dashed lines are the thresholds."
    )
    if not layers:
        return html_section(
            "drift-by-depth",
            "Drift by depth",
            "",
            tag(
                "p",
                escape(stats.reading[-1] if stats.reading else "no BatchNormalization layer had statistics"),
                class_="none",
            )
            + _skipped(stats),
            False,
        )
    chart, caption = _drift_chart(stats)
    rows = [
        (
            str(layer.index),
            tag("span", escape(layer.name)),
            str(layer.channels),
            verdict_span(layer.verdict),
            fmt(layer.max_abs_d),
            fmt(layer.max_abs_log_r),
            f"{layer.fraction_over:.0%}",
            escape(layer.why),
        )
        for layer in layers
    ]
    table = html_table(("#", "layer", "ch", "verdict", "max|d|", "max|log r|", "over", "why"), rows, (0, 2, 4, 5, 6))
    return html_section("drift-by-depth", "Drift by depth", lead, chart + caption + table + _skipped(stats), True)


def _skipped(stats: StatsResult) -> str:
    if not stats.skipped:
        return ""
    items = (tag("li", escape(f"{name}: {reason}")) for name, reason in stats.skipped.items())
    return tag("h3", escape("Not measured")) + tag("ul", *items)


def _drift_chart(stats: StatsResult) -> tuple[str, str]:
    layers, t = stats.layers, stats.thresholds
    n = len(layers)
    names_room = 0 if n > 60 else int(min(100, 20 + 4.2 * max(len(layer.name[:22]) for layer in layers)))
    height = 276 + max(names_room, 34)
    x = Axis(-0.5, n - 0.5, 60, WIDTH - 20)
    values = {"d": [layer.max_abs_d for layer in layers], "log_r": [layer.max_abs_log_r for layer in layers]}
    finite = [v for v in (*values["d"], *values["log_r"], t.max_d, t.max_log_r) if math.isfinite(v)]
    y = Axis(0.0, max(finite, default=1.0) * 1.1 or 1.0, 270, 40)
    out = [draw_frame(x, y, "" if names_room else "layer (graph order)", "max over channels", xticks=False)]
    for key, value, anchor, at in (("d", t.max_d, "end", x.b - 4), ("log_r", t.max_log_r, "start", x.a + 4)):
        label, colour, _ = SERIES[key]
        placed = y.place(value)
        if placed is None or placed[1]:
            continue
        p = placed[0]
        out.append(
            tag(
                "line",
                x1=x.a,
                x2=x.b,
                y1=f"{p:.1f}",
                y2=f"{p:.1f}",
                stroke=colour,
                stroke_width=1,
                stroke_dasharray="3 3",
            )
        )
        out.append(
            tag(
                "text",
                escape(f"{label} threshold {value:g}"),
                x=at,
                y=f"{p - 4:.1f}",
                text_anchor=anchor,
                class_="tick",
            )
        )
    dropped, clamped, radius = 0, 0, max(2.0, min(4.5, (x.b - x.a) / n / 3))
    for key, shape in (("d", "circle"), ("log_r", "diamond")):
        label, colour, dash = SERIES[key]
        points = [(i, x.px(i), y.place(v)) for i, v in enumerate(values[key])]
        for segment in line_segments([(px, pl[0]) if pl else None for _, px, pl in points]):
            out.append(
                tag(
                    "polyline",
                    points=" ".join(f"{a:.1f},{b:.1f}" for a, b in segment),
                    fill="none",
                    stroke=colour,
                    stroke_width=1.5,
                    stroke_dasharray=dash or None,
                )
            )
        for i, px, placed in points:
            layer = layers[i]
            tip = f"#{layer.index} {layer.name}: {label} {fmt(values[key][i])}, verdict {layer.verdict}" + (
                f" ({layer.why})" if layer.why else ""
            )
            if placed is None:
                dropped += 1
                out.append(
                    tag(
                        "g",
                        tag("title", escape(tip)),
                        tag("text", "NaN", x=f"{px:.1f}", y=y.a - 4, text_anchor="middle", class_="tick"),
                    )
                )
                continue
            clamped += placed[1]
            verdict_colour = VERDICT_COLOUR.get(layer.verdict, "#333")
            out.append(draw_marker(shape, px, placed[0], verdict_colour, placed[1], tip, radius))
    out.append(_layer_labels(layers, x, y.a, names_room))
    present = [v for v in VERDICTS if any(layer.verdict == v for layer in layers)]
    legend = [
        (tag("circle", r=4.5, fill="#333", cx=0, cy=0), SERIES["d"][0]),
        (tag("polygon", points="0,-5 5,0 0,5 -5,0", fill="#56B4E9"), SERIES["log_r"][0]),
    ]
    legend += [(tag("rect", x=-5, y=-5, width=10, height=10, rx=2, fill=VERDICT_COLOUR[v]), v) for v in present]
    out.append(draw_legend(legend, 64, 16))
    return svg_document(WIDTH, height, "Drift by depth: max |d| and max |log r| per BN layer", *out), clamp_note(
        dropped, clamped
    )


def _layer_labels(layers: Sequence[LayerStats], x: Axis, base: float, room: int) -> str:
    n = len(layers)
    step = 1 if room else max(1, math.ceil(n / 20))
    out = []
    for i in range(0, n, step):
        px, layer = x.px(i), layers[i]
        out.append(tag("line", x1=f"{px:.1f}", x2=f"{px:.1f}", y1=base, y2=base + 4, class_="axis"))
        if room:
            name = layer.name if len(layer.name) <= 22 else layer.name[:21] + "\u2026"
            out.append(
                tag(
                    "text",
                    tag("title", escape(layer.name)),
                    escape(name),
                    x=f"{px:.1f}",
                    y=base + 12,
                    text_anchor="end",
                    transform=f"rotate(-40 {px:.1f} {base + 12})",
                    class_="tick",
                )
            )
        else:
            out.append(
                tag("text", escape(layer.index), x=f"{px:.1f}", y=base + 15, text_anchor="middle", class_="tick")
            )
    return "".join(out)


# -- 2. worst layers -----------------------------------------------------------------------------
def worst_layers(stats: StatsResult, count: int = WORST_LAYERS) -> list[LayerStats]:
    """Up to ``count`` layers, not-ok first, then by max |d| + max |log r| (NaN counts as 0)."""

    def score(layer: LayerStats) -> float:
        return sum(0.0 if math.isnan(v) else v for v in (layer.max_abs_d, layer.max_abs_log_r))

    return sorted(stats.layers, key=lambda layer: (layer.verdict == "ok", -score(layer)))[:count]


def worst_group(stats: StatsResult) -> str:
    chosen = worst_layers(stats)
    lead = (
        "Per channel, the batch statistics measured on the data against the running statistics stored in the "
        "model; on the dashed diagonal they agree. Orange points are channels beyond a threshold."
    )
    if not chosen:
        return tag(
            "div",
            tag("h2", escape("Worst layers")),
            html_section(
                "worst-layer", "No layers", "", tag("p", escape("no layer to show"), class_="none"), False, "h3"
            ),
            class_="group",
        )
    sections = [_worst_section(stats, layer) for layer in chosen]
    return tag(
        "div", tag("h2", escape("Worst layers")), tag("p", escape(lead), class_="lead"), *sections, class_="group"
    )


def _worst_section(stats: StatsResult, layer: LayerStats) -> str:
    t = stats.thresholds
    max_d = t.per_layer_max_d.get(layer.name, t.max_d)
    max_r = t.per_layer_max_log_r.get(layer.name, t.max_log_r)
    with np.errstate(invalid="ignore"):
        over = (np.abs(layer.d) > max_d) | (np.abs(layer.log_r) > max_r)
    panels, dropped, clamped = [], 0, 0
    for i, (what, batch, running, log) in enumerate(
        (("mean", layer.batch_mean, layer.running_mean, False), ("variance", layer.batch_var, layer.running_var, True))
    ):
        svg, d, c = _scatter(layer, what, batch, running, over, log, 80 + i * (WIDTH // 2), WIDTH // 2 - 110)
        panels.append(svg)
        dropped, clamped = dropped + d, clamped + c
    heading = f"#{layer.index} {layer.name}: {layer.verdict}"
    lead = f"{layer.channels} channels; max |d| {fmt(layer.max_abs_d)}, max |log r| {fmt(layer.max_abs_log_r)}" + (
        f"; {layer.why}" if layer.why else ""
    )
    diagonal = tag("line", x1=-6, x2=6, y1=0, y2=0, stroke="#8a939c", stroke_dasharray="4 3")
    legend = draw_legend(
        [
            (tag("circle", r=3.5, fill=VERDICT_COLOUR["ok"]), "within thresholds"),
            (tag("circle", r=3.5, fill=VERDICT_COLOUR["drift"]), "beyond a threshold"),
            (diagonal, "batch = running"),
        ],
        70,
        14,
    )
    svg = svg_document(WIDTH, 390, f"Batch against running statistics per channel of {layer.name}", legend, *panels)
    return html_section("worst-layer", heading, lead, svg + clamp_note(dropped, clamped, "channel value"), True, "h3")


def _scatter(
    layer: LayerStats,
    what: str,
    batch: np.ndarray,
    running: np.ndarray,
    over: np.ndarray,
    log: bool,
    left: float,
    width: float,
) -> tuple[str, int, int]:
    lo, hi = padded_range(np.concatenate([batch, running]), log=log)
    x, y = Axis(lo, hi, left, left + width, log), Axis(lo, hi, 340, 40, log)
    out = [
        draw_frame(x, y, f"running {what}" + (" (log)" if log else ""), f"batch {what}" + (" (log)" if log else "")),
        tag("line", x1=x.a, y1=y.a, x2=x.b, y2=y.b, stroke="#8a939c", stroke_dasharray="4 3"),
    ]
    dropped = clamped = 0
    for c in range(batch.shape[0]):
        px, py = x.place(running[c]), y.place(batch[c])
        if px is None or py is None:
            dropped += 1
            continue
        hollow = px[1] or py[1]
        clamped += hollow
        tip = (
            f"{layer.name} channel {c}: batch {what} {fmt(batch[c], 4)}, running {what} {fmt(running[c], 4)}, "
            f"d {fmt(layer.d[c])}, log r {fmt(layer.log_r[c])}"
        )
        out.append(draw_marker("circle", px[0], py[0], VERDICT_COLOUR["drift" if over[c] else "ok"], hollow, tip, 3.5))
    return "".join(out), dropped, clamped
