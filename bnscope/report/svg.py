"""Hand-written SVG for the HTML report: escaped markup, axes, frames, markers, legends, bar charts.

The markup is well-formed XML (void elements closed, only XML entities) and every piece of text goes
through :func:`html.escape`, control characters and bidirectional overrides shown escaped first. Non-finite values never reach coordinates: :meth:`Axis.place` returns
None for NaN and clamps infinite points (and, on a log axis, zero or negative ones) to the axis edge;
:func:`clamp_note` counts both for the chart's caption.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from bnscope.report.text import printable

CLOSED = {"meta", "br", "circle", "rect", "line", "path", "polyline", "polygon"}


# -- markup --------------------------------------------------------------------------------------
def escape(text) -> str:
    return html.escape(printable(str(text)), quote=True)


def tag(name: str, *children: str, **attrs) -> str:
    """An element; ``children`` are markup (escape text with :func:`escape`). ``class_`` -> class, ``_`` -> ``-``."""
    a = "".join(f' {k.rstrip("_").replace("_", "-")}="{escape(v)}"' for k, v in attrs.items() if v is not None)
    if not children and name in CLOSED:
        return f"<{name}{a}/>"
    return f"<{name}{a}>{''.join(children)}</{name}>"


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


# -- axes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    """Data range ``lo..hi`` onto pixels ``a..b`` (b < a for a y axis), optionally log10."""

    lo: float
    hi: float
    a: float
    b: float
    log: bool = False
    integer: bool = False

    def _t(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def px(self, v: float) -> float:
        lo, hi = self._t(self.lo), self._t(self.hi)
        return self.a + (self._t(v) - lo) / (hi - lo) * (self.b - self.a)

    def place(self, v) -> tuple[float, bool] | None:
        """Pixel and whether it was clamped; None for NaN."""
        v = float(v)
        if math.isnan(v):
            return None
        if self.log and v <= 0:
            return self.px(self.lo), True
        clamped = min(max(v, self.lo), self.hi)
        return self.px(clamped), clamped != v

    def ticks(self) -> list[float]:
        if self.log:
            first, last = math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi))
            for mantissas in ((1, 2, 5), (1,)):
                ticks = [
                    t for k in range(first, last + 1) for m in mantissas if self.lo <= (t := m * 10.0**k) <= self.hi
                ]
                if 2 <= len(ticks) <= 8:
                    return ticks
            if len(ticks) > 8:
                return ticks[:: math.ceil(len(ticks) / 7)]
        return _nice_ticks(self.lo, self.hi, integer=self.integer)


def _nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    raw = max((hi - lo) / n, 1.0) if integer else (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in ((1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, int(math.floor(hi / step + 1e-9)) + 1)]


def padded_range(values: Iterable[float], log: bool = False, pad: float = 0.06) -> tuple[float, float]:
    """A padded range over the finite (and, for log, positive) values."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)] if log else v[np.isfinite(v)]
    if log:
        if not v.size:
            return 0.1, 10.0
        lo, hi = math.log10(v.min()), math.log10(v.max())
        lo, hi = (lo - 1, hi + 1) if hi - lo < 1e-9 else (lo, hi)
        return 10 ** (lo - pad * (hi - lo)), 10 ** (hi + pad * (hi - lo))
    if not v.size:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - max(1.0, abs(lo)) * 0.5, hi + max(1.0, abs(hi)) * 0.5
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def draw_frame(x: Axis, y: Axis, xlabel: str, ylabel: str, xticks: bool = True, yticks: bool = True) -> str:
    """Grid, axes, tick labels and axis titles for one panel."""
    top, bottom, left, right = y.b, y.a, x.a, x.b
    out = []
    for t in y.ticks() if yticks else ():
        p = y.px(t)
        out.append(tag("line", x1=left, x2=right, y1=f"{p:.1f}", y2=f"{p:.1f}", class_="grid"))
        out.append(tag("text", escape(f"{t:g}"), x=left - 5, y=f"{p + 3:.1f}", text_anchor="end", class_="tick"))
    if xticks:
        for t in x.ticks():
            p = x.px(t)
            out.append(tag("line", x1=f"{p:.1f}", x2=f"{p:.1f}", y1=top, y2=bottom, class_="grid"))
            out.append(tag("text", escape(f"{t:g}"), x=f"{p:.1f}", y=bottom + 14, text_anchor="middle", class_="tick"))
    out.append(tag("path", d=f"M{left},{top} V{bottom} H{right}", fill="none", class_="axis"))
    if xlabel:
        out.append(
            tag("text", escape(xlabel), x=(left + right) / 2, y=bottom + 30, text_anchor="middle", class_="label")
        )
    if ylabel:
        out.append(
            tag(
                "text",
                escape(ylabel),
                x=left - 40,
                y=(top + bottom) / 2,
                text_anchor="middle",
                class_="label",
                transform=f"rotate(-90 {left - 40} {(top + bottom) / 2})",
            )
        )
    return "".join(out)


