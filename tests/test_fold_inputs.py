"""``fold`` on inputs that are the model's fault, not bnscope's: one line and exit 2 (or a kept BN
with its reason), never exit 3; and a fold that removes nothing says so.

Models:
  training_mode_export (sample): BN(training_mode=1) with one output, which onnx's strict shape
      inference and onnxruntime both reject ("should be 3 when Training_mode = True").
  x -> Conv -> BN -> y with y declared [1, 5, 7, 6] (inference says [1, 4, 6, 6]).
  x -> BN -> y of a non-float element type (STRING, INT64, UINT8, BOOL, COMPLEX64, FLOAT8E4M3FN).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import bn_inits, bn_node, init, make_model, vi
from helpers import SAMPLES, cli
from onnx import TensorProto, helper

EXPORT = SAMPLES / "training_mode_export.onnx"


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "please report" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("flags", [["-o", "OUT"], ["--dry-run"], ["--no-verify", "-o", "OUT"]])
def test_fold_one_output_training_mode_export_is_an_input_error_naming_recalibrate(tmp_path, flags):
    out = tmp_path / "out.onnx"
    result = cli("fold", EXPORT, *[str(out) if f == "OUT" else f for f in flags])
    assert result.exit_code == 2, result.stderr
    line = one_error_line(result)
    assert "Training_mode" in line and "bnscope recalibrate" in line and "bn1" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fold_and_check_refuse_a_model_strict_shape_inference_rejects(tmp_path, rng):
    w = init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [conv, bn_node("c", "y")], "g", [vi("x", [1, 3, 6, 6])], [vi("y", [1, 5, 7, 6])], [w, *bn_inits(rng, 4)]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for args in (["fold", path, "--dry-run"], ["fold", path, "-o", tmp_path / "o.onnx"]):
        result = cli(*args)
        assert result.exit_code == 2, result.stderr
        assert "differ in dimension 1" in one_error_line(result)
    result = cli("check", path, "--enable", "fold_verified")
    assert result.exit_code == 2, result.stderr
    one_error_line(result)
    assert not (tmp_path / "o.onnx").exists()


def _typed_bn(elem_type: int) -> onnx.ModelProto:
    params = [
        helper.make_tensor(f"bn_{k}", elem_type, [4], [b"1"] * 4 if elem_type == TensorProto.STRING else [1] * 4)
        for k in ("scale", "B", "mean", "var")
    ]
    graph = helper.make_graph(
        [bn_node("x", "y")], "g", [vi("x", [1, 4, 3, 3], elem_type)], [vi("y", [1, 4, 3, 3], elem_type)], params
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize(
    "elem_type",
    [
        TensorProto.STRING,
        TensorProto.INT64,
        TensorProto.UINT8,
        TensorProto.BOOL,
        TensorProto.COMPLEX64,
        TensorProto.FLOAT8E4M3FN,
    ],
)
def test_batchnorm_of_a_non_float_type_is_an_input_error(tmp_path, elem_type):
    path = tmp_path / "m.onnx"
    onnx.save(_typed_bn(elem_type), path)
    for args in (
        ["inspect", path],
        ["fold", path, "--dry-run"],
        ["fold", path, "--no-verify", "-o", tmp_path / "o.onnx"],
    ):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.stderr)
        assert onnx.TensorProto.DataType.Name(elem_type) in one_error_line(result)


def test_fold_with_nothing_foldable_warns_on_stderr_and_in_json(tmp_path, rng):
    # x -> BN (graph input before it, graph output after it): nothing to fold into
    model = make_model([bn_node("x", "y")], [vi("x", [2, 4, 3, 3])], [vi("y", [2, 4, 3, 3])], bn_inits(rng, 4))
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    result = cli("fold", path, "-o", out, "-f", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["folded"] == 0 and doc["bn_after"] == 1
    (warning,) = [w for w in doc["warnings"] if w.startswith("nothing was folded")]
    assert "1 BatchNormalization" in warning and str(out) in warning
    assert "nothing was folded" in result.stderr


def test_fold_that_folds_something_gives_no_nothing_folded_warning(tmp_path, rng):
    w = init("w", rng.standard_normal((4, 3, 1, 1)).astype(np.float32))
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    model = make_model(
        [conv, bn_node("c", "y")], [vi("x", [2, 3, 3, 3])], [vi("y", [2, 4, 3, 3])], [w, *bn_inits(rng, 4)]
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = cli("fold", path, "--dry-run", "-f", "json")
    doc = json.loads(result.stdout)
    assert doc["folded"] == 1 and not any("nothing was folded" in w for w in doc["warnings"])
    assert "nothing was folded" not in result.stderr
