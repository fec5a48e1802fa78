"""BNs a gate must not pass without looking at (issue 19).

A BN in a model-local function (``FunctionProto``), a BN in an If branch, and a BN whose epsilon is
NaN all passed ``inspect --fail-on error``, ``check`` or ``stats --fail-on-drift``. A local function
is analysed inlined, as onnxruntime runs it; a BN in a control-flow body is counted by ``no_bn`` and,
not measured, fails ``--fail-on-drift`` and check's drift rules; a NaN epsilon is an error and a
``broken`` layer.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import bn_in_if_branches_model, bn_inits, bn_node, init, make_model, ort_run, vi
from helpers import cli
from onnx import TensorProto, helper, numpy_helper


def function_model(rng, var: np.ndarray) -> onnx.ModelProto:
    """X -> Conv -> local.ConvBN { Constant s, b, m, v; BatchNormalization(hidden_bn) } -> Y"""
    c = var.size
    values = {"s": rng.standard_normal(c) + 2, "b": rng.standard_normal(c), "m": rng.standard_normal(c), "v": var}
    body = [
        helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v.astype(np.float32), k))
        for k, v in values.items()
    ]
    body.append(helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="hidden_bn"))
    function = helper.make_function("local", "ConvBN", ["x"], ["y"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["X", "W"], ["c"], name="conv"),
            helper.make_node("ConvBN", ["c"], ["Y"], domain="local", name="call"),
        ],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, c, 4, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, c, 4, 4])],
        [init("W", rng.standard_normal((c, c, 1, 1)).astype(np.float32))],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[function], ir_version=10)
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def data(tmp_path, rng):
    path = tmp_path / "x.npy"
    np.save(path, rng.standard_normal((16, 3, 4, 4)).astype(np.float32))
    return path


@pytest.fixture
def broken_function(tmp_path, rng):
    path = tmp_path / "func.onnx"
    onnx.save(function_model(rng, np.array([1.0, np.nan, -1.0])), path)
    return path


def test_inspect_sees_the_bn_in_a_local_function(broken_function):
    result = cli("inspect", broken_function, "--fail-on", "error", "--format", "json")
    assert result.exit_code == 1
    (layer,) = json.loads(result.stdout)["layers"]
    assert layer["name"].startswith("hidden_bn")
    assert {"nonfinite", "negative_variance"} <= {f["code"] for f in layer["flags"]}
    assert "model-local function(s) local:ConvBN hold BatchNormalization" in result.stderr


def test_check_fails_a_bn_in_a_local_function(broken_function):
    result = cli("check", broken_function, "--enable", "no_bn", "--format", "json")
    assert result.exit_code == 1
    failed = {r["rule"] for r in json.loads(result.stdout)["results"] if not r["passed"]}
    assert {"no_bn", "no_nonfinite"} <= failed


def test_stats_fails_a_bn_in_a_local_function(broken_function, data):
    result = cli("stats", broken_function, "--data", data, "--fail-on-drift", "--format", "json")
    assert result.exit_code == 1
    (layer,) = json.loads(result.stdout)["layers"]
    assert layer["verdict"] == "broken"


def test_fold_folds_a_bn_in_a_local_function(tmp_path, rng):
    # valid parameters: the inlined BN folds into the Conv, and the output matches onnxruntime on the
    # original model with its function (optimisations off)
    model = function_model(rng, np.abs(rng.standard_normal(3)) + 0.1)
    onnx.save(model, tmp_path / "ok.onnx")
    result = cli("fold", tmp_path / "ok.onnx", "-o", tmp_path / "folded.onnx", "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["bn_before"], doc["bn_after"]) == (1, 0)
    folded = onnx.load(tmp_path / "folded.onnx")
    feeds = {"X": rng.standard_normal((2, 3, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(folded, feeds)[0], ort_run(model, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.fixture
def if_model(tmp_path):
    path = tmp_path / "if.onnx"
    onnx.save(bn_in_if_branches_model(), path)
    np.save(tmp_path / "x2.npy", np.random.default_rng(1).standard_normal((16, 2, 3, 3)).astype(np.float32))
    return path


def test_check_no_bn_counts_bns_in_if_branches(if_model, tmp_path):
    result = cli("check", if_model, "--enable", "no_bn", "--format", "json")
    assert result.exit_code == 1
    (rule,) = [r for r in json.loads(result.stdout)["results"] if r["rule"] == "no_bn"]
    assert not rule["passed"] and "3 BatchNormalization" in rule["message"] and "control-flow" in rule["message"]


def test_stats_fail_on_drift_fails_when_a_bn_in_a_branch_is_not_measured(if_model, tmp_path):
    result = cli("stats", if_model, "--data", tmp_path / "x2.npy", "--fail-on-drift")
    assert result.exit_code == 1, result.stdout
    assert "2 BN not measured" in result.stdout
    check = cli("check", if_model, "--data", tmp_path / "x2.npy", "--format", "json")
    assert check.exit_code == 1
    unmeasured = [r for r in json.loads(check.stdout)["results"] if "not measured" in r["message"]]
    assert {r["layer"] for r in unmeasured} == {"then_bn", "else_bn"} and not any(r["passed"] for r in unmeasured)


@pytest.fixture
def nan_epsilon(tmp_path, rng):
    path = tmp_path / "eps.onnx"
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y", epsilon=float("nan"))]
    inits = [init("w", rng.standard_normal((3, 3, 1, 1)).astype(np.float32)), *bn_inits(rng, 3)]
    onnx.save(make_model(nodes, [vi("x", [2, 3, 4, 4])], [vi("y", [2, 3, 4, 4])], inits), path)
    return path


def test_nan_epsilon_is_an_error_and_a_broken_layer(nan_epsilon, data):
    inspect = cli("inspect", nan_epsilon, "--fail-on", "error", "--format", "json")
    assert inspect.exit_code == 1
    codes = {f["code"]: f for f in json.loads(inspect.stdout)["layers"][0]["flags"]}
    assert codes["nonfinite_epsilon"]["severity"] == "error"
    stats = cli("stats", nan_epsilon, "--data", data, "--fail-on-drift", "--format", "json")
    assert stats.exit_code == 1
    assert json.loads(stats.stdout)["layers"][0]["verdict"] == "broken"
    check = cli("check", nan_epsilon, "--format", "json")
    assert check.exit_code == 1
