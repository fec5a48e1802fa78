"""Random verification inputs respect the model's fixed dims; ``fold``/``run --batch-size``.

ONNX's node test ``batchnorm_epsilon_training_mode`` feeds x [2,3,4,5] and BN's scale, bias, mean
and var [3] as graph inputs: axis 0 is 2 for x and 3 for the rest, so stacking random samples on
axis 0 of every input fitted no batch size. The tiny models here::

    x [2,3,4,5] --BN(s, b, mean, var: graph inputs [3], training_mode=1)--> y, output_mean, output_var
    x [N,3,4,5] --Mul(s [3,1,1])--> h --BN(initializers)--> y
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import bn_inits, bn_node, init, make_model, vi
from helpers import cli
from onnx import helper

from bnscope.data.sources import open_source
from bnscope.data.spec import InputSpec, input_specs, model_batch_size
from bnscope.errors import BnscopeError
from bnscope.workflows.fold import fold_model
from bnscope.workflows.options import DataChoice, FoldSettings


def training_mode_model() -> onnx.ModelProto:
    params = [vi(name, [3]) for name in ("s", "bias", "mean", "var")]
    node = helper.make_node(
        "BatchNormalization",
        ["x", "s", "bias", "mean", "var"],
        ["y", "output_mean", "output_var"],
        epsilon=1e-2,
        training_mode=1,
    )
    return make_model(
        [node],
        [vi("x", [2, 3, 4, 5]), *params],
        [vi("y", [2, 3, 4, 5]), vi("output_mean", [3]), vi("output_var", [3])],
        opset=15,
        ir_version=8,
    )


def side_input_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Mul", ["x", "s"], ["h"]), bn_node("h", "y")]
    return make_model(
        nodes, [vi("x", ["N", 3, 4, 5]), vi("s", [3, 1, 1])], [vi("y", ["N", 3, 4, 5])], bn_inits(rng, 3), ir_version=8
    )


def _save(model: onnx.ModelProto, tmp_path, name: str = "m.onnx"):
    path = tmp_path / name
    onnx.save_model(model, str(path))
    return path


def spec(name, shape):
    return InputSpec(name, np.dtype(np.float32), tuple(shape))


# -- data --------------------------------------------------------------------------------------
def test_model_batch_size_ignores_rank_1_parameters():
    assert model_batch_size(input_specs(training_mode_model())) == 2
    assert model_batch_size(input_specs(side_input_model())) is None
    assert model_batch_size([spec("a", [4]), spec("b", [4])]) == 4
    assert model_batch_size([spec("a", [3]), spec("b", [5])]) is None


def test_random_data_draws_fixed_inputs_whole():
    source = open_source(None, input_specs(training_mode_model()), random=True, random_samples=4)
    batches = list(source.batches(2))
    assert len(batches) == 2
    for batch in batches:
        assert batch["x"].shape == (2, 3, 4, 5)
        assert all(batch[k].shape == (3,) for k in ("s", "bias", "mean", "var"))
    assert not np.array_equal(batches[0]["s"], batches[1]["s"])  # a fresh draw per batch


def test_random_data_keeps_stacked_samples_independent_of_batch_size():
    inputs = input_specs(side_input_model())
    whole = next(open_source(None, inputs, random=True, random_samples=4).batches(4))
    halves = list(open_source(None, inputs, random=True, random_samples=4).batches(2))
    np.testing.assert_array_equal(whole["x"], np.concatenate([h["x"] for h in halves]))
    assert whole["s"].shape == halves[0]["s"].shape == (3, 1, 1)


# -- deploy ------------------------------------------------------------------------------------
def test_data_choice_uses_the_models_batch_size():
    assert DataChoice().batch_size_for(training_mode_model()) == 2
    assert DataChoice().batch_size_for(side_input_model()) == 8
    assert DataChoice(batch_size=3).batch_size_for(side_input_model()) == 3


def test_data_choice_refuses_a_batch_size_the_model_contradicts():
    with pytest.raises(BnscopeError, match="fixes its batch size to 2") as info:
        DataChoice(batch_size=4).batch_size_for(training_mode_model())
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("build", [training_mode_model, side_input_model])
def test_fold_verifies_models_with_fixed_side_inputs(tmp_path, build):
    result = fold_model(_save(build(), tmp_path), FoldSettings(output=tmp_path / "out.onnx"))
    assert result.passed and result.output is not None
    assert result.verification[0].batches == 4


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_fold_fixed_batch_model_exits_0(tmp_path):
    result = cli("fold", _save(training_mode_model(), tmp_path), "-o", tmp_path / "out.onnx", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert "(8 samples" in result.stdout  # 4 batches of the model's 2


def test_cli_fold_batch_size_option(tmp_path):
    result = cli(
        "fold",
        _save(side_input_model(), tmp_path),
        "-o",
        tmp_path / "out.onnx",
        "--batch-size",
        "3",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    assert "(12 samples" in result.stdout


def test_cli_fold_contradicting_batch_size_is_one_line_exit_2(tmp_path):
    result = cli("fold", _save(training_mode_model(), tmp_path), "-o", tmp_path / "out.onnx", "-b", "4")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "fixes its batch size to 2" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_cli_run_defaults_to_the_models_batch_size(tmp_path):
    result = cli("run", _save(training_mode_model(), tmp_path), "--runs", "2", "--warmup", "0", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert "(2 samples" in result.stdout


def test_fold_of_a_model_whose_original_cannot_run_says_so_in_one_line(tmp_path):
    # x (N, 4) -> Gemm -> BN -> Reshape([3, -1]): loads fine, fails at run time for N = 8.
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["h"], name="gemm", transB=1),
        bn_node("h", "y"),
        helper.make_node("Reshape", ["y", "shape"], ["out"], name="reshape"),
    ]
    model = make_model(
        nodes,
        [vi("x", ["N", 4])],
        [vi("out", [3, None])],
        [
            init("W", rng.standard_normal((4, 4)).astype(np.float32)),
            init("shape", np.array([3, -1], np.int64)),
            *bn_inits(rng, 4),
        ],
        ir_version=8,
    )
    path, out = _save(model, tmp_path), tmp_path / "folded.onnx"
    result = cli("fold", str(path), "-o", str(out), "--random", "-b", "8")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the original model fails in onnxruntime")
    assert "--no-verify" in lines[0] and not out.exists()
    unverified = cli("fold", str(path), "-o", str(out), "--no-verify")
    assert unverified.exit_code == 0 and out.exists()
