"""Real exported models (Paddle2ONNX, PyTorch, keras2onnx, onnx's test data, a ViT) from
``../shared/real-models``: inspected without a crash, every BN with a fold decision and a reason,
statistics on random data for the fixed-batch detectors, picodet folded 103/103 and verified, and keras2onnx's
unsorted graph sorted at load and folded 11/11.
Skipped as a whole when the folder is absent (a fresh clone of the project); slow (run with --runslow).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import ort_run
from helpers import REAL_MODELS, cli, needs_real_models

from bnscope.stats.verdict import VERDICTS

REAL = REAL_MODELS
pytestmark = [needs_real_models, pytest.mark.slow]

KERAS = "keras2onnx_test_model_0_no_opt.onnx"
PICODET = "paddle_picodet_s_320_coco.onnx"
PICODET_FOLDED_REFERENCE = "paddle_picodet_s_320_coco_sim_BNfolded_reference.onnx"
ULTRAFACE = "pytorch_ultraface_version-RFB-320.onnx"
TRAINING = "onnx_node_test_batchnorm_epsilon_training_mode.onnx"
VIT = "vnncomp23_vit_ibp_3_3_8.onnx"
# model -> (BN count, foldable) as inspect reports them
LOADABLE = {PICODET: (103, 103), PICODET_FOLDED_REFERENCE: (0, 0), ULTRAFACE: (35, 35), TRAINING: (1, 0), VIT: (7, 7)}


def inspect_json(name: str, *args) -> dict:
    result = cli("inspect", REAL / name, "--format", "json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_every_real_model_is_covered():
    assert sorted(p.name for p in REAL.glob("*.onnx")) == sorted([KERAS, *LOADABLE])


@pytest.mark.parametrize("name", sorted(LOADABLE))
def test_inspect_real_model(name):
    doc = inspect_json(name)
    bn, foldable = LOADABLE[name]
    assert (doc["summary"]["bn"], doc["summary"]["foldable"]) == (bn, foldable)
    for layer in doc["layers"]:
        fold = layer["fold"]
        if fold["possible"]:
            assert fold["direction"] in ("into_previous", "into_next") and fold["target"]
        else:
            assert isinstance(fold["reason"], str) and fold["reason"].strip(), layer["name"]
    table = cli("inspect", REAL / name)
    assert table.exit_code == 0 and "Traceback" not in table.stderr


def test_keras2onnx_unsorted_graph_is_sorted_at_load():
    """Its nodes are not in topological order: loading sorts them in memory with one warning."""
    result = cli("inspect", REAL / KERAS, "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert "topological order" in " ".join(result.stderr.split()) and "Traceback" not in result.stderr
    doc = json.loads(result.stdout)
    assert (doc["summary"]["bn"], doc["summary"]["foldable"]) == (11, 11)


def test_fold_keras2onnx_cli(tmp_path):
    """The original cannot run end to end in onnxruntime (its Concat mismatches 200 vs 201 rows), so
    verification is a one-line input error and nothing is written; --no-verify writes a valid fold."""
    out = tmp_path / "k.onnx"
    result = cli("fold", REAL / KERAS, "-o", out)
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error:") and "Concat" in error and "Hint:" in error, result.stderr
    assert list(tmp_path.iterdir()) == []
    result = cli("fold", REAL / KERAS, "-o", out, "--no-verify", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert (json.loads(result.stdout)["bn_before"], json.loads(result.stdout)["bn_after"]) == (11, 0)
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)


def test_picodet_weights_as_constant_nodes_fold():
    doc = inspect_json(PICODET)
    assert {layer["producer"]["op"] for layer in doc["layers"]} == {"Conv"}
    assert all(layer["fold"]["direction"] == "into_previous" for layer in doc["layers"])


def test_ultraface_overridable_initializers():
    doc = inspect_json(ULTRAFACE)
    assert any("graph inputs" in note for note in doc["model"]["notes"])
    assert [vi["name"] for vi in doc["model"]["inputs"]] == ["input"]
    assert {round(layer["momentum"], 6) for layer in doc["layers"]} == {0.9, 0.99}
    kept = inspect_json(ULTRAFACE, "--keep-overridable")
    assert kept["summary"]["foldable"] == 0
    assert all("overridable" in layer["fold"]["reason"] for layer in kept["layers"])


def test_training_mode_test_model():
    (layer,) = inspect_json(TRAINING)["layers"]
    assert layer["training_mode"] == 1 and "training_mode" in layer["fold"]["reason"]
    assert "training_mode" in {f["code"] for f in layer["flags"]}
    result = cli("stats", REAL / TRAINING, "--random", "-b", "2", "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["layers"] == []
    (skipped,) = doc["skipped"]
    assert "not constants" in skipped["reason"]


def test_vit_bn_on_tokens():
    doc = inspect_json(VIT)
    # onnx shape inference cannot follow this graph to the BN inputs: rank unknown, never wrong
    assert {layer["rank"] for layer in doc["layers"]} <= {3, None}
    assert all(layer["channels"] for layer in doc["layers"])
    # six token BNs sit between Transposes and fold into the MatMuls after them (q, k and v at once)
    assert all(layer["fold"]["possible"] for layer in doc["layers"])
    assert sum(layer["fold"]["direction"] == "into_next" for layer in doc["layers"]) == 7
    result = cli("stats", REAL / VIT, "--random", "-b", "4", "--max-batches", "1", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["layers"]) == 7


def test_fold_vit_folds_every_bn_and_verifies(tmp_path):
    out = tmp_path / "vit_folded.onnx"
    result = cli("fold", REAL / VIT, "-o", out, "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["bn_before"], doc["bn_after"]) == (7, 0) and doc["verification"]["passed"] is True
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    # the new biases merge into the bias Adds after q/k/v and the MLP: only the 7 BN nodes go
    assert len(model.graph.node) == len(onnx.load(str(REAL / VIT)).graph.node) - 7


@pytest.mark.parametrize("name, layers", [(PICODET, 103), (ULTRAFACE, 35)])
def test_stats_random_on_fixed_batch_detectors(name, layers):
    result = cli("stats", REAL / name, "--random", "-b", "1", "--max-batches", "2", "--per-channel", "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert len(doc["layers"]) == layers and doc["skipped"] == []
    assert doc["data"]["random"] is True and doc["data"]["batches"] == 2
    assert any("RANDOM" in line for line in doc["summary"]["reading"])
    for layer in doc["layers"]:
        assert layer["count"] > 0 and layer["verdict"] in VERDICTS
        assert all(v is not None for v in layer["batch_mean"])


def test_stats_default_batch_size_follows_a_fixed_batch_model():
    """Without -b, stats uses the model's fixed batch size; an explicit -b 32 that cannot fit is an
    input error that names the fix."""
    assert cli("stats", REAL / ULTRAFACE, "--random", "--max-batches", "1").exit_code == 0
    result = cli("stats", REAL / ULTRAFACE, "--random", "-b", "32")
    assert result.exit_code == 2
    assert "batch size to 1" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def folded_picodet(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("picodet") / "picodet_folded.onnx"
    result = cli("fold", REAL / PICODET, "-o", out, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


def test_fold_picodet_folds_every_bn_and_verifies(folded_picodet):
    out, doc = folded_picodet
    assert (doc["bn_before"], doc["bn_after"]) == (103, 0)
    assert sum(layer["folded"] for layer in doc["layers"]) == 103
    assert doc["verification"]["passed"] is True
    assert len(doc["verification"]["outputs"]) == 8
    model = onnx.load(str(out))
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    onnx.checker.check_model(model, full_check=True)


def test_fold_picodet_agrees_with_onnx_simplifier(folded_picodet):
    """The BN-folded reference (onnx-simplifier) and bnscope's fold give the same detections."""
    out, _ = folded_picodet
    x = {"image": np.random.default_rng(0).standard_normal((1, 3, 320, 320)).astype(np.float32)}
    ours = ort_run(onnx.load(str(out)), x)
    reference = ort_run(onnx.load(str(REAL / PICODET_FOLDED_REFERENCE)), x)
    original = ort_run(onnx.load(str(REAL / PICODET)), x)
    for a, b, o in zip(ours, reference, original):
        scale = max(1.0, float(np.max(np.abs(o))))
        assert np.max(np.abs(a - o)) <= 1e-4 * scale
        assert np.max(np.abs(a - b)) <= 1e-4 * scale


