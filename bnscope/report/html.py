"""HTML report: ``stats``, ``inspect`` and ``fold`` results in one self-contained file.

The page holds inline CSS and hand-written SVG only: no script, no network, no fonts, so it opens
offline and can be attached to a ticket. Each chart lives in a ``<section data-chart="...">``; a
section without data says so in words, gets the class ``empty`` and draws nothing. The markup is
well-formed XML (void elements closed, only XML entities), so tests can parse it strictly, and
every piece of text goes through :func:`html.escape`.

Non-finite values never reach SVG coordinates: NaN points are left out, infinite points (and, on
a log axis, zero or negative ones) are clamped to the axis edge and drawn hollow, and the chart's
caption counts both.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from bnscope.report.svg import (
    Axis,
    bar_chart,
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
from bnscope.workflows.fold import GROWTH_WARNING, FoldResult
from bnscope.workflows.inspect import InspectResult

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
VERDICT_COLOUR = {"ok": "#009E73", "drift": "#E69F00", "stale": "#CC79A7", "dead": "#0072B2", "broken": "#D55E00"}
SEVERITY_COLOUR = {"error": "#D55E00", "warning": "#E69F00", "info": "#0072B2"}
SERIES = {"d": ("max |d|", "#333333", ""), "log_r": ("max |log r|", "#56B4E9", "6 4")}
WORST_LAYERS = 3
WIDTH = 900

CSS = """
body{margin:0;background:#f6f7f9;color:#1d232a;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:980px;margin:0 auto;padding:24px 28px 48px}
header{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:18px 22px;margin-bottom:20px}
h1{font-size:22px;margin:0 0 10px}h2{font-size:18px;margin:0 0 4px}h3{font-size:15px;margin:14px 0 4px}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0 0 10px}
dl.meta dt{color:#5b6570}dl.meta dd{margin:0;word-break:break-all}
.pill{display:inline-block;border-radius:10px;padding:1px 9px;margin:0 6px 4px 0;color:#fff;font-weight:600;
  font-size:12px}
.pill.zero{background:#e3e6ea!important;color:#7a838c;font-weight:400}
ul.reading{margin:6px 0 0;padding-left:20px}
.banner{background:#fdecea;border:1px solid #D55E00;color:#8a2b00;border-radius:6px;padding:6px 10px;margin:8px 0;
  font-weight:600}
.group,section.chart{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:16px 22px;margin-bottom:20px}
.group section.chart{border:none;border-top:1px solid #e8ebee;border-radius:0;padding:8px 0 0;margin:10px 0 0}
p.lead{color:#5b6570;margin:0 0 10px}p.note{color:#5b6570;font-size:12px;margin:4px 0}
p.none{color:#5b6570;font-style:italic}
svg{display:block;max-width:100%;height:auto;margin:6px 0}
svg text{font-family:inherit;font-size:11px;fill:#3b444d}
svg .axis{stroke:#8a939c;stroke-width:1}svg .grid{stroke:#eceff2;stroke-width:1}
svg .tick{font-size:10px;fill:#6b747d}svg .label{font-size:11px;fill:#3b444d}
table{border-collapse:collapse;width:100%;margin:8px 0;font-size:13px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e8ebee;vertical-align:top}
th{background:#f1f3f5;font-weight:600;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.sev{font-weight:600}
footer{color:#7a838c;font-size:12px;text-align:center}
"""


def render_html(stats: StatsResult | None = None, inspect: InspectResult | None = None,
                fold: FoldResult | None = None, title: str = "bnscope report") -> str:
    """One self-contained HTML page for whichever results are given (all optional).

    Args:
        stats: drift per layer: the header, "Drift by depth" and "Worst layers".
        inspect: parameter health: "Lint findings".
        fold: fold records: "Fold summary".
        title: page title and heading. Defaults to "bnscope report".

    Returns:
        The page as a string (UTF-8 when written).
    """
    parts = [_header(stats, inspect, fold, title)]
    if stats is not None:
        parts += [_drift_section(stats), _worst_group(stats)]
    if inspect is not None:
        parts.append(_lint_section(inspect))
    if fold is not None:
        parts.append(_fold_section(fold))
    if len(parts) == 1:
        parts.append(tag("p", escape("No results were given to this report."), class_="none"))
    footer = tag("footer", escape("bnscope: self-contained report, no scripts, no network. Hover points for details."))
    head = tag("head", '<meta charset="utf-8"/>', tag("title", escape(title)), tag("style", CSS))
    return "<!DOCTYPE html>\n" + tag("html", head, tag("body", tag("main", *parts, footer)), lang="en") + "\n"


def write_html(path: str | os.PathLike, html_text: str) -> Path:
    """Write ``html_text`` as UTF-8, atomically: a temp file in the target folder, then ``os.replace``.

    The temp file is created with mode 0o666 less the umask, like any new file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(html_text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Iterable[int] = ()) -> str:
    """Rows hold markup; columns in ``numeric`` are right-aligned."""
    numeric = set(numeric)
    head = tag("tr", *(tag("th", escape(h)) for h in headers))
    body = "".join(tag("tr", *(tag("td", c, class_="num" if i in numeric else None) for i, c in enumerate(r)))
                   for r in rows)
    return tag("table", tag("thead", head), tag("tbody", body))


def _section(kind: str, heading: str, lead: str, body: str, has_chart: bool, level: str = "h2") -> str:
    cls = "chart" if has_chart else "chart empty"
    return tag("section", tag(level, escape(heading)), tag("p", escape(lead), class_="lead") if lead else "", body,
                class_=cls, data_chart=kind)


def _pill(label: str, count: int, colour: str) -> str:
    return tag("span", escape(f"{count} {label}"), class_="pill" if count else "pill zero",
               style=f"background:{colour}")


def _header(stats, inspect, fold, title: str) -> str:
    model = stats.model if stats else inspect.model.path if inspect else fold.model if fold else "-"
    meta = [("model", model)]
    if stats is not None:
        d = stats.data
        batches = f"{d.get('batches')} batch" + ("" if d.get("batches") == 1 else "es")
        meta += [("data", f"{d.get('source')}; {d.get('samples')} samples in {batches}"), ("mode", stats.mode)]
    if inspect is not None:
        m = inspect.model
        meta.append(("graph", f"opset {m.opset}, {m.node_count} nodes, {m.bn_count} BN, {inspect.foldable} foldable"))
    if fold is not None:
        meta.append(("fold", f"{fold.bn_before} BN before, {fold.bn_after} after"
                             + (f", written to {fold.output}" if fold.output else ", not written")))
    parts = [tag("h1", escape(title)),
             tag("dl", *(tag("dt", escape(k)) + tag("dd", escape(v)) for k, v in meta), class_="meta")]
    if stats is not None:
        if stats.data.get("random"):
            parts.append(tag("div", escape("RANDOM DATA: these statistics say nothing about real data"),
                             class_="banner"))
        if stats.data.get("nonfinite_values"):
            parts.append(tag("div", escape(f"{stats.data['nonfinite_values']} NaN/Inf values in the data"),
                              class_="banner"))
        counts = stats.counts()
        parts.append(tag("div", *(_pill(v, counts[v], VERDICT_COLOUR[v]) for v in VERDICTS), class_="verdicts"))
        parts.append(tag("ul", *(tag("li", escape(line)) for line in stats.reading), class_="reading"))
    return tag("header", *parts)


# -- 1. drift by depth ---------------------------------------------------------------------------
def _drift_section(stats: StatsResult) -> str:
    layers = stats.layers
    lead = ("Largest per-channel |d| (mean shift in running-std units) and |log r| (log variance ratio) of each "
            "BN layer, in graph order. Marker colour is the layer's verdict; dashed lines are the thresholds.")
    if not layers:
        return _section("drift-by-depth", "Drift by depth", "", tag("p", escape(stats.reading[-1] if stats.reading else
                        "no BatchNormalization layer had statistics"), class_="none") + _skipped(stats), False)
    chart, caption = _drift_chart(stats)
    rows = [(str(layer.index), tag("span", escape(layer.name)), str(layer.channels), _verdict_span(layer.verdict),
             fmt(layer.max_abs_d), fmt(layer.max_abs_log_r), f"{layer.fraction_over:.0%}", escape(layer.why))
            for layer in layers]
    table = _table(("#", "layer", "ch", "verdict", "max|d|", "max|log r|", "over", "why"), rows, (0, 2, 4, 5, 6))
    return _section("drift-by-depth", "Drift by depth", lead, chart + caption + table + _skipped(stats), True)


def _verdict_span(verdict: str) -> str:
    return tag("span", escape(verdict), class_="sev", style=f"color:{VERDICT_COLOUR.get(verdict, '#333')}")


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
        out.append(tag("line", x1=x.a, x2=x.b, y1=f"{p:.1f}", y2=f"{p:.1f}", stroke=colour, stroke_width=1,
                        stroke_dasharray="3 3"))
        out.append(tag("text", escape(f"{label} threshold {value:g}"), x=at, y=f"{p - 4:.1f}", text_anchor=anchor,
                        class_="tick"))
    dropped, clamped, radius = 0, 0, max(2.0, min(4.5, (x.b - x.a) / n / 3))
    for key, shape in (("d", "circle"), ("log_r", "diamond")):
        label, colour, dash = SERIES[key]
        points = [(i, x.px(i), y.place(v)) for i, v in enumerate(values[key])]
        for segment in line_segments([(px, pl[0]) if pl else None for _, px, pl in points]):
            out.append(tag("polyline", points=" ".join(f"{a:.1f},{b:.1f}" for a, b in segment), fill="none",
                            stroke=colour, stroke_width=1.5, stroke_dasharray=dash or None))
        for i, px, placed in points:
            layer = layers[i]
            tip = (f"#{layer.index} {layer.name}: {label} {fmt(values[key][i])}, verdict {layer.verdict}"
                   + (f" ({layer.why})" if layer.why else ""))
            if placed is None:
                dropped += 1
                out.append(tag("g", tag("title", escape(tip)), tag("text", "NaN", x=f"{px:.1f}", y=y.a - 4,
                                text_anchor="middle", class_="tick")))
                continue
            clamped += placed[1]
            verdict_colour = VERDICT_COLOUR.get(layer.verdict, "#333")
            out.append(draw_marker(shape, px, placed[0], verdict_colour, placed[1], tip, radius))
    out.append(_layer_labels(layers, x, y.a, names_room))
    present = [v for v in VERDICTS if any(layer.verdict == v for layer in layers)]
    legend = [(tag("circle", r=4.5, fill="#333", cx=0, cy=0), SERIES["d"][0]),
              (tag("polygon", points="0,-5 5,0 0,5 -5,0", fill="#56B4E9"), SERIES["log_r"][0])]
    legend += [(tag("rect", x=-5, y=-5, width=10, height=10, rx=2, fill=VERDICT_COLOUR[v]), v) for v in present]
    out.append(draw_legend(legend, 64, 16))
    return svg_document(WIDTH, height, "Drift by depth: max |d| and max |log r| per BN layer", *out), \
        clamp_note(dropped, clamped)


def _layer_labels(layers: Sequence[LayerStats], x: Axis, base: float, room: int) -> str:
    n = len(layers)
    step = 1 if room else max(1, math.ceil(n / 20))
    out = []
    for i in range(0, n, step):
        px, layer = x.px(i), layers[i]
        out.append(tag("line", x1=f"{px:.1f}", x2=f"{px:.1f}", y1=base, y2=base + 4, class_="axis"))
        if room:
            name = layer.name if len(layer.name) <= 22 else layer.name[:21] + "\u2026"
            out.append(tag("text", tag("title", escape(layer.name)), escape(name), x=f"{px:.1f}", y=base + 12,
                            text_anchor="end", transform=f"rotate(-40 {px:.1f} {base + 12})", class_="tick"))
        else:
            out.append(tag("text", escape(layer.index), x=f"{px:.1f}", y=base + 15, text_anchor="middle",
                           class_="tick"))
    return "".join(out)


# -- 2. worst layers -----------------------------------------------------------------------------
def worst_layers(stats: StatsResult, count: int = WORST_LAYERS) -> list[LayerStats]:
    """Up to ``count`` layers, not-ok first, then by max |d| + max |log r| (NaN counts as 0)."""
    def score(layer: LayerStats) -> float:
        return sum(0.0 if math.isnan(v) else v for v in (layer.max_abs_d, layer.max_abs_log_r))

    return sorted(stats.layers, key=lambda layer: (layer.verdict == "ok", -score(layer)))[:count]


def _worst_group(stats: StatsResult) -> str:
    chosen = worst_layers(stats)
    lead = ("Per channel, the batch statistics measured on the data against the running statistics stored in the "
            "model; on the dashed diagonal they agree. Orange points are channels beyond a threshold.")
    if not chosen:
        return tag("div", tag("h2", escape("Worst layers")),
                    _section("worst-layer", "No layers", "", tag("p", escape("no layer to show"), class_="none"),
                             False, "h3"), class_="group")
    sections = [_worst_section(stats, layer) for layer in chosen]
    return tag("div", tag("h2", escape("Worst layers")), tag("p", escape(lead), class_="lead"), *sections,
               class_="group")


def _worst_section(stats: StatsResult, layer: LayerStats) -> str:
    t = stats.thresholds
    max_d = t.per_layer_max_d.get(layer.name, t.max_d)
    max_r = t.per_layer_max_log_r.get(layer.name, t.max_log_r)
    with np.errstate(invalid="ignore"):
        over = (np.abs(layer.d) > max_d) | (np.abs(layer.log_r) > max_r)
    panels, dropped, clamped = [], 0, 0
    for i, (what, batch, running, log) in enumerate((("mean", layer.batch_mean, layer.running_mean, False),
                                                      ("variance", layer.batch_var, layer.running_var, True))):
        svg, d, c = _scatter(layer, what, batch, running, over, log, 80 + i * (WIDTH // 2), WIDTH // 2 - 110)
        panels.append(svg)
        dropped, clamped = dropped + d, clamped + c
    heading = f"#{layer.index} {layer.name}: {layer.verdict}"
    lead = (f"{layer.channels} channels; max |d| {fmt(layer.max_abs_d)}, max |log r| {fmt(layer.max_abs_log_r)}"
            + (f"; {layer.why}" if layer.why else ""))
    diagonal = tag("line", x1=-6, x2=6, y1=0, y2=0, stroke="#8a939c", stroke_dasharray="4 3")
    legend = draw_legend([(tag("circle", r=3.5, fill=VERDICT_COLOUR["ok"]), "within thresholds"),
                      (tag("circle", r=3.5, fill=VERDICT_COLOUR["drift"]), "beyond a threshold"),
                      (diagonal, "batch = running")], 70, 14)
    svg = svg_document(WIDTH, 390, f"Batch against running statistics per channel of {layer.name}", legend, *panels)
    return _section("worst-layer", heading, lead, svg + clamp_note(dropped, clamped, "channel value"), True, "h3")


def _scatter(layer: LayerStats, what: str, batch: np.ndarray, running: np.ndarray, over: np.ndarray, log: bool,
             left: float, width: float) -> tuple[str, int, int]:
    lo, hi = padded_range(np.concatenate([batch, running]), log=log)
    x, y = Axis(lo, hi, left, left + width, log), Axis(lo, hi, 340, 40, log)
    out = [draw_frame(x, y, f"running {what}" + (" (log)" if log else ""), f"batch {what}" + (" (log)" if log else "")),
           tag("line", x1=x.a, y1=y.a, x2=x.b, y2=y.b, stroke="#8a939c", stroke_dasharray="4 3")]
    dropped = clamped = 0
    for c in range(batch.shape[0]):
        px, py = x.place(running[c]), y.place(batch[c])
        if px is None or py is None:
            dropped += 1
            continue
        hollow = px[1] or py[1]
        clamped += hollow
        tip = (f"{layer.name} channel {c}: batch {what} {fmt(batch[c], 4)}, running {what} {fmt(running[c], 4)}, "
               f"d {fmt(layer.d[c])}, log r {fmt(layer.log_r[c])}")
        out.append(draw_marker("circle", px[0], py[0], VERDICT_COLOUR["drift" if over[c] else "ok"], hollow, tip, 3.5))
    return "".join(out), dropped, clamped


# -- 3. lint findings ----------------------------------------------------------------------------
def _lint_section(inspect: InspectResult) -> str:
    flags = [(layer.name, f) for layer in inspect.layers for f in layer.flags]
    order = {"error": 0, "warning": 1, "info": 2}
    flags.sort(key=lambda lf: order.get(lf[1].severity, 3))
    notes = "".join(tag("li", escape(n)) for n in inspect.model.notes)
    notes = tag("ul", notes) if notes else ""
    lead = f"Static checks of the stored BN parameters of {len(inspect.layers)} layer(s); no data involved."
    if not flags:
        return _section("lint", "Lint findings", lead, tag("p", escape("No findings."), class_="none") + notes, False)
    counts = {s: sum(f.severity == s for _, f in flags) for s in SEVERITY_COLOUR}
    chart = bar_chart([(s, float(n), SEVERITY_COLOUR[s], f"{n} {s}") for s, n in counts.items()], 420, "flags",
                   integer=True)
    rows = [(tag("span", escape(f.severity), class_="sev", style=f"color:{SEVERITY_COLOUR.get(f.severity, '#333')}"),
             escape(name), escape(f.code), escape(_channels(f.channels)), escape(f.message)) for name, f in flags]
    table = _table(("severity", "layer", "code", "channels", "message"), rows)
    return _section("lint", "Lint findings", lead, chart + table + notes, True)


def _channels(channels: Sequence[int], limit: int = 8) -> str:
    if not channels:
        return "-"
    shown = ", ".join(map(str, channels[:limit]))
    return shown + (f" \u2026 (+{len(channels) - limit})" if len(channels) > limit else "")


# -- 4. fold summary -----------------------------------------------------------------------------
def _fold_section(fold: FoldResult) -> str:
    lead = (f"{sum(r.folded for r in fold.layers)} of {len(fold.layers)} BN layer(s) folded. Weight range growth is "
            f"max|W'| / max|W| of the target's weights: beyond x{GROWTH_WARNING:g}, per-tensor int8 loses resolution.")
    rows = [(escape(r.name), tag("span", escape("folded" if r.folded else "kept"), class_="sev",
                              style=f"color:{VERDICT_COLOUR['ok'] if r.folded else VERDICT_COLOUR['drift']}"),
             escape(f"{r.target} ({r.target_op})" if r.target else "-"),
             escape(r.reason or "; ".join(r.notes) or ""), escape(fmt(r.weight_range_growth)),
             escape(fmt(r.channel_range_imbalance))) for r in fold.layers]
    table = _table(("layer", "result", "target", "reason / notes", "growth", "imbalance"), rows, (4, 5))
    extra = "".join(tag("div", escape(w), class_="banner") for w in fold.warnings) + _verification(fold)
    grown = [r for r in fold.layers if r.folded and r.weight_range_growth is not None]
    if not grown:
        return _section("fold", "Fold summary", lead, tag("p", escape("No layer was folded."), class_="none")
                        + table + extra, False)
    bars = [(r.name, float(r.weight_range_growth),
             SEVERITY_COLOUR["error"] if r.weight_range_growth > GROWTH_WARNING else "#0072B2",
             f"{r.name} into {r.target}: weight range x{fmt(r.weight_range_growth)}") for r in grown]
    chart = bar_chart(bars, WIDTH, "weight range growth (log, 1 = unchanged)", log=True,
                   refs=[(GROWTH_WARNING, f"x{GROWTH_WARNING:g} int8 risk")])
    return _section("fold", "Fold summary", lead, chart + table + extra, True)


def _verification(fold: FoldResult) -> str:
    if not fold.verification:
        return ""
    rows = [(escape(v.provider), escape("passed" if v.passed else "FAILED"), escape(o.name), escape(fmt(o.max_abs)),
             escape(fmt(o.max_rel)), escape(f"{fmt(o.atol)} / {fmt(o.rtol)}"), escape(v.data))
            for v in fold.verification for o in v.outputs]
    return tag("h3", escape("Verification against the unoptimised original")) + _table(
        ("provider", "result", "output", "max abs", "max rel", "atol / rtol", "data"), rows, (3, 4))
