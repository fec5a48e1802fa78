"""recalibrate: new running statistics, checked by value.

``sequential`` must make eval-mode statistics on the data match the new running statistics in
every layer (|d|, |log r| ~ 0); BNs with no BN between them share a pass. ``onepass`` must equal
torch's ``update_bn`` (BN in train mode; running mean = mean of batch means, running var = mean of
*unbiased* batch variances, batches weighted equally), emulated here in numpy on::

    one BN:   x (N,3,6,6) -> Conv(3->4, 3x3, pads 1, bias) -> h -> BN -> y -> Relu -> out
    two BNs:  x (N,3,5,5) -> Conv1x1(3->4) -> h1 -> BN1 -> Relu -> Conv1x1(4->5) -> h2 -> BN2 -> out

Everything else in the model stays byte-for-byte the same, and the input model is never written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import bn_inits, bn_node, init, make_model, ort_run, vi
from helpers import BROKEN, BROKEN_CALIB, CALIB, RESNET, RESNET_BN, SAMPLES, SHIFTED, cli
from onnx import helper, numpy_helper

from bnscope.workflows.recalibrate import RecalibrateOptions, recalibrate_model
from bnscope.workflows.stats import collect_stats

EPS = 1e-5


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def bn_stats(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """BN name -> (running mean, running var) as stored."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        n.name: (inits[n.input[3]], inits[n.input[4]]) for n in model.graph.node if n.op_type == "BatchNormalization"
    }


# -- tiny models and their numpy emulation ------------------------------------------------------------
def one_bn_model(tmp: Path) -> Path:
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("h", "y", name="bn"),
        helper.make_node("Relu", ["y"], ["out"], name="relu"),
    ]
    inits = [
        init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        init("b", rng.standard_normal(4).astype(np.float32)),
        *bn_inits(rng, 4),
    ]
    path = tmp / "one_bn.onnx"
    onnx.save_model(make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("out", ["N", 4, 6, 6])], inits), str(path))
    return path


def conv_output(path: Path, x: np.ndarray) -> np.ndarray:
    """The BN input h of the one-BN model, from onnxruntime without optimisations."""
    model = onnx.load(str(path))
    del model.graph.output[:]
    model.graph.output.append(vi("h", None))
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return ort_run(model, {"x": x})[0].astype(np.float64)


