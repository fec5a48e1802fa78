"""``bnscope quantize`` end to end on a tiny folded-BN network: a loadable standard QDQ model, SQNR
reported as measured independently, the 16-bit tensors it claims are the ones in the file, and the
input rules (exit 2, never over an input).

    x -> Conv(3->8) -> BN -> HardSwish as Paddle writes it (Add 3, Clip 0..6, Mul, Div 6)
      -> Conv(depthwise 8, pad 1) -> BN -> Relu -> Conv(8->4) -> y
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import bn_inits, bn_node, init, make_model, ort_run, vi
from helpers import cli as run_cli
from onnx import TensorProto, helper


def _model(rng) -> onnx.ModelProto:
    inits = [
        init("w1", (rng.standard_normal((8, 3, 3, 3)) * 0.5).astype(np.float32)),
        init("w2", rng.standard_normal((8, 1, 3, 3)).astype(np.float32)),
        init("w3", (rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32)),
        init("three", np.array(3, np.float32)),
        init("six", np.array(6, np.float32)),
        init("zero", np.array(0, np.float32)),
        *bn_inits(rng, 8, "bn1"),
        *bn_inits(rng, 8, "bn2"),
    ]
    for t in inits[6:10]:  # bn1 gamma large: the folded output spans far past HardSwish's knee
        if t.name == "bn1_scale":
            t.CopyFrom(init("bn1_scale", (rng.standard_normal(8) * 20).astype(np.float32)))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("c1", "b1", "bn1"),
        helper.make_node("Add", ["b1", "three"], ["p"]),
        helper.make_node("Clip", ["p", "zero", "six"], ["k"]),
        helper.make_node("Mul", ["b1", "k"], ["m"]),
        helper.make_node("Div", ["m", "six"], ["h"]),
        helper.make_node("Conv", ["h", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=8),
        bn_node("c2", "b2", "bn2"),
        helper.make_node("Relu", ["b2"], ["r"]),
        helper.make_node("Conv", ["r", "w3"], ["y"], name="conv3"),
    ]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", None)], inits, opset=17)


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(7)
    model = _model(rng)
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "calib.npy", rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    evaluation = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "eval.npy", evaluation)
    return tmp_path, model, evaluation


def _sixteen_bit_tensors(model: onnx.ModelProto) -> set[str]:
    zero_types = {t.name: t.data_type for t in model.graph.initializer}
    return {
        n.input[0].removesuffix("_QuantizeLinear_Input")
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and zero_types.get(n.input[2]) == TensorProto.UINT16
    }


def test_quantize_writes_a_loadable_qdq_model_with_measured_sqnr(setup):
    folder, model, evaluation = setup
    out = folder / "q.onnx"
    args = ["quantize", folder / "m.onnx", "-d", folder / "calib.npy", "--eval-data", folder / "eval.npy"]
    result = run_cli(*args, "-o", out, "--target-sqnr", "30", "--no-latency", "-f", "json")
    assert result.exit_code in (0, 1), result.stderr
    report = json.loads(result.stdout)
    qdq = onnx.load(out)
    onnx.checker.check_model(qdq)
    assert any(n.op_type == "QuantizeLinear" for n in qdq.graph.node)
    # independent SQNR: the original model unoptimised vs the written QDQ model, in float64 numpy
    ref = ort_run(model, {"x": evaluation})[0].astype(np.float64)
    got = ort_run(qdq, {"x": evaluation}, disable_all=False)[0].astype(np.float64)
    sqnr = 10 * np.log10((ref**2).sum() / ((ref - got) ** 2).sum())
    assert report["sqnr_db"] == pytest.approx(sqnr, abs=0.05)
    assert report["outputs"][0]["sqnr_db"] == pytest.approx(sqnr, abs=0.05)
    assert report["reached"] == (result.exit_code == 0) == (report["sqnr_db"] >= 30)
    # the plan's claims hold in the file
    assert set(report["activations"]["int16_tensors"]) == _sixteen_bit_tensors(qdq)
    assert report["activations"]["int16"] == len(_sixteen_bit_tensors(qdq))
    assert [layer["bn"] for layer in report["layers"]] and {layer["bn"] for layer in report["layers"]} == {"bn1", "bn2"}
    layer = next(la for la in report["layers"] if la["bn"] == "bn1")
    assert layer["knee"] == [-3.0, 3.0] and layer["measured_range"] is not None


def test_quantize_low_target_keeps_everything_int8(setup):
    folder, _, _ = setup
    out = folder / "q.onnx"
    result = run_cli(
        "quantize",
        folder / "m.onnx",
        "-d",
        folder / "calib.npy",
        "-o",
        out,
        "--target-sqnr",
        "-50",
        "--no-latency",
        "-f",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["activations"]["int16"] == 0 and _sixteen_bit_tensors(onnx.load(out)) == set()


def test_quantize_refuses_to_write_over_its_input(setup):
    folder, _, _ = setup
    before = (folder / "m.onnx").read_bytes()
    result = run_cli("quantize", folder / "m.onnx", "-d", folder / "calib.npy", "-o", folder / "m.onnx")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "overwrite" in result.stderr
    assert (folder / "m.onnx").read_bytes() == before


@pytest.mark.parametrize("extra", [["--holdout", "1.5"], ["--target-sqnr", "nan"], ["--batch-size", "0"]])
def test_quantize_bad_options_are_one_line_exit_2(setup, extra):
    folder, _, _ = setup
    result = run_cli("quantize", folder / "m.onnx", "-d", folder / "calib.npy", "-o", folder / "q.onnx", *extra)
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (folder / "q.onnx").exists()


def test_quantize_settings_take_one_data_choice_or_the_old_path_and_batch_size(tmp_path):
    from bnscope.data.choice import DataChoice
    from bnscope.errors import BnscopeError
    from bnscope.workflows.quantize import QuantizeSettings

    out, calib = tmp_path / "q.onnx", tmp_path / "calib.npy"
    old = QuantizeSettings(output=out, data=str(calib), batch_size=4)
    new = QuantizeSettings(output=out, data=DataChoice(path=calib, batch_size=4))
    assert old == new and old.data == DataChoice(path=calib, batch_size=4) and old.batch_size == 4
    for data in (DataChoice(random=True), DataChoice(loader="l.py:f"), DataChoice()):
        with pytest.raises(BnscopeError, match="quantize"):
            QuantizeSettings(output=out, data=data)
    with pytest.raises(BnscopeError, match="batch size"):
        QuantizeSettings(output=out, data=DataChoice(path=calib, batch_size=2), batch_size=4)


def test_quantize_missing_data_is_exit_2_and_writes_nothing(setup):
    folder, _, _ = setup
    result = run_cli("quantize", folder / "m.onnx", "-d", folder / "nope.npy", "-o", folder / "q.onnx")
    assert result.exit_code == 2
    assert "nope.npy" in result.stderr and not (folder / "q.onnx").exists()


def test_quantize_a_float16_model_is_one_line_exit_2_naming_the_type(tmp_path):
    """It exited 2 blaming the model ("cannot load the int8 simulation ... validate the model")."""
    from helpers import SAMPLES

    result = run_cli(
        "quantize", SAMPLES / "resnet_small_fp16.onnx", "--data", SAMPLES / "resnet_small_fp16_calib.npz",
        "-o", tmp_path / "q.onnx",
    )  # fmt: skip
    assert result.exit_code == 2 and not (tmp_path / "q.onnx").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "float16" in lines[0] and "float32" in lines[0], result.stderr


def test_quantize_without_bn_names_no_temporary_file(tmp_path):
    """Nothing to fold: the warning says so without the path of quantize's hidden stage file."""
    from helpers import SAMPLES

    out = tmp_path / "q.onnx"
    result = run_cli(
        "quantize", SAMPLES / "no_bn.onnx", "--data", SAMPLES / "no_bn_calib.npz", "-o", out, "--no-latency"
    )
    assert result.exit_code == 0 and out.exists(), result.stderr
    assert "nothing was folded" in result.stderr and "bnscope-quantize-" not in result.stderr