def svg_document(width: float, height: float, label: str, *children: str) -> str:
    return tag(
        "svg",
        tag("title", escape(label)),
        *children,
        xmlns="http://www.w3.org/2000/svg",
        width=width,
        height=height,
        viewBox=f"0 0 {width} {height}",
        role="img",
    )


def draw_marker(shape: str, cx: float, cy: float, colour: str, hollow: bool, tip: str, r: float = 4.5) -> str:
    fill, stroke = ("#fff", colour) if hollow else (colour, "#fff")
    style = dict(fill=fill, stroke=stroke, stroke_width=1.5 if hollow else 1)
    if shape == "diamond":
        pts = f"{cx:.1f},{cy - r - 1:.1f} {cx + r + 1:.1f},{cy:.1f} {cx:.1f},{cy + r + 1:.1f} {cx - r - 1:.1f},{cy:.1f}"
        body = tag("polygon", points=pts, **style)
    else:
        body = tag("circle", cx=f"{cx:.1f}", cy=f"{cy:.1f}", r=r, **style)
    return tag("g", tag("title", escape(tip)), body)


def draw_legend(items: Sequence[tuple[str, str]], x: float, y: float) -> str:
    """Items are (swatch markup placed at 0,0, label); laid out left to right."""
    out, pos = [], x
    for swatch, label in items:
        out.append(tag("g", swatch, transform=f"translate({pos:.0f} {y})"))
        out.append(tag("text", escape(label), x=f"{pos + 10:.0f}", y=y + 4))
        pos += 22 + 6.2 * len(label)
    return "".join(out)


def clamp_note(dropped: int, clamped: int, what: str = "value") -> str:
    notes = []
    if dropped:
        notes.append(f"{dropped} NaN {what}(s) not drawn")
    if clamped:
        notes.append(
            f"{clamped} {what}(s) outside the axis (inf, or <= 0 on a log axis) clamped to its edge, drawn hollow"
        )
    return tag("p", escape("; ".join(notes) + "."), class_="note") if notes else ""


def line_segments(points: Sequence[tuple[float, float] | None]) -> list[list[tuple[float, float]]]:
    """Consecutive runs of drawable points (a NaN breaks the line)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for p in points:
        if p is None:
            runs.append([])
        else:
            runs[-1].append(p)
    return [r for r in runs if len(r) > 1]


def bar_chart(
    bars: Sequence[tuple[str, float, str, str]],
    width: int,
    unit: str,
    log: bool = False,
    refs: Sequence[tuple[float, str]] = (),
    integer: bool = False,
) -> str:
    """Horizontal bars (label, value, colour, tooltip) from 0 (or 1 on a log axis), with reference lines."""
    label_w = min(190, 16 + 6 * max(len(b[0][:28]) for b in bars))
    row = 20
    height = 46 + row * len(bars)
    values = [b[1] for b in bars] + [r[0] for r in refs]
    if log:
        lo, hi = padded_range(values + [1.0], log=True)
    else:
        lo, hi = 0.0, max([v for v in values if math.isfinite(v)] + [1]) * 1.1
    x = Axis(lo, hi, label_w, width - 16, log, integer)
    y = Axis(0, len(bars), 14 + row * len(bars), 14)
    out = [draw_frame(x, y, unit, "", yticks=False)]
    base = x.px(1.0 if log else 0.0)
    if log:
        out.append(tag("line", x1=f"{base:.1f}", x2=f"{base:.1f}", y1=y.a, y2=y.b, class_="axis"))
    for k, (label, value, colour, tip) in enumerate(bars):
        top = 14 + k * row + 3
        short = label if len(label) <= 28 else label[:27] + "\u2026"
        out.append(
            tag("text", tag("title", escape(label)), escape(short), x=label_w - 6, y=top + 11, text_anchor="end")
        )
        placed = x.place(value)
        if placed is None:
            out.append(tag("text", "NaN", x=base + 4, y=top + 11, class_="tick"))
            continue
        a, b = sorted((base, placed[0]))
        out.append(
            tag(
                "g",
                tag("title", escape(tip)),
                tag(
                    "rect",
                    x=f"{a:.1f}",
                    y=top,
                    width=f"{max(b - a, 1):.1f}",
                    height=row - 6,
                    fill=colour,
                    fill_opacity=0.45 if placed[1] else None,
                ),
            )
        )
        out.append(tag("text", escape(fmt(value)), x=f"{b + 4:.1f}", y=top + 11, class_="tick"))
    for value, label in refs:
        if lo <= value <= hi:
            p = x.px(value)
            out.append(
                tag("line", x1=f"{p:.1f}", x2=f"{p:.1f}", y1=y.a, y2=y.b - 4, stroke="#D55E00", stroke_dasharray="4 3")
            )
            out.append(tag("text", escape(label), x=f"{p:.1f}", y=y.b - 6, text_anchor="middle", class_="tick"))
    return svg_document(width, height, f"bar chart of {unit}", *out)