def test_fold_keras2onnx_library_folds_every_bn_exactly():
    """The library sorts the unsorted graph (as loading does for the CLI) and folds all 11
    BN behind keras's NHWC Transposes, crops and Squeeze. The original cannot run end to end
    (its decoder Concat mismatches 200 vs 201 rows in onnxruntime), so each BN output is checked
    on the sub-model that computes it, from the input or from the last Concat before it."""
    from onnx.utils import Extractor

    from bnscope.fold.rewrite import fold_batchnorm
    from bnscope.onnxio.sort import topological_order

    original = onnx.load(str(REAL / KERAS))
    folded, records = fold_batchnorm(original)
    assert len(records) == 11 and all(r.folded for r in records), [r.reason for r in records if not r.folded]
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    onnx.checker.check_model(folded, full_check=True)
    ordered = [original.graph.node[i] for i in topological_order(original.graph)]
    del original.graph.node[:]
    original.graph.node.extend(ordered)
    rng = np.random.default_rng(0)
    feeds = {"input_1": rng.standard_normal((2, 200, 320)).astype(np.float32)}
    cut = {"Test/concat_1:0": rng.standard_normal((2, 200, 9, 128)).astype(np.float32)}
    for bn in (n for n in onnx.load(str(REAL / KERAS)).graph.node if n.op_type == "BatchNormalization"):
        start = cut if bn.name == "batch_norm" else feeds
        want, got = (
            ort_run(Extractor(onnx.shape_inference.infer_shapes(m)).extract_model(list(start), [bn.output[0]]), start)[
                0
            ]
            for m in (original, folded)
        )
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())), err_msg=bn.name)
