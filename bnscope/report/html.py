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

import os
import secrets
from pathlib import Path

from bnscope.onnxio.outputs import temp_prefix
from bnscope.report.fold import VERIFICATION_COLUMNS, verification_notes, verification_row
from bnscope.report.html_parts import (
    SEVERITY_COLOUR,
    VERDICT_COLOUR,
    WIDTH,
    channel_list,
    html_section,
    html_table,
    pill,
)
from bnscope.report.html_stats import drift_section, worst_group
from bnscope.report.svg import (
    bar_chart,
    escape,
    fmt,
    tag,
)
from bnscope.stats.summary import VERDICTS, StatsResult
from bnscope.workflows.fold import GROWTH_WARNING, FoldResult
from bnscope.workflows.inspect import InspectResult

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


def render_html(
    stats: StatsResult | None = None,
    inspect: InspectResult | None = None,
    fold: FoldResult | None = None,
    title: str = "bnscope report",
) -> str:
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
        parts += [drift_section(stats), worst_group(stats)]
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
    tmp = path.with_name(f"{temp_prefix(path)}{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(html_text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
        meta.append(
            (
                "fold",
                f"{fold.bn_before} BN before, {fold.bn_after} after"
                + (f", written to {fold.output}" if fold.output else ", not written"),
            )
        )
    parts = [
        tag("h1", escape(title)),
        tag("dl", *(tag("dt", escape(k)) + tag("dd", escape(v)) for k, v in meta), class_="meta"),
    ]
    if stats is not None:
        if stats.data.get("random"):
            parts.append(
                tag("div", escape("RANDOM DATA: these statistics say nothing about real data"), class_="banner")
            )
        if stats.data.get("nonfinite_values"):
            parts.append(
                tag("div", escape(f"{stats.data['nonfinite_values']} NaN/Inf values in the data"), class_="banner")
            )
        counts = stats.counts()
        parts.append(tag("div", *(pill(v, counts[v], VERDICT_COLOUR[v]) for v in VERDICTS), class_="verdicts"))
        lines = [*stats.reading, *(f"{f.cause}: {f.message} What to do: {f.action}" for f in stats.diagnosis)]
        parts.append(tag("ul", *(tag("li", escape(line)) for line in lines), class_="reading"))
    return tag("header", *parts)


# -- 3. lint findings ----------------------------------------------------------------------------
def _lint_section(inspect: InspectResult) -> str:
    flags = [(layer.name, f) for layer in inspect.layers for f in layer.flags]
    order = {"error": 0, "warning": 1, "info": 2}
    flags.sort(key=lambda lf: order.get(lf[1].severity, 3))
    notes = "".join(tag("li", escape(n)) for n in inspect.model.notes)
    notes = tag("ul", notes) if notes else ""
    lead = f"Static checks of the stored BN parameters of {len(inspect.layers)} layer(s); no data involved."
    if not flags:
        return html_section(
            "lint", "Lint findings", lead, tag("p", escape("No findings."), class_="none") + notes, False
        )
    counts = {s: sum(f.severity == s for _, f in flags) for s in SEVERITY_COLOUR}
    chart = bar_chart(
        [(s, float(n), SEVERITY_COLOUR[s], f"{n} {s}") for s, n in counts.items()], 420, "flags", integer=True
    )
    rows = [
        (
            tag("span", escape(f.severity), class_="sev", style=f"color:{SEVERITY_COLOUR.get(f.severity, '#333')}"),
            escape(name),
            escape(f.code),
            escape(channel_list(f.channels)),
            escape(f.message),
        )
        for name, f in flags
    ]
    table = html_table(("severity", "layer", "code", "channels", "message"), rows)
    return html_section("lint", "Lint findings", lead, chart + table + notes, True)


# -- 4. fold summary -----------------------------------------------------------------------------
def _fold_section(fold: FoldResult) -> str:
    lead = (
        f"{sum(r.folded for r in fold.layers)} of {len(fold.layers)} BN layer(s) folded. Weight range growth is "
        f"max|W'| / max|W| of the target's weights: beyond x{GROWTH_WARNING:g}, per-tensor int8 loses resolution."
    )
    rows = [
        (
            escape(r.name),
            tag(
                "span",
                escape("folded" if r.folded else "kept"),
                class_="sev",
                style=f"color:{VERDICT_COLOUR['ok'] if r.folded else VERDICT_COLOUR['drift']}",
            ),
            escape(f"{r.target} ({r.target_op})" if r.target else "-"),
            escape(r.reason or "; ".join(r.notes) or ""),
            escape(fmt(r.weight_range_growth)),
            escape(fmt(r.channel_range_imbalance)),
        )
        for r in fold.layers
    ]
    table = html_table(("layer", "result", "target", "reason / notes", "growth", "imbalance"), rows, (4, 5))
    extra = "".join(tag("div", escape(w), class_="banner") for w in fold.warnings) + _verification(fold)
    grown = [r for r in fold.layers if r.folded and r.weight_range_growth is not None]
    if not grown:
        return html_section(
            "fold", "Fold summary", lead, tag("p", escape("No layer was folded."), class_="none") + table + extra, False
        )
    bars = [
        (
            r.name,
            float(r.weight_range_growth),
            SEVERITY_COLOUR["error"] if r.weight_range_growth > GROWTH_WARNING else "#0072B2",
            f"{r.name} into {r.target}: weight range x{fmt(r.weight_range_growth)}",
        )
        for r in grown
    ]
    chart = bar_chart(
        bars,
        WIDTH,
        "weight range growth (log, 1 = unchanged)",
        log=True,
        refs=[(GROWTH_WARNING, f"x{GROWTH_WARNING:g} int8 risk")],
    )
    return html_section("fold", "Fold summary", lead, chart + table + extra, True)


def _verification(fold: FoldResult) -> str:
    if not fold.verification:
        return ""
    rows = [
        (escape(v.provider), *(escape(cell) for cell in verification_row(o)), escape(v.data))
        for v in fold.verification
        for o in v.outputs
    ]
    notes = "".join(tag("p", escape(line)) for v in fold.verification for line in verification_notes(v))
    return (
        tag("h3", escape("Verification against the unoptimised original"))
        + html_table(("provider", *VERIFICATION_COLUMNS, "data"), rows, (2, 3, 4))
        + notes
    )
