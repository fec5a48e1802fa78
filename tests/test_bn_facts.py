"""One source of BN facts (onnxio.bn): every command gives the same answer to "is this a BN" and
"is it in training mode".

Two inputs told the old answers apart: a node ``BatchNormalization`` of another domain (fold read it
as a BN and crashed with KeyError) and an opset-9 BN listing its five outputs (fold and stats called it
training mode, inspect and check's no_training_mode rule did not).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import bn_inits, bn_node, init, make_model, vi
from helpers import cli
from onnx import helper

from bnscope.onnxio.bn import is_batchnorm, training_mode


def conv_bn(rng, outputs=("y",), domain: str = "", opset: int = 17) -> onnx.ModelProto:
    """x -> Conv(3->4, 3x3, pad 1) -> BatchNormalization(domain) -> outputs."""
    w = init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])
    bn = bn_node("c", list(outputs))
    bn.domain = domain
    shapes = [vi(o, [2, 4, 6, 6] if k == 0 else [4]) for k, o in enumerate(outputs)]
    model = make_model([conv, bn], [vi("x", [2, 3, 6, 6])], shapes, [w, *bn_inits(rng, 4)], opset=opset)
    if domain:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return model


def calibration(tmp_path, rng):
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((8, 3, 6, 6)).astype(np.float32))
    return path


def test_is_batchnorm_only_in_the_default_domain():
    for domain, expected in (("", True), ("ai.onnx", True), ("com.microsoft", False), ("com.example", False)):
        node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], domain=domain)
        assert is_batchnorm(node) is expected
    assert not is_batchnorm(helper.make_node("Conv", ["x", "w"], ["y"]))


@pytest.mark.parametrize("domain", ["com.example", "com.microsoft"])
def test_foreign_domain_batchnorm_is_no_internal_error_in_any_command(tmp_path, rng, domain):
    model_path = tmp_path / "m.onnx"
    onnx.save(conv_bn(rng, domain=domain), model_path)
    data = calibration(tmp_path, rng)
    runs = {
        "inspect": cli("inspect", model_path, "-f", "json"),
        "fold": cli("fold", model_path, "-o", tmp_path / "f.onnx"),
        "fold --dry-run": cli("fold", model_path, "--dry-run"),
        "fold --no-verify": cli("fold", model_path, "--no-verify", "-o", tmp_path / "g.onnx"),
        "check": cli("check", model_path, "--enable", "no_bn"),
        "stats": cli("stats", model_path, "--data", data),
        "recalibrate": cli("recalibrate", model_path, "--data", data, "-o", tmp_path / "r.onnx"),
        "run": cli("run", model_path),
    }
    for command, result in runs.items():
        assert result.exit_code in (0, 1, 2), (command, result.exit_code, result.stderr)
        assert "internal error" not in result.stderr, command
    inspected = json.loads(runs["inspect"].stdout)
    assert inspected["layers"] == []
    assert any(domain in note for note in inspected["model"]["notes"])
    # fold --no-verify has nothing to fold and writes the model unchanged apart from nothing: the node stays
    folded = onnx.load(tmp_path / "g.onnx")
    assert [(n.op_type, n.domain) for n in folded.graph.node] == [("Conv", ""), ("BatchNormalization", domain)]


def test_opset9_bn_with_five_outputs_is_training_mode_in_every_command(tmp_path, rng):
    outputs = ("y", "mean", "var", "saved_mean", "saved_var")
    model = conv_bn(rng, outputs=outputs, opset=9)
    assert training_mode(model.graph.node[1], 9) == "opset-9 BatchNormalization with 5 outputs"
    model_path = tmp_path / "m.onnx"
    onnx.save(model, model_path)

    inspected = json.loads(cli("inspect", model_path, "-f", "json").stdout)
    (layer,) = inspected["layers"]
    assert layer["training_mode"] == 1
    assert [f["code"] for f in layer["flags"] if f["severity"] == "error"] == ["training_mode"]

    checked = cli("check", model_path, "-f", "json")
    assert checked.exit_code == 1, checked.stderr
    rules = {r["rule"]: r for r in json.loads(checked.stdout)["results"]}
    assert rules["no_training_mode"]["passed"] is False

    folded = cli("fold", model_path, "--dry-run", "-f", "json")
    assert folded.exit_code == 0, folded.stderr
    (record,) = json.loads(folded.stdout)["layers"]
    assert not record["folded"] and "bnscope recalibrate" in record["reason"]

    stats = cli("stats", model_path, "--data", calibration(tmp_path, rng), "-f", "json")
    assert stats.exit_code == 0, stats.stderr
    assert any("training mode" in line for line in json.loads(stats.stdout)["summary"]["reading"])


def test_opset9_bn_with_one_output_is_inference_mode(tmp_path, rng):
    model = conv_bn(rng, opset=9)
    assert training_mode(model.graph.node[1], 9) is None
    model_path = tmp_path / "m.onnx"
    onnx.save(model, model_path)
    (layer,) = json.loads(cli("inspect", model_path, "-f", "json").stdout)["layers"]
    assert layer["training_mode"] == 0 and layer["fold"]["possible"]
