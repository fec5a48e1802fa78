"""Bad input is exit 2 and one line, with nothing written (issue 19, attack round three).

Each case here was exit 3 (a traceback-worthy internal error), exit 0 or 1 with a wrong verdict,
or wrote its output before it found the input bad.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import bn_inits, bn_node, init, make_model, ort_run, vi
from helpers import cli
from onnx import helper

ROOT = Path(__file__).parents[1]


def _one_line_exit_2(result) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "internal error" not in result.stderr


def _bnscope(*args, cwd=None, env=None, **kwargs) -> subprocess.CompletedProcess:
    environ = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "120", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bnscope", *map(str, args)],
        cwd=cwd,
        env=environ,
        capture_output=True,
        timeout=120,
        **kwargs,
    )


# -- recalibrate --eval-data is checked before -o is written -------------------------------------------
@pytest.fixture
def classifier(tmp_path, rng):
    """x -> Conv -> BN -> GlobalAveragePool -> Flatten -> logits (3 classes), 16 samples of data."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        bn_node("c", "b"),
        helper.make_node("GlobalAveragePool", ["b"], ["p"]),
        helper.make_node("Flatten", ["p"], ["logits"]),
    ]
    inits = [init("w", rng.standard_normal((3, 3, 1, 1)).astype(np.float32)), *bn_inits(rng, 3)]
    model = make_model(nodes, [vi("x", ["N", 3, 4, 4])], [vi("logits", ["N", 3])], inits)
    onnx.save(model, tmp_path / "m.onnx")
    x = rng.standard_normal((16, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return tmp_path, x


@pytest.mark.parametrize(
    "labels",
    [
        np.arange(5) % 3,  # 5 labels for 16 samples
        np.eye(3, dtype=np.float32)[np.arange(16) % 3],  # one-hot float labels (2-D)
        np.array(["cat"] * 16),  # strings
        np.full(16, 0.5),  # float labels
    ],
    ids=["5-for-16", "one-hot", "strings", "floats"],
)
def test_recalibrate_bad_eval_labels_write_nothing(classifier, labels):
    folder, x = classifier
    np.savez(folder / "eval.npz", x=x, labels=labels)
    out = folder / "out.onnx"
    out.write_bytes(b"an existing file that must survive")
    result = cli(
        "recalibrate", folder / "m.onnx", "--data", folder / "x.npy", "-o", out, "--eval-data", folder / "eval.npz"
    )
    _one_line_exit_2(result)
    assert "labels" in result.stderr
    assert out.read_bytes() == b"an existing file that must survive"
    assert sorted(p.name for p in folder.iterdir()) == ["eval.npz", "m.onnx", "out.onnx", "x.npy"]


def test_recalibrate_good_eval_labels_report_top1(classifier):
    folder, x = classifier
    np.savez(folder / "eval.npz", x=x, labels=(np.arange(16) % 3).reshape(16, 1))
    args = ["--data", folder / "x.npy", "-o", folder / "out.onnx", "--eval-data", folder / "eval.npz", "-f", "json"]
    result = cli("recalibrate", folder / "m.onnx", *args)
    assert result.exit_code == 0, result.stderr
    accuracy = json.loads(result.stdout)["accuracy"]
    for key, model in (("before", folder / "m.onnx"), ("after", folder / "out.onnx")):
        predicted = np.argmax(ort_run(onnx.load(model), {"x": x})[0], axis=1)
        assert accuracy[key] == pytest.approx(float(np.mean(predicted == np.arange(16) % 3)))