def data(tmp: Path, n: int, shape: tuple, name: str = "x", seed: int = 5) -> Path:
    """Offset and scaled data, so the new statistics differ clearly from the stored ones."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, *shape)) * 2.0 + 0.7).astype(np.float32)
    path = tmp / f"data_{n}.npz"
    np.savez(path, **{name: x})
    return path


def batches(x: np.ndarray, size: int):
    return [x[i : i + size] for i in range(0, len(x), size)]


def two_bn_model(tmp: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(11)
    p = {
        "w1": rng.standard_normal((4, 3, 1, 1)),
        "w2": rng.standard_normal((5, 4, 1, 1)),
        "g1": rng.uniform(0.5, 1.5, 4),
        "b1": rng.standard_normal(4),
        "g2": rng.uniform(0.5, 1.5, 5),
        "b2": rng.standard_normal(5),
    }
    p = {k: v.astype(np.float32) for k, v in p.items()}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h1"], name="conv1"),
        helper.make_node("BatchNormalization", ["h1", "g1", "b1", "m1", "v1"], ["y1"], name="bn1"),
        helper.make_node("Relu", ["y1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["h2"], name="conv2"),
        helper.make_node("BatchNormalization", ["h2", "g2", "b2", "m2", "v2"], ["out"], name="bn2"),
    ]
    inits = [init(k, v) for k, v in p.items()] + [
        init("m1", np.zeros(4, np.float32)),
        init("v1", np.ones(4, np.float32)),
        init("m2", np.zeros(5, np.float32)),
        init("v2", np.ones(5, np.float32)),
    ]
    path = tmp / "two_bn.onnx"
    onnx.save_model(make_model(nodes, [vi("x", ["N", 3, 5, 5])], [vi("out", ["N", 5, 5, 5])], inits), str(path))
    return path, {k: v.astype(np.float64) for k, v in p.items()}


def train_mode_update_bn(x: np.ndarray, p: dict, batch_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """torch.optim.swa_utils.update_bn on the two-BN model, in float64 numpy."""
    sums = {"bn1": [0.0, 0.0], "bn2": [0.0, 0.0]}
    chunks = batches(x.astype(np.float64), batch_size)
    for xb in chunks:
        h1 = np.einsum("oc,nchw->nohw", p["w1"][:, :, 0, 0], xb)
        m1, v1 = h1.mean(axis=(0, 2, 3)), h1.var(axis=(0, 2, 3))
        y1 = (
            p["g1"][None, :, None, None] * (h1 - m1[None, :, None, None]) / np.sqrt(v1 + EPS)[None, :, None, None]
            + p["b1"][None, :, None, None]
        )
        h2 = np.einsum("oc,nchw->nohw", p["w2"][:, :, 0, 0], np.maximum(y1, 0))
        for name, h in (("bn1", h1), ("bn2", h2)):
            sums[name][0] = sums[name][0] + h.mean(axis=(0, 2, 3))
            sums[name][1] = sums[name][1] + h.var(axis=(0, 2, 3), ddof=1)  # unbiased, as torch stores it
    return {k: (s[0] / len(chunks), s[1] / len(chunks)) for k, s in sums.items()}


# -- sequential -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recalibrated(tmp_path_factory) -> tuple[Path, dict]:
    """resnet_small recalibrated on the shifted data (CLI, JSON report)."""
    out = tmp_path_factory.mktemp("recal") / "recal.onnx"
    before = sha(RESNET)
    result = cli("recalibrate", RESNET, "--data", SHIFTED, "-o", out, "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert sha(RESNET) == before
    return out, json.loads(result.stdout)


def test_sequential_makes_eval_statistics_match(recalibrated):
    out, _ = recalibrated
    stats = collect_stats(out, SHIFTED)
    assert [layer.name for layer in stats.layers] == RESNET_BN
    for layer in stats.layers:
        assert np.max(np.abs(layer.d)) < 1e-5, layer.name
        assert np.max(np.abs(layer.log_r)) < 1e-5, layer.name
        assert layer.verdict == "ok"


def test_sequential_report(recalibrated):
    _, doc = recalibrated
    assert doc["method"] == "sequential"
    for i, layer in enumerate(doc["layers"]):
        assert layer["before"]["verdict"] == (
            "drift" if i == 0 else "inherited"
        )  # all after the first        assert layer["after"]["verdict"] == "ok" and layer["after"]["max_abs_d"] < 1e-5


def test_sequential_layers_with_no_bn_between_them_share_a_pass(recalibrated):
    """block2_proj_bn (shortcut) and block2_bn1 read tensors that depend on the same BNs (stem,
    block1): one pass; block2_bn2 is behind block2_bn1 and needs the next one."""
    _, doc = recalibrated
    passes = {layer["name"]: layer["pass"] for layer in doc["layers"]}
    assert passes == {
        "stem_bn": 1,
        "block1_bn1": 2,
        "block1_bn2": 3,
        "block2_bn1": 4,
        "block2_proj_bn": 4,
        "block2_bn2": 5,
    }
    assert doc["passes"] == 5


def test_sequential_parallel_bns_share_the_first_pass(tmp_path):
    path = SAMPLES / "bn_before_conv.onnx"
    result = recalibrate_model(path, SAMPLES / "bn_before_conv_calib.npz", tmp_path / "r.onnx")
    assert result.passes == 1
    assert {c.name: c.pass_index for c in result.layers} == {"branch_a_bn": 1, "branch_b_bn": 1}


def test_recalibrate_changes_nothing_but_running_statistics(recalibrated):
    out, _ = recalibrated
    old, new = onnx.load(str(RESNET)), onnx.load(str(out))
    stat_names = {n.input[i] for n in old.graph.node if n.op_type == "BatchNormalization" for i in (3, 4)}
    assert list(new.graph.node) == list(old.graph.node)
    assert list(new.graph.input) == list(old.graph.input) and list(new.graph.output) == list(old.graph.output)
    assert list(new.opset_import) == list(old.opset_import) and new.ir_version == old.ir_version
    old_inits = {t.name: t.SerializeToString() for t in old.graph.initializer}
    new_inits = {t.name: t.SerializeToString() for t in new.graph.initializer}
    assert set(new_inits) == set(old_inits)
    for name in old_inits:
        if name not in stat_names:
            assert new_inits[name] == old_inits[name], name
    changed = [name for name in stat_names if new_inits[name] != old_inits[name]]
    assert sorted(changed) == sorted(stat_names)
    for t in new.graph.initializer:
        if t.name in stat_names:
            assert t.data_type == onnx.TensorProto.FLOAT


def test_sequential_equals_numpy_population_statistics(tmp_path):
    model = one_bn_model(tmp_path)
    source = data(tmp_path, 40, (3, 6, 6))
    x = np.load(source)["x"]
    h = conv_output(model, x)
    for unbiased in (False, True):
        out = tmp_path / f"seq_{unbiased}.onnx"
        recalibrate_model(model, source, out, RecalibrateOptions(batch_size=16, unbiased=unbiased))
        mean, var = bn_stats(out)["bn"]
        np.testing.assert_allclose(mean, h.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, h.var(axis=(0, 2, 3), ddof=1 if unbiased else 0), rtol=1e-5)


def test_unbiased_scales_the_variance_by_n_over_n_minus_1(tmp_path):
    model = one_bn_model(tmp_path)
    source = data(tmp_path, 40, (3, 6, 6))
    biased, unbiased = tmp_path / "b.onnx", tmp_path / "u.onnx"
    assert cli("recalibrate", model, "--data", source, "-o", biased).exit_code == 0
    assert cli("recalibrate", model, "--data", source, "-o", unbiased, "--unbiased").exit_code == 0
    (mb, vb), (mu, vu) = bn_stats(biased)["bn"], bn_stats(unbiased)["bn"]
    n = 40 * 6 * 6
    np.testing.assert_array_equal(mb, mu)
    np.testing.assert_allclose(vu.astype(np.float64) / vb, n / (n - 1), rtol=1e-6)


# -- onepass -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [16, 40])
def test_onepass_equals_torch_update_bn_on_one_bn(tmp_path, batch_size):
    model = one_bn_model(tmp_path)
    source = data(tmp_path, 40, (3, 6, 6))
    h = conv_output(model, np.load(source)["x"])
    out = tmp_path / "onepass.onnx"
    result = cli("recalibrate", model, "--data", source, "-o", out, "--method", "onepass", "-b", batch_size)
    assert result.exit_code == 0, result.stderr
    chunks = batches(h, batch_size)  # 16, 16, 8: the short last batch weighs as much as the others
    want_mean = np.mean([c.mean(axis=(0, 2, 3)) for c in chunks], axis=0)
    want_var = np.mean([c.var(axis=(0, 2, 3), ddof=1) for c in chunks], axis=0)
    mean, var = bn_stats(out)["bn"]
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-5)


def test_onepass_normalises_with_batch_statistics(tmp_path):
    """BN2's statistics depend on BN1 in train mode (batch statistics), not its stored ones."""
    model, params = two_bn_model(tmp_path)
    source = data(tmp_path, 30, (3, 5, 5))
    out = tmp_path / "onepass.onnx"
    result = recalibrate_model(model, source, out, RecalibrateOptions(method="onepass", batch_size=8))
    assert result.passes == 1
    want = train_mode_update_bn(np.load(source)["x"], params, 8)
    got = bn_stats(out)
    for name in ("bn1", "bn2"):
        np.testing.assert_allclose(got[name][0], want[name][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[name][1], want[name][1], rtol=1e-4)


def test_onepass_differs_from_sequential_on_two_bns(tmp_path):
    model, _ = two_bn_model(tmp_path)
    source = data(tmp_path, 30, (3, 5, 5))
    seq, one = tmp_path / "seq.onnx", tmp_path / "one.onnx"
    recalibrate_model(model, source, seq, RecalibrateOptions(batch_size=8))
    recalibrate_model(model, source, one, RecalibrateOptions(method="onepass", batch_size=8))
    assert not np.allclose(bn_stats(seq)["bn2"][1], bn_stats(one)["bn2"][1], rtol=1e-3)


# -- safety and repair -----------------------------------------------------------------------------------
def test_recalibrate_never_overwrites_the_input(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(RESNET.read_bytes())
    result = cli("recalibrate", model, "--data", SHIFTED, "-o", model)
    assert result.exit_code == 2 and "refusing to overwrite" in result.stderr
    assert model.read_bytes() == RESNET.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_recalibrate_force_overwrites_the_input(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(RESNET.read_bytes())
    result = cli("recalibrate", model, "--data", SHIFTED, "-o", model, "--force", "-b", "96")
    assert result.exit_code == 0, result.stderr
    assert model.read_bytes() != RESNET.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_recalibrate_repairs_broken_statistics(tmp_path):
    out = tmp_path / "repaired.onnx"
    result = recalibrate_model(BROKEN, BROKEN_CALIB, out)
    before = {c.name: c.before.verdict for c in result.layers}
    assert before["bn4_nan_var"] == "broken" and before["bn3_never_updated"] == "stale"
    assert all(c.after.verdict == "ok" for c in result.layers)
    for name, (mean, var) in bn_stats(out).items():
        assert np.all(np.isfinite(mean)) and np.all(np.isfinite(var)) and np.all(var > 0), name
    inspected = cli("inspect", out, "--fail-on", "warning", "-f", "json")
    assert inspected.exit_code == 0, inspected.stdout
    assert json.loads(inspected.stdout)["summary"]["foldable"] == 4


def labelled_eval_data(tmp: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Shifted inputs labelled with the original model's in-domain predictions (pseudo-labels)."""
    calib, shifted = np.load(CALIB)["input"], np.load(SHIFTED)["input"]
    labels = np.argmax(ort_run(onnx.load(str(RESNET)), {"input": calib})[0], axis=1).astype(np.int64)
    path = tmp / "eval.npz"
    np.savez(path, input=shifted, labels=labels)
    return path, shifted, labels


def test_recalibrate_reports_top1_with_eval_data(tmp_path):
    eval_path, shifted, labels = labelled_eval_data(tmp_path)
    out = tmp_path / "recal.onnx"
    result = cli("recalibrate", RESNET, "--data", SHIFTED, "-o", out, "--eval-data", eval_path, "-f", "json")
    assert result.exit_code == 0, result.stderr
    accuracy = json.loads(result.stdout)["accuracy"]
    for key, model in (("before", RESNET), ("after", out)):
        predicted = np.argmax(ort_run(onnx.load(str(model)), {"input": shifted})[0], axis=1)
        assert accuracy[key] == pytest.approx(float(np.mean(predicted == labels)))
    table = cli("recalibrate", RESNET, "--data", SHIFTED, "-o", out, "--eval-data", eval_path)
    assert "top-1 accuracy" in table.stdout


def test_recalibrate_eval_data_without_labels_is_an_input_error(tmp_path):
    result = cli("recalibrate", RESNET, "--data", SHIFTED, "-o", tmp_path / "r.onnx", "--eval-data", CALIB)
    assert result.exit_code == 2
    assert "labels" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_recalibrate_refuses_nan_data(tmp_path):
    x = np.load(CALIB)["input"].copy()
    x[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", input=x)
    result = cli("recalibrate", RESNET, "--data", tmp_path / "nan.npz", "-o", tmp_path / "r.onnx", "-b", "96")
    assert result.exit_code == 2
    assert not (tmp_path / "r.onnx").exists()


def test_recalibrate_unknown_method_is_an_input_error(tmp_path):
    result = cli("recalibrate", RESNET, "--data", SHIFTED, "-o", tmp_path / "r.onnx", "--method", "magic")
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr


def test_sequential_is_exact_for_statistics_never_updated_far_from_the_data(tmp_path):
    # x -> Conv(bias 1e3) -> h (mean ~1e3, std ~2) -> BN(mean 0, var 1: never updated) -> y -> Relu
    # A BN as exported before any training step: y = h, so a tap of y in float32 (E[y^2] - E[y]^2 at
    # |mean|/std ~ 500) lost 1e-2 of the variance it writes.
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("h", "y", name="bn"),
        helper.make_node("Relu", ["y"], ["out"], name="relu"),
    ]
    inits = [
        init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        init("b", np.full(4, 1e3, np.float32)),
        *(init(f"bn_{k}", np.full(4, v, np.float32)) for k, v in (("scale", 1), ("B", 0), ("mean", 0), ("var", 1))),
    ]
    model = tmp_path / "stale.onnx"
    onnx.save_model(make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("out", ["N", 4, 6, 6])], inits), str(model))
    source = data(tmp_path, 40, (3, 6, 6))
    h = conv_output(model, np.load(source)["x"]).astype(np.float64)
    out = tmp_path / "recalibrated.onnx"
    recalibrate_model(model, source, out, RecalibrateOptions(batch_size=16))
    mean, var = bn_stats(out)["bn"]
    np.testing.assert_allclose(mean, h.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(var, h.var(axis=(0, 2, 3)), rtol=5e-5)
