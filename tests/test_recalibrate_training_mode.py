"""recalibrate repairs training-mode BN: an inference BN holding the population statistics.

    training_mode_export: x -> Conv -> BN1(training_mode=1, one output) -> Relu -> Conv(stride 2)
                            -> BN2(training_mode=1, one output) -> Relu -> GAP -> Flatten -> Gemm -> logits
    training_mode:        x -> Conv -> BN(training_mode=1, outputs Y, running_mean, running_var; the
                            last two are graph outputs) -> Relu -> output

The reference for the new statistics is onnx.reference on the written model with every BN input
exposed: float64 population mean and biased variance of each BN's input over the calibration data,
which is exactly the sequential method's promise (each BN sees the repaired BNs before it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import REAL_MODELS, SAMPLES, cli, needs_real_models
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bnscope.errors import BnscopeError
from bnscope.onnxio.graph import GraphView
from bnscope.repair.inference_mode import loadable_as_exported, training_mode_layers
from bnscope.workflows.fold import fold_model
from bnscope.workflows.options import FoldSettings
from bnscope.workflows.recalibrate import RecalibrateOptions, recalibrate_model

EXPORT = SAMPLES / "training_mode_export.onnx"
CALIB = SAMPLES / "training_mode_export_calib.npz"
EVAL = SAMPLES / "training_mode_export_eval.npz"
REAL = REAL_MODELS / "onnx_node_test_batchnorm_epsilon_training_mode.onnx"


def _session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _bns(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def _stored(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return inits[node.input[3]].astype(np.float64), inits[node.input[4]].astype(np.float64)


def _population_stats(model: onnx.ModelProto, feeds: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for node in _bns(model):
        exposed.graph.output.append(helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    values = ReferenceEvaluator(exposed).run([n.input[0] for n in _bns(model)], feeds)
    out = {}
    for node, x in zip(_bns(model), values):
        axes = (0,) + tuple(range(2, x.ndim))
        out[node.name] = (x.astype(np.float64).mean(axis=axes), x.astype(np.float64).var(axis=axes))
    return out


def _top1(model, data: dict, labels: np.ndarray) -> float:
    logits = _session(model).run(None, data)[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    out = tmp_path_factory.mktemp("repair") / "repaired.onnx"
    result = recalibrate_model(EXPORT, CALIB, out, RecalibrateOptions(), eval_data=EVAL)
    return result, onnx.load(str(out))


def _ran_where_it_can(runs: dict) -> bool:
    """Ran on the CPU; CUDA too where this build lists it, and where it cannot load it says why."""
    cuda_listed = "CUDAExecutionProvider" in ort.get_available_providers()
    others = {k: v for k, v in runs.items() if k != "cpu"}
    expected = {"cuda"} if cuda_listed else set()
    return (
        runs.get("cpu") == "ok"
        and set(others) == expected
        and all(v == "ok" or v.startswith("not available: ") for v in others.values())
    )


def test_onnxruntime_refuses_the_one_output_export():
    with pytest.raises(Exception, match="should be 3 when Training_mode"):
        _session(EXPORT)


def test_recalibrate_training_mode_export_becomes_an_inference_model(repaired):
    result, model = repaired
    assert [(r.name, r.repaired, r.kept_as_constants) for r in result.repairs] == [("bn1", True, ()), ("bn2", True, ())]
    assert _ran_where_it_can(result.runs) and result.passed
    for node in _bns(model):
        assert len(node.output) == 1 and not any(a.name == "training_mode" for a in node.attribute)
    assert training_mode_layers(GraphView(model)) == []
    onnx.checker.check_model(model, full_check=True)  # the one-output form fails this; the repair passes
    calib = dict(np.load(CALIB))
    assert np.isfinite(_session(model).run(None, calib)[0]).all()


def test_recalibrate_training_mode_export_statistics_are_sequential_population_stats(repaired):
    _, model = repaired
    want = _population_stats(model, dict(np.load(CALIB)))
    for node in _bns(model):
        mean, var = _stored(model, node)
        np.testing.assert_allclose(mean, want[node.name][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var, want[node.name][1], rtol=1e-4, atol=1e-6)


def test_recalibrate_training_mode_export_keeps_its_accuracy(repaired):
    result, _ = repaired
    evaluation = dict(np.load(EVAL))
    labels = evaluation.pop("labels")
    as_exported = _top1(loadable_as_exported(onnx.load(str(EXPORT))), evaluation, labels)  # batch statistics
    assert result.accuracy_before == pytest.approx(
        float(np.mean(np.argmax(_logits_in_batches(EXPORT, evaluation), axis=1) == labels))
    )
    assert as_exported > 0.9 and result.accuracy_after >= result.accuracy_before - 0.02
    # The stored statistics were never right: only dropping training_mode would lose the accuracy.
    naive = onnx.load(str(EXPORT))
    for node in _bns(naive):
        node.attribute.remove(next(a for a in node.attribute if a.name == "training_mode"))
    assert _top1(naive, evaluation, labels) < result.accuracy_after - 0.2


def _logits_in_batches(path: Path, feeds: dict, batch: int = 32) -> np.ndarray:
    """The export as onnx.reference runs it (batch statistics per batch of 32, as recalibrate does)."""
    model = onnx.load(str(path))
    n = len(feeds["input"])
    return np.concatenate(
        [ReferenceEvaluator(model).run(None, {"input": feeds["input"][i : i + batch]})[0] for i in range(0, n, batch)]
    )


def test_recalibrated_training_mode_export_folds_completely(repaired, tmp_path):
    result, _ = repaired
    folded = fold_model(result.output, FoldSettings(output=tmp_path / "folded.onnx"))
    assert folded.bn_before == 2 and folded.bn_after == 0 and folded.passed


def test_recalibrate_keeps_read_running_outputs_as_constants(tmp_path):
    out = tmp_path / "tm.onnx"
    result = recalibrate_model(SAMPLES / "training_mode.onnx", SAMPLES / "training_mode_calib.npz", out)
    (repair,) = result.repairs
    assert repair.repaired and repair.kept_as_constants == ("bn1_running_mean", "bn1_running_var")
    model = onnx.load(str(out))
    assert [o.name for o in model.graph.output] == ["output", "bn1_running_mean", "bn1_running_var"]
    (node,) = _bns(model)
    assert list(node.output) == ["bn1_out"]
    got = _session(model).run(None, dict(np.load(SAMPLES / "training_mode_calib.npz")))
    mean, var = _stored(model, node)
    np.testing.assert_allclose(got[1], mean, rtol=1e-6)
    np.testing.assert_allclose(got[2], var, rtol=1e-6)


def test_loadable_as_exported_runs_with_batch_statistics():
    model = onnx.load(str(EXPORT))
    feeds = {"input": np.load(CALIB)["input"][:16]}
    got = _session(loadable_as_exported(model)).run(["logits"], feeds)[0]
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert len(_bns(model)[0].output) == 1  # the input model is untouched


def test_recalibrate_opset13_bn_with_optional_outputs_is_repaired(tmp_path):
    # x (N,2,3,3) -> BN(outputs y, mean, var, saved mean, saved var; opset 13: the count sets training) -> y
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(v.astype(np.float32), n)
        for n, v in (("s", rng.uniform(0.5, 1.5, 2)), ("b", rng.normal(size=2)), ("m", np.zeros(2)), ("v", np.ones(2)))
    ]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "mo", "vo", "sm", "sv"], name="bn")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", 1, ["N", 2, 3, 3])],
        [helper.make_tensor_value_info("y", 1, ["N", 2, 3, 3])],
        inits,
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    data = tmp_path / "d.npz"
    x = rng.normal(3.0, 2.0, (64, 2, 3, 3)).astype(np.float32)
    np.savez(data, x=x)
    result = recalibrate_model(path, data, tmp_path / "out.onnx")
    assert [r.repaired for r in result.repairs] == [True] and result.passed
    model = onnx.load(str(tmp_path / "out.onnx"))
    assert list(_bns(model)[0].output) == ["y"]
    mean, var = _stored(model, _bns(model)[0])
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(var, x.astype(np.float64).var(axis=(0, 2, 3)), rtol=1e-4)


@needs_real_models
def test_recalibrate_refuses_training_mode_with_graph_input_statistics(tmp_path):
    with pytest.raises(BnscopeError, match="graph inputs"):
        recalibrate_model(REAL, SAMPLES / "training_mode_calib.npz", tmp_path / "out.onnx")


def test_recalibrate_cli_json_and_table_report_the_repair(tmp_path):
    args = ["recalibrate", str(EXPORT), "--data", str(CALIB), "-o", str(tmp_path / "o.onnx")]
    doc = json.loads(cli(*args, "--format", "json").stdout)
    assert [r["repaired"] for r in doc["training_mode_repairs"]] == [True, True] and _ran_where_it_can(doc["runs"])
    table = cli(*args, "--force", env={"COLUMNS": "160"})
    assert (
        table.exit_code == 0 and "training_mode=1 -> inference BN" in table.stdout and "runs on cpu: ok" in table.stdout
    )


def test_check_and_inspect_name_the_repair():
    check = cli("check", str(EXPORT), "--format", "json")
    assert check.exit_code == 1
    failing = [r for r in json.loads(check.stdout)["results"] if not r["passed"]]
    assert failing and all("bnscope recalibrate" in r["message"] for r in failing if r["rule"] == "no_training_mode")
    inspected = json.loads(cli("inspect", str(EXPORT), "--format", "json").stdout)
    for layer in inspected["layers"]:
        assert "bnscope recalibrate" in layer["fold"]["reason"]
        assert any("bnscope recalibrate" in f["message"] for f in layer["flags"] if f["code"] == "training_mode")


def test_runs_on_tries_cuda_when_listed_and_an_ep_that_cannot_load_is_not_a_failure(monkeypatch, tmp_path):
    from bnscope.data.sources import open_source
    from bnscope.data.spec import input_specs
    from bnscope.workflows.inference_mode import runs_on

    source = open_source(CALIB, input_specs(onnx.load(str(EXPORT))))
    runs = runs_on(EXPORT, source, 8)
    assert runs["cpu"].startswith("failed")  # the one-output export does not load
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert runs.keys() == {"cpu"}
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    result = recalibrate_model(SAMPLES / "training_mode.onnx", SAMPLES / "training_mode_calib.npz", tmp_path / "o.onnx")
    assert result.runs["cpu"] == "ok" and set(result.runs) == {"cpu", "cuda"}
    assert result.runs["cuda"] == "ok" or result.runs["cuda"].startswith("not available")
    assert result.passed


def test_recalibrate_keeps_a_running_output_read_only_inside_a_subgraph(tmp_path):
    # x -> BN(y, mo, vo, sm, sv; opset 13: training) -> y;  If(cond) { then: Identity(mo) ; else: Identity(mo) } -> z
    # mo is read only from inside the If bodies: it must survive as a Constant, or the model breaks.
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(v.astype(np.float32), n)
        for n, v in (("s", rng.uniform(0.5, 1.5, 2)), ("b", rng.normal(size=2)), ("m", np.zeros(2)), ("v", np.ones(2)))
    ]
    inits.append(numpy_helper.from_array(np.array(True), "cond"))

    def body(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Identity", ["mo"], [f"{name}_z"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_z", 1, [2])],
        )

    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "mo", "vo", "sm", "sv"], name="bn"),
        helper.make_node("If", ["cond"], ["z"], name="pick", then_branch=body("then"), else_branch=body("else")),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", 1, ["N", 2, 3, 3])],
        [helper.make_tensor_value_info("y", 1, ["N", 2, 3, 3]), helper.make_tensor_value_info("z", 1, [2])],
        inits,
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    x = rng.normal(3.0, 2.0, (64, 2, 3, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    result = recalibrate_model(path, tmp_path / "d.npz", tmp_path / "out.onnx")
    (repair,) = result.repairs
    assert repair.repaired and repair.kept_as_constants == ("mo",)
    model = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(model, full_check=True)
    mean, _ = _stored(model, _bns(model)[0])
    (_, z) = _session(model).run(None, {"x": x[:4]})
    np.testing.assert_allclose(z, mean, rtol=1e-6)


def test_markdown_report_has_one_cell_per_column_and_the_accuracy(tmp_path):
    """recalibrate -f markdown: 'max|d|' in a header is escaped (a bare | split it into two columns),
    and the --eval-data accuracy the table prints is there too."""
    import re

    model = SAMPLES / "training_mode_export.onnx"
    result = cli(
        "recalibrate", model, "--data", SAMPLES / "training_mode_export_calib.npz", "-o", tmp_path / "out.onnx",
        "--eval-data", SAMPLES / "training_mode_export_eval.npz", "--format", "markdown",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    cells = [len(re.split(r"(?<!\\)\|", row.strip("|"))) for row in rows]
    assert len(rows) >= 3 and len(set(cells)) == 1, rows
    assert "top-1 accuracy:" in result.stdout
