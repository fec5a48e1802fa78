"""The HTML report: well-formed, self-contained, one chart per section with data, escaped, NaN-proof.

Real results come from ``sample_models/broken.onnx`` (one ok, two stale, one broken layer with a
NaN running variance; one error and one warning flag; three folded, one kept). Edge cases are
made from them with ``dataclasses.replace``.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import replace

import numpy as np
import pytest
from helpers import SAMPLES

from bnscope.numerics.lint import Flag
from bnscope.report.html import render_html, write_html
from bnscope.report.html_stats import worst_layers
from bnscope.workflows.fold import fold_model
from bnscope.workflows.inspect import inspect_model
from bnscope.workflows.options import FoldSettings
from bnscope.workflows.stats import collect_stats

EVIL = "<script>alert('x')</script>&"
SVG_NS = "http://www.w3.org/2000/svg"
NUMERIC_ATTRS = ("x", "y", "x1", "x2", "y1", "y2", "cx", "cy", "r", "width", "height", "points", "d", "transform")


@pytest.fixture(scope="module")
def results():
    model = SAMPLES / "broken.onnx"
    stats = collect_stats(model, SAMPLES / "broken_calib.npz")
    return stats, inspect_model(model), fold_model(model, FoldSettings(output=None, dry_run=True))


def parse(page: str) -> ET.Element:
    """Strict XML parse of the whole page (the renderer emits XHTML-compatible markup)."""
    assert page.startswith("<!DOCTYPE html>\n")
    return ET.fromstring(page)


def local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def chart_sections(root: ET.Element) -> list[ET.Element]:
    return [s for s in root.iter("section") if "data-chart" in s.attrib]


def svg_count(element: ET.Element) -> int:
    return sum(local(e.tag) == "svg" for e in element.iter())


def assert_finite_geometry(root: ET.Element) -> None:
    for e in root.iter():
        if not e.tag.startswith("{" + SVG_NS):
            continue
        for key in NUMERIC_ATTRS:
            value = e.attrib.get(key, "")
            assert not re.search(r"nan|inf", value, re.I), (local(e.tag), key, value)


def test_render_html_well_formed_with_every_section(results):
    root = parse(render_html(*results, title="broken"))
    kinds = [s.get("data-chart") for s in chart_sections(root)]
    assert kinds == ["drift-by-depth", "worst-layer", "worst-layer", "worst-layer", "lint", "fold"]
    assert root.find("body/main/header/h1").text == "broken"
    assert_finite_geometry(root)


def test_render_html_one_chart_per_section_with_data(results):
    stats, inspect, fold = results
    clean = replace(inspect, layers=tuple(replace(layer, flags=()) for layer in inspect.layers))
    for args in (results, (stats, clean, fold)):
        for section in chart_sections(parse(render_html(*args))):
            empty = "empty" in section.get("class", "").split()
            assert svg_count(section) == (0 if empty else 1), section.get("data-chart")
    lint = [s for s in chart_sections(parse(render_html(stats, clean, fold))) if s.get("data-chart") == "lint"]
    assert "empty" in lint[0].get("class")


def test_render_html_is_self_contained(results):
    page = render_html(*results)
    assert set(re.findall(r"https?://[^\s\"'<>)]*", page)) == {SVG_NS}
    for banned in ("<script", "<link", "<img", "<iframe", " src=", "@import", "url(", "@font-face"):
        assert banned not in page.lower()


def test_render_html_escapes_names(results):
    stats, inspect, fold = results
    stats = replace(
        stats,
        layers=tuple(replace(layer, name=EVIL + layer.name) for layer in stats.layers),
        reading=(EVIL,),
        data={**stats.data, "source": EVIL},
    )
    layer = inspect.layers[0]
    inspect = replace(inspect, layers=(replace(layer, name=EVIL, flags=(Flag("x", "error", EVIL, (1,)),)),))
    fold = replace(fold, layers=tuple(replace(r, name=EVIL, reason=EVIL) for r in fold.layers))
    page = render_html(stats, inspect, fold, title=EVIL)
    parse(page)
    assert "<script" not in page and "&lt;script&gt;" in page


def test_render_html_survives_nan_inf_and_zero_variance(results):
    stats = results[0]
    base = stats.layers[0]
    c = base.channels
    nan, inf = np.full(c, np.nan), np.full(c, np.inf)
    all_nan = replace(base, name="all_nan", verdict="broken", d=nan, log_r=nan, batch_mean=nan, batch_var=nan)
    infinite = replace(base, name="infinite", index=5, verdict="broken", d=inf, log_r=-inf, batch_mean=inf)
    dead = replace(base, name="dead", index=6, verdict="dead", batch_var=np.zeros(c), log_r=-inf)
    assert math.isnan(all_nan.max_abs_d) and math.isinf(infinite.max_abs_d)
    thresholds = replace(stats.thresholds, max_d=math.inf, max_log_r=math.nan)
    root = parse(render_html(replace(stats, layers=stats.layers + (all_nan, infinite, dead), thresholds=thresholds)))
    assert_finite_geometry(root)
    text = "".join(root.itertext())
    assert "not drawn" in text and "clamped" in text
    order = [w.name for w in worst_layers(replace(stats, layers=(base, all_nan, infinite, dead)), 4)]
    assert order == ["infinite", "dead", "all_nan", base.name]  # not ok first, inf beats everything, NaN counts 0


def test_render_html_many_layers_and_channels(results):
    stats = results[0]
    wide = replace(
        stats.layers[1],
        channels=512,
        **{
            k: np.resize(getattr(stats.layers[1], k), 512)
            for k in ("batch_mean", "batch_var", "running_mean", "running_var", "d", "log_r")
        },
    )
    layers = tuple(replace(wide, name=f"layer_{k}", index=k) for k in range(80))
    root = parse(render_html(replace(stats, layers=layers)))
    assert len(chart_sections(root)) == 4
    assert_finite_geometry(root)


def test_render_html_without_results_or_layers(results):
    root = parse(render_html())
    assert svg_count(root) == 0
    root = parse(render_html(replace(results[0], layers=())))
    assert svg_count(root) == 0 and all("empty" in s.get("class") for s in chart_sections(root))


def test_worst_layers_not_ok_first(results):
    names = [layer.name for layer in worst_layers(results[0], 4)]
    assert names[-1] == "bn1_healthy"
    assert names[0] == "bn3_never_updated"  # largest max |d| + max |log r| among the not-ok


def test_write_html_atomic(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old")
    assert write_html(target, "<p>caf\u00e9</p>") == target
    assert target.read_text(encoding="utf-8") == "<p>caf\u00e9</p>"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    with pytest.raises(FileNotFoundError):
        write_html(tmp_path / "missing" / "r.html", "x")
