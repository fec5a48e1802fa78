"""inspect_model: every BN's neighbours, fold decision (with the reason when refused) and parameter
health, on every sample model and on tiny graphs built here; ``to_dict()`` is the CLI's JSON.

Tiny graphs::

    decomposed:   x -> Conv -> h -> Mul(h, s[1,C,1,1]) -> m -> Add(m, b[1,C,1,1]) -> y
    unnamed BNs:  x -> BN("") -> a -> BN("") -> y
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import bn_in_if_branches_model, bn_inits, bn_node, init, make_model, vi
from helpers import SAMPLES, cli
from onnx import helper

from bnscope import inspect_model
from bnscope.fold.plan import FoldOptions
from bnscope.schema import to_json

ALL_SAMPLES = sorted(p.name for p in SAMPLES.glob("*.onnx"))

# model -> {BN: (foldable, direction, target, substrings of the refusal reason)}
EXPECTED = {
    "resnet_small.onnx": {
        "stem_bn": (True, "into_previous", "stem_conv", ()),
        "block1_bn1": (True, "into_previous", "block1_conv1", ()),
        "block1_bn2": (True, "into_previous", "block1_conv2", ()),
        "block2_bn1": (True, "into_previous", "block2_conv1", ()),
        "block2_bn2": (True, "into_previous", "block2_conv2", ()),
        "block2_proj_bn": (True, "into_previous", "block2_proj_conv", ()),
    },
    "depthwise_block.onnx": {
        "expand_bn": (True, "into_previous", "expand_conv", ()),
        "dw_bn": (True, "into_previous", "dw_conv", ()),
        "pw_bn": (True, "into_previous", "pw_conv", ()),
        "group_bn": (True, "into_previous", "group_conv", ()),
    },
    "mlp.onnx": {
        "bn1": (True, "into_previous", "fc1", ()),
        "bn2": (True, "into_previous", "matmul2", ()),
        "bn3": (True, "into_previous", "matmul3", ()),  # through the bias Add
    },
    "convtranspose_decoder.onnx": {
        "up1_bn": (True, "into_previous", "up1", ()),
        "up2_bn": (True, "into_previous", "up2", ()),
        "up3_bn": (True, "into_previous", "up3", ()),
    },
    "bn_before_conv.onnx": {
        "branch_a_bn": (True, "into_next", "branch_a_conv", ()),
        "branch_b_bn": (False, None, None, ("padding", "branch_b_conv")),
    },
    "shared_conv_output.onnx": {
        "bn1": (False, None, None, ("conv1", "consumers")),
        "bn2": (False, None, None, ("conv2", "graph output")),
    },
    "broken.onnx": {
        "bn1_healthy": (True, "into_previous", "conv1", ()),
        "bn2_stale": (True, "into_previous", "conv2", ()),
        "bn3_never_updated": (True, "into_previous", "conv3", ()),
        "bn4_nan_var": (False, None, None, ("non-finite", "[1]")),
    },
    "conv1d_3d.onnx": {
        "conv1d_bn": (True, "into_previous", "conv1d", ()),
        "conv3d_bn": (True, "into_previous", "conv3d", ()),
    },
    "weights_as_constants.onnx": {
        "bn1": (True, "into_previous", "conv1", ()),
        "bn2": (True, "into_previous", "conv2", ()),
    },
    "bn_after_flatten.onnx": {"bn1": (True, "into_previous", "fc1", ())},
    "training_mode.onnx": {"bn1": (False, None, None, ("training_mode",))},
    "bn_inputs_as_graph_inputs.onnx": {"bn1": (True, "into_previous", "conv1", ())},
    "no_bn.onnx": {},
    "planted_stale.onnx": {f"bn{k}": (True, "into_previous", f"conv{k}", ()) for k in range(1, 5)},
    "train_eval_mismatch.onnx": {f"bn{k}": (True, "into_previous", f"fc{k}", ()) for k in range(1, 5)},
    "training_mode_export.onnx": {
        "bn1": (False, None, None, ("training_mode", "bnscope recalibrate")),
        "bn2": (False, None, None, ("training_mode", "bnscope recalibrate")),
    },
}
EXPECTED["resnet_small_fp16.onnx"] = EXPECTED["resnet_small.onnx"]


def flags_of(layer) -> dict[str, tuple]:
    return {f.code: (f.severity, f.channels) for f in layer.flags}


def test_every_sample_model_has_an_expectation():
    assert sorted(EXPECTED) == ALL_SAMPLES


@pytest.mark.parametrize("name", ALL_SAMPLES)
def test_inspect_fold_decisions(name):
    result = inspect_model(SAMPLES / name)
    got = {layer.name: layer for layer in result.layers}
    assert list(got) == list(EXPECTED[name])
    for bn, (possible, direction, target, reason_parts) in EXPECTED[name].items():
        fold = got[bn].fold
        assert (fold.possible, fold.direction, fold.target) == (possible, direction, target), bn
        if possible:
            assert fold.reason is None
        else:
            assert fold.reason
            for part in reason_parts:
                assert part in fold.reason, (bn, fold.reason)
    assert result.foldable == sum(v[0] for v in EXPECTED[name].values())
    assert result.model.bn_count == len(EXPECTED[name])


@pytest.mark.parametrize("name", ALL_SAMPLES)
def test_inspect_to_dict_equals_the_cli_json(name):
    path = SAMPLES / name
    result = cli("inspect", str(path), "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(to_json(inspect_model(path).to_dict()))


def test_inspect_broken_flags():
    layers = {layer.name: layer for layer in inspect_model(SAMPLES / "broken.onnx").layers}
    assert flags_of(layers["bn1_healthy"]) == {}
    assert flags_of(layers["bn2_stale"]) == {}  # stale is a stats verdict (needs data), not a parameter flag
    assert flags_of(layers["bn3_never_updated"]) == {"never_updated": ("warning", ())}
    assert flags_of(layers["bn4_nan_var"]) == {"nonfinite": ("error", (1,))}
    assert layers["bn4_nan_var"].severity == "error"
    assert layers["bn3_never_updated"].severity == "warning"
    assert layers["bn1_healthy"].severity is None


def test_inspect_broken_summary_counts():
    summary = inspect_model(SAMPLES / "broken.onnx").to_dict()["summary"]
    assert summary == {"bn": 4, "foldable": 3, "flags": {"error": 1, "warning": 1, "info": 0}}


def test_inspect_neighbours():
    layers = {layer.name: layer for layer in inspect_model(SAMPLES / "shared_conv_output.onnx").layers}
    assert layers["bn1"].producer == {"op": "Conv", "name": "conv1"}
    assert layers["bn2"].producer == {"op": "Conv", "name": "conv2"}
    bn_before = {layer.name: layer for layer in inspect_model(SAMPLES / "bn_before_conv.onnx").layers}
    assert bn_before["branch_a_bn"].producer == {"op": "graph_input", "name": "input"}
    assert bn_before["branch_a_bn"].consumers == ({"op": "Conv", "name": "branch_a_conv"},)
    broken = {layer.name: layer for layer in inspect_model(SAMPLES / "broken.onnx").layers}
    assert broken["bn4_nan_var"].consumers == ({"op": "graph_output", "name": "output"},)


@pytest.mark.parametrize(
    "name, ranks, channels",
    [
        ("resnet_small.onnx", [4] * 6, [16, 16, 16, 32, 32, 32]),
        ("conv1d_3d.onnx", [3, 5], [8, 4]),
        ("mlp.onnx", [2, 2, 2], [32, 24, 16]),
        ("bn_after_flatten.onnx", [3], [3]),
    ],
)
def test_inspect_rank_and_channels(name, ranks, channels):
    layers = inspect_model(SAMPLES / name).layers
    assert [layer.rank for layer in layers] == ranks
    assert [layer.channels for layer in layers] == channels
    assert all(layer.epsilon == pytest.approx(1e-5) and layer.momentum == pytest.approx(0.9) for layer in layers)


def test_inspect_training_mode():
    (layer,) = inspect_model(SAMPLES / "training_mode.onnx").layers
    assert layer.training_mode == 1
    assert flags_of(layer)["training_mode"][0] == "error"
    assert "training_mode" in layer.fold.reason


def test_inspect_no_bn_note():
    result = inspect_model(SAMPLES / "no_bn.onnx")
    assert result.layers == ()
    (note,) = result.model.notes
    assert "no BatchNormalization" in note and "PyTorch" in note
    assert result.to_dict()["summary"] == {"bn": 0, "foldable": 0, "flags": {"error": 0, "warning": 0, "info": 0}}


def test_inspect_overridable_initializers():
    path = SAMPLES / "bn_inputs_as_graph_inputs.onnx"
    result = inspect_model(path)
    assert any("initializers are also graph inputs" in n for n in result.model.notes)
    assert [vi["name"] for vi in result.model.inputs] == ["input"]  # only what a user feeds
    assert result.layers[0].fold.notes  # folds, but says it trusted overridable constants
    kept = inspect_model(path, FoldOptions(keep_overridable=True)).layers[0].fold
    assert not kept.possible and "overridable" in kept.reason


def test_inspect_model_summary():
    m = inspect_model(SAMPLES / "resnet_small.onnx").model
    assert (m.opset, m.ir_version, m.node_count, m.bn_count) == (17, 8, 22, 6)
    assert m.producer.startswith("bnscope-sample-builder")
    assert m.inputs == ({"name": "input", "shape": ["N", 3, 32, 32], "dtype": "float32"},)
    assert m.outputs == ({"name": "logits", "shape": ["N", 10], "dtype": "float32"},)
    fp16 = inspect_model(SAMPLES / "resnet_small_fp16.onnx").model
    assert fp16.inputs[0]["dtype"] == "float16"


# -- decomposed BN ----------------------------------------------------------------------------------
def decomposed_model(
    scale_shape=(1, 4, 1, 1), shift_shape=(1, 4, 1, 1), producer: str = "Conv", extra_reader: bool = False
) -> onnx.ModelProto:
    """x -> Conv (or Relu) -> h -> Mul(h, s) -> m -> Add(m, b) -> y  [and m -> Neg -> z if extra_reader]"""
    rng = np.random.default_rng(0)
    first = (
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1])
        if producer == "Conv"
        else helper.make_node("Relu", ["x"], ["h"], name="relu")
    )
    nodes = [
        first,
        helper.make_node("Mul", ["h", "s"], ["m"], name="scale_mul"),
        helper.make_node("Add", ["m", "b"], ["y"], name="shift_add"),
    ]
    inits = [
        init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        init("s", (rng.uniform(0.5, 1.5, scale_shape)).astype(np.float32)),
        init("b", rng.standard_normal(shift_shape).astype(np.float32)),
    ]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["m"], ["z"], name="other_reader"))
    outputs = [vi("y", None)] + ([vi("z", None)] if extra_reader else [])
    if producer != "Conv":
        inits = inits[1:]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], outputs, inits)


def inspect_built(model: onnx.ModelProto, tmp_path: Path):
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    return inspect_model(path)


def test_decomposed_bn_is_detected(tmp_path):
    result = inspect_built(decomposed_model(), tmp_path)
    assert result.layers == ()
    (found,) = result.decomposed
    assert found.to_dict() == {
        "after": "conv",
        "after_op": "Conv",
        "mul": "scale_mul",
        "add": "shift_add",
        "channels": 4,
    }
    assert any("decomposed" in n for n in result.model.notes)
    assert result.to_dict()["decomposed_bn"] == [found.to_dict()]


def test_decomposed_bn_flat_constants(tmp_path):
    """(C,1,1) constants broadcast per channel too."""
    (found,) = inspect_built(decomposed_model((4, 1, 1), (4, 1, 1)), tmp_path).decomposed
    assert found.channels == 4


NEGATIVES = {
    "scalar_scale": dict(scale_shape=(1,)),  # one number for every channel: not a BN
    "channel_mismatch": dict(shift_shape=(1, 1, 1, 8)),  # the shift varies along W, not C
    "not_after_linear": dict(scale_shape=(1, 3, 1, 1), shift_shape=(1, 3, 1, 1), producer="Relu"),
    "mul_shared": dict(extra_reader=True),  # another node reads the Mul output too
}


@pytest.mark.parametrize("case", list(NEGATIVES))
def test_decomposed_bn_negatives(tmp_path, case):
    result = inspect_built(decomposed_model(**NEGATIVES[case]), tmp_path)
    assert result.decomposed == ()
    assert not any("decomposed" in n for n in result.model.notes)


# -- generated names -----------------------------------------------------------------------------------
def chain_of_bns(names: list[str]) -> onnx.ModelProto:
    """x -> BN(names[0]) -> t1 -> BN(names[1]) -> ... -> y"""
    rng = np.random.default_rng(1)
    nodes, inits = [], []
    for k, name in enumerate(names):
        src, dst = ("x" if k == 0 else f"t{k}"), ("y" if k == len(names) - 1 else f"t{k + 1}")
        nodes.append(bn_node(src, dst, prefix=f"p{k}", name=name))
        inits += bn_inits(rng, 3, prefix=f"p{k}")
    return make_model(nodes, [vi("x", ["N", 3, 4, 4])], [vi("y", ["N", 3, 4, 4])], inits)


@pytest.mark.parametrize(
    "names, expected",
    [
        (["", ""], ["BatchNormalization#0", "BatchNormalization#1"]),
        (["first", ""], ["first", "BatchNormalization#1"]),
        (["dup", "dup"], ["dup", "BatchNormalization#1"]),
        (["BatchNormalization#1", ""], ["BatchNormalization#1", "BatchNormalization#1'"]),
    ],
)
def test_unnamed_bn_gets_a_stable_generated_name(tmp_path, names, expected):
    result = inspect_built(chain_of_bns(names), tmp_path)
    assert [layer.name for layer in result.layers] == expected
    assert inspect_built(chain_of_bns(names), tmp_path).to_dict() == result.to_dict()  # stable


def test_bn_on_a_graph_input_with_nothing_around_it(tmp_path):
    (layer, second) = inspect_built(chain_of_bns(["a", "b"]), tmp_path).layers
    assert layer.producer == {"op": "graph_input", "name": "x"}
    assert not layer.fold.possible and layer.fold.reason
    assert second.consumers == ({"op": "graph_output", "name": "y"},)


def test_inspect_missing_model_raises_bnscope_error(tmp_path):
    from bnscope.errors import BnscopeError

    with pytest.raises(BnscopeError, match="not found"):
        inspect_model(tmp_path / "nothere.onnx")


def test_inspect_notes_bns_inside_control_flow_subgraphs(tmp_path):
    path = tmp_path / "if_bn.onnx"
    onnx.save(bn_in_if_branches_model(), path)
    result = inspect_model(path)
    assert [layer.name for layer in result.layers] == ["main_bn"]
    assert (
        "2 control-flow subgraph(s) contain BatchNormalization; only the main graph is analysed" in result.model.notes
    )
