"""Small HTML pieces the report's sections share: tables, sections, pills, colours (colour-blind safe)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bnscope.report.svg import (
    escape,
    tag,
)

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
VERDICT_COLOUR = {
    "ok": "#009E73",
    "drift": "#E69F00",
    "unsure": "#999999",
    "stale": "#CC79A7",
    "inherited": "#F0E442",
    "dead": "#0072B2",
    "broken": "#D55E00",
}


SEVERITY_COLOUR = {"error": "#D55E00", "warning": "#E69F00", "info": "#0072B2"}


SERIES = {"d": ("max |d|", "#333333", ""), "log_r": ("max |log r|", "#56B4E9", "6 4")}


WIDTH = 900


def html_table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Iterable[int] = ()) -> str:
    """Rows hold markup; columns in ``numeric`` are right-aligned."""
    numeric = set(numeric)
    head = tag("tr", *(tag("th", escape(h)) for h in headers))
    body = "".join(
        tag("tr", *(tag("td", c, class_="num" if i in numeric else None) for i, c in enumerate(r))) for r in rows
    )
    return tag("table", tag("thead", head), tag("tbody", body))


def html_section(kind: str, heading: str, lead: str, body: str, has_chart: bool, level: str = "h2") -> str:
    cls = "chart" if has_chart else "chart empty"
    return tag(
        "section",
        tag(level, escape(heading)),
        tag("p", escape(lead), class_="lead") if lead else "",
        body,
        class_=cls,
        data_chart=kind,
    )


def pill(label: str, count: int, colour: str) -> str:
    return tag(
        "span", escape(f"{count} {label}"), class_="pill" if count else "pill zero", style=f"background:{colour}"
    )


def verdict_span(verdict: str) -> str:
    return tag("span", escape(verdict), class_="sev", style=f"color:{VERDICT_COLOUR.get(verdict, '#333')}")


def channel_list(channels: Sequence[int], limit: int = 8) -> str:
    if not channels:
        return "-"
    shown = ", ".join(map(str, channels[:limit]))
    return shown + (f" \u2026 (+{len(channels) - limit})" if len(channels) > limit else "")
