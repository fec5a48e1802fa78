"""Graphs whose nodes are not in topological order: ``inspect`` and ``fold`` sort an acyclic one in
memory (one warning on stderr, the file untouched); a cycle is a one-line input error (exit 2).

The unsorted model, its nodes listed in reverse::

    x (N,3,8,8) -> Conv(w 4x3x3x3, pads 1) -> h -> BatchNormalization -> y -> Relu -> out

The cyclic model::

    x -> Add(x, c) -> a -> Relu -> c
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from graphs import bn_inits, bn_node, init, make_model, ort_run, vi
from helpers import cli
from onnx import helper


def sorted_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("h", "y", name="bn"),
        helper.make_node("Relu", ["y"], ["out"], name="relu"),
    ]
    return make_model(
        nodes, [vi("x", ["N", 3, 8, 8])], [vi("out", ["N", 4, 8, 8])], [init("w", w), *bn_inits(rng, 4)], ir_version=8
    )


def unsorted_file(tmp_path: Path) -> Path:
    model = sorted_model()
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = tmp_path / "unsorted.onnx"
    onnx.save_model(model, str(path))
    return path


def cyclic_file(tmp_path: Path) -> Path:
    nodes = [
        helper.make_node("Add", ["x", "c"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["c"], name="relu"),
    ]
    path = tmp_path / "cyclic.onnx"
    onnx.save_model(make_model(nodes, [vi("x", ["N", 4])], [vi("a", ["N", 4])], ir_version=8), str(path))
    return path


def sort_warnings(stderr: str) -> list[str]:
    """The sort warnings in stderr: one plain line each when stderr is not a terminal."""
    return [line for line in stderr.splitlines() if line.startswith("warning: ") and "topological order" in line]


def test_inspect_unsorted_graph_is_sorted_with_a_warning(tmp_path):
    path = unsorted_file(tmp_path)
    before = path.read_bytes()
    result = cli("inspect", path, "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["summary"]["foldable"] == 1
    assert len(sort_warnings(result.stderr)) == 1 and "Traceback" not in result.stderr
    assert path.read_bytes() == before


def test_fold_unsorted_graph_is_sorted_with_one_warning(tmp_path):
    path, out = unsorted_file(tmp_path), tmp_path / "folded.onnx"
    before = path.read_bytes()
    result = cli("fold", path, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert len(sort_warnings(result.stderr)) == 1
    assert path.read_bytes() == before
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(folded, x)[0], ort_run(sorted_model(), x)[0], rtol=1e-4, atol=1e-5)


def test_inspect_and_fold_refuse_a_cycle_in_one_line(tmp_path):
    path = cyclic_file(tmp_path)
    for args in (["inspect", path], ["fold", path, "-o", tmp_path / "out.onnx"]):
        result = cli(*args)
        assert result.exit_code == 2 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "has a cycle" in lines[0] and "Hint:" in lines[0], result.stderr
    assert not (tmp_path / "out.onnx").exists()
