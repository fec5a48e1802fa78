"""A name with a newline must not forge a line in any text output (issue 19).

An input named ``"in\\nerror: model is corrupt, do not ship"`` printed ``error: model is corrupt...``
at column 0 of ``inspect``'s stdout; the same in CSV, Markdown and ``merge``'s header. Every text
format now writes line breaks inside names as ``\\n``; JSON escapes them itself and keeps the name.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import onnx
import pytest
from graphs import bn_inits, bn_node, make_model, vi
from helpers import cli

INPUT = "in\nerror: model is corrupt, do not ship"
LAYER = '=HYPERLINK("http://x")\r\nFORGED: layer ok'
FORGED = ("error: model is corrupt", "FORGED")


@pytest.fixture
def folder(tmp_path, rng):
    model = make_model([bn_node(INPUT, "y", name=LAYER)], [vi(INPUT, [2, 3, 4, 4])], [vi("y", [2, 3, 4, 4])])
    model.graph.initializer.extend(bn_inits(rng, 3))
    onnx.save(model, tmp_path / "m\nFORGED: path.onnx")
    np.save(tmp_path / "x.npy", (rng.standard_normal((8, 3, 4, 4)) * 3 + 1).astype(np.float32))
    return tmp_path


def _no_forged_line(text: str) -> None:
    for line in text.splitlines():
        assert not line.lstrip(' "|`#>-').startswith(FORGED), f"forged line: {line!r}"


COMMANDS = [
    ("inspect", "table"),
    ("inspect", "markdown"),
    ("stats", "table"),
    ("stats", "markdown"),
    ("stats", "csv"),
    ("check", "table"),
    ("check", "markdown"),
    ("check", "junit"),
    ("fold", "table"),
    ("fold", "markdown"),
    ("recalibrate", "table"),
    ("recalibrate", "markdown"),
    ("run", "table"),
]


@pytest.mark.parametrize("command,fmt", COMMANDS)
def test_names_with_newlines_stay_on_their_line(folder, command, fmt):
    model = folder / "m\nFORGED: path.onnx"
    data = ["--data", folder / "x.npy"]
    args = {
        "inspect": [model],
        "stats": [model, *data, "--per-channel"],
        "check": [model, *data],
        "fold": [model, "--dry-run"],
        "recalibrate": [model, *data, "-o", folder / "out.onnx"],
        "run": [model, "--random", "--runs", "1"],
    }[command]
    result = cli(command, *args, "--format", fmt)
    assert result.exit_code in (0, 1), result.stderr
    _no_forged_line(result.stdout)
    _no_forged_line(result.stderr)
    if command == "inspect" and fmt == "table":  # shown, escaped, not dropped
        assert "in\\nerror: model is corrupt" in result.stdout and '=HYPERLINK("http://x")\\r\\n' in result.stdout


def test_json_keeps_the_name_exactly(folder):
    result = cli("inspect", folder / "m\nFORGED: path.onnx", "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["layers"][0]["name"] == LAYER


def test_merge_header_and_csv_stay_on_their_lines(folder):
    model = folder / "m\nFORGED: path.onnx"
    for shard in (1, 2):
        args = ["stats", model, "--data", folder / "x.npy", "--shard", f"{shard}/2"]
        assert cli(*args, "--save-moments", folder / f"p{shard}.json").exit_code == 0
    for fmt in ("table", "markdown", "csv"):
        result = cli("merge", folder / "p1.json", folder / "p2.json", "--format", fmt)
        assert result.exit_code == 0, result.stderr
        _no_forged_line(result.stdout)


def test_csv_neutralises_formula_like_names(folder):
    result = cli("stats", folder / "m\nFORGED: path.onnx", "--data", folder / "x.npy", "--format", "csv")
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert len(rows) == 2 and len(result.stdout.splitlines()) == 2  # header + one layer, one line each
    name = rows[1][0]
    assert name.startswith("'=HYPERLINK(") and "\\r\\n" in name
    assert float(rows[1][5]) > 0  # numbers stay numbers (no quote before a minus sign)
