"""Tests for the committed sample models in sample_models/ (built by sample_models/build.py).

They check that every model loads, passes the full checker and runs under onnxruntime with
ORT_DISABLE_ALL on its calibration data; that a rebuild reproduces the committed files; and
that resnet_small's running statistics really are the statistics of its in-domain data.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import SAMPLES
from onnx import TensorProto, helper, numpy_helper

# The contract: model -> {BN node name: op type producing its input ("input" = graph input)}.
EXPECTED_BNS = {
    "resnet_small": {
        "stem_bn": "Conv",
        "block1_bn1": "Conv",
        "block1_bn2": "Conv",
        "block2_bn1": "Conv",
        "block2_bn2": "Conv",
        "block2_proj_bn": "Conv",
    },
    "resnet_small_fp16": {
        "stem_bn": "Conv",
        "block1_bn1": "Conv",
        "block1_bn2": "Conv",
        "block2_bn1": "Conv",
        "block2_bn2": "Conv",
        "block2_proj_bn": "Conv",
    },
    "depthwise_block": {"expand_bn": "Conv", "dw_bn": "Conv", "pw_bn": "Conv", "group_bn": "Conv"},
    "mlp": {"bn1": "Gemm", "bn2": "MatMul", "bn3": "Add"},
    "convtranspose_decoder": {"up1_bn": "ConvTranspose", "up2_bn": "ConvTranspose", "up3_bn": "Add"},
    "bn_before_conv": {"branch_a_bn": "input", "branch_b_bn": "input"},
    "shared_conv_output": {"bn1": "Conv", "bn2": "Conv"},
    "no_bn": {},
    "broken": {"bn1_healthy": "Conv", "bn2_stale": "Conv", "bn3_never_updated": "Conv", "bn4_nan_var": "Conv"},
    "conv1d_3d": {"conv1d_bn": "Conv", "conv3d_bn": "Conv"},
    "weights_as_constants": {"bn1": "Conv", "bn2": "Conv"},
    "bn_after_flatten": {"bn1": "Reshape"},
    "training_mode": {"bn1": "Conv"},
    "bn_inputs_as_graph_inputs": {"bn1": "Conv"},
}
MODELS = sorted(EXPECTED_BNS)
TRAINING_MODE = "training_mode"


@pytest.fixture(scope="module")
def build():
    """sample_models/build.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location("sample_models_build", SAMPLES / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _load(name: str) -> onnx.ModelProto:
    return onnx.load(str(SAMPLES / f"{name}.onnx"))


def _calib(name: str) -> dict[str, np.ndarray]:
    with np.load(SAMPLES / f"{name}_calib.npz") as data:
        return {k: data[k] for k in data.files}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values.update(
        {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    )
    return values


def _split_tensors(model: onnx.ModelProto) -> tuple[bytes, dict[str, np.ndarray]]:
    """The model without tensor payloads (bytes) and its tensors by name."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    tensors = _values(skeleton)
    for t in skeleton.graph.initializer:
        t.ClearField("raw_data")
    for n in skeleton.graph.node:
        if n.op_type == "Constant":
            n.attribute[0].t.ClearField("raw_data")
    return skeleton.SerializeToString(), tensors


def _bn_input_stats(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, tuple]:
    """BN name -> float64 (mean, biased var) of its input, via exposed graph outputs."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    for n in bns:
        exposed.graph.output.append(helper.make_tensor_value_info(n.input[0], TensorProto.FLOAT, None))
    names = [n.input[0] for n in bns]
    results = _session(exposed).run(names, feeds)
    out = {}
    for n, x in zip(bns, results):
        axes = (0,) + tuple(range(2, x.ndim))
        x = x.astype(np.float64)
        out[n.name] = (x.mean(axis=axes), x.var(axis=axes))
    return out


def _drift(model: onnx.ModelProto, observed: dict[str, tuple]) -> dict[str, tuple]:
    """BN name -> (d, var ratio): d = (mean - running_mean) / sqrt(running_var + eps)."""
    values, out = _values(model), {}
    for n in model.graph.node:
        if n.op_type == "BatchNormalization":
            m_run = values[n.input[3]].astype(np.float64)
            v_run = values[n.input[4]].astype(np.float64)
            m, v = observed[n.name]
            out[n.name] = ((m - m_run) / np.sqrt(v_run + 1e-5), v / (v_run + 1e-5))
    return out


def test_sample_models_files_present_and_small():
    expected = {f"{m}.onnx" for m in MODELS} | {f"{m}_calib.npz" for m in MODELS}
    expected |= {"resnet_small_shifted.npz", "build.py", "README.md"}
    present = {p.name for p in SAMPLES.iterdir() if p.is_file()}
    assert expected <= present
    assert sum(p.stat().st_size for p in SAMPLES.iterdir() if p.is_file()) < 3.2e6


@pytest.mark.parametrize("name", MODELS)
def test_sample_model_passes_full_check(name):
    onnx.checker.check_model(str(SAMPLES / f"{name}.onnx"), full_check=True)
    model = _load(name)
    node_names = [n.name for n in model.graph.node]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    assert model.producer_name == "bnscope-sample-builder"
    assert model.doc_string


@pytest.mark.parametrize("name", MODELS)
def test_sample_model_bn_sites(name):
    model = _load(name)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    graph_inputs = {i.name for i in model.graph.input}
    bns = {
        n.name: "input" if n.input[0] in graph_inputs else producers[n.input[0]]
        for n in model.graph.node
        if n.op_type == "BatchNormalization"
    }
    assert bns == EXPECTED_BNS[name]
    for n in model.graph.node:
        if n.op_type == "BatchNormalization":
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["epsilon"] == pytest.approx(1e-5)
            assert attrs["momentum"] == pytest.approx(0.9)


@pytest.mark.parametrize("name", MODELS)
def test_sample_calib_matches_inputs(name):
    model, calib = _load(name), _calib(name)
    dtype = np.float16 if name.endswith("_fp16") else np.float32
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    assert sorted(calib) == sorted(i.name for i in inputs)
    for i in inputs:
        dims = [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
        assert dims[0] == "N"
        assert calib[i.name].dtype == dtype
        assert list(calib[i.name].shape[1:]) == dims[1:]
        assert calib[i.name].shape[0] >= 8


@pytest.mark.parametrize("name", [m for m in MODELS if m != TRAINING_MODE])
def test_sample_model_runs_in_onnxruntime(name):
    model, calib = _load(name), _calib(name)
    outputs = _session(model).run(None, calib)
    assert len(outputs) == len(model.graph.output)
    for out in outputs:
        if name == "broken":  # bn4_nan_var's channel 1 is NaN by design, and only it
            assert np.isnan(out[:, 1]).all()
            out = np.delete(out, 1, axis=1)
        assert np.isfinite(out).all()


def test_training_mode_model_runs_in_reference_and_matches_onnxruntime():
    from onnx.reference import ReferenceEvaluator

    model, calib = _load(TRAINING_MODE), _calib(TRAINING_MODE)
    want = ReferenceEvaluator(model).run(None, calib)
    x = calib["input"]
    assert [w.shape for w in want] == [(x.shape[0], 8, 8, 8), (8,), (8,)]
    try:
        got = _session(model).run(None, calib)
    except Exception as exc:  # older onnxruntime refuses training_mode BN
        pytest.skip(f"onnxruntime {ort.__version__} cannot run training_mode BN: {exc}")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_build_all_reproduces_committed_files(build, tmp_path):
    paths = build.build_all(tmp_path)
    assert {p.name for p in paths} == {p.name for p in SAMPLES.glob("*.onnx")} | {p.name for p in SAMPLES.glob("*.npz")}
    for path in paths:
        committed = SAMPLES / path.name
        if path.read_bytes() == committed.read_bytes():
            continue
        # Not byte-identical (a BLAS last bit on another platform): same graph, close tensors.
        if path.suffix == ".onnx":
            (new_graph, new), (old_graph, old) = (_split_tensors(onnx.load(str(p))) for p in (path, committed))
            assert new_graph == old_graph, path.name
        else:
            with np.load(path) as a, np.load(committed) as b:
                new, old = dict(a), dict(b)
        assert sorted(new) == sorted(old), path.name
        for key in new:
            np.testing.assert_allclose(
                new[key], old[key], rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=f"{path.name}:{key}"
            )


def test_resnet_small_running_stats_are_in_domain_stats():
    model = _load("resnet_small")
    drift = _drift(model, _bn_input_stats(model, _calib("resnet_small")))
    assert len(drift) == 6
    for bn, (d, ratio) in drift.items():
        assert np.abs(d).max() < 0.2, bn
        assert np.all((ratio > 0.8) & (ratio < 1.25)), bn


def test_resnet_small_shifted_data_moves_the_first_bn():
    model = _load("resnet_small")
    with np.load(SAMPLES / "resnet_small_shifted.npz") as data:
        shifted = {"input": data["input"]}
    np.testing.assert_allclose(shifted["input"], _calib("resnet_small")["input"] * 1.8 + 0.7, rtol=1e-5, atol=1e-5)
    d, ratio = _drift(model, _bn_input_stats(model, shifted))["stem_bn"]
    assert np.abs(d).max() > 1.0
    assert np.all(ratio > 2.0)


def test_resnet_small_fp16_is_a_cast_of_resnet_small():
    fp32, fp16 = _values(_load("resnet_small")), _values(_load("resnet_small_fp16"))
    assert sorted(fp32) == sorted(fp16)
    for name, arr in fp32.items():
        assert fp16[name].dtype == np.float16, name
        np.testing.assert_array_equal(fp16[name], arr.astype(np.float16))


def test_broken_model_defects():
    model = _load("broken")
    values = _values(model)
    drift = _drift(model, _bn_input_stats(model, _calib("broken")))
    assert np.abs(drift["bn1_healthy"][0]).max() < 0.2
    assert np.abs(drift["bn2_stale"][0]).min() > 0.5
    assert np.all(drift["bn2_stale"][1] < 0.2)  # stored var is 10x the real one
    assert np.all(values["bn3_never_updated.running_mean"] == 0)
    assert np.all(values["bn3_never_updated.running_var"] == 1)
    assert np.abs(drift["bn3_never_updated"][0]).max() > 1.0
    nan_var = values["bn4_nan_var.running_var"]
    assert np.isnan(nan_var).tolist() == [c == 1 for c in range(len(nan_var))]
