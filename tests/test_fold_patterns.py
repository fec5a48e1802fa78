"""Tests for bnscope.fold_patterns (with fold_plan, fold_into_previous, fold_into_next): which plan each
pattern makes, and each refusal's reason."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import bn_arrays, bn_inits, bn_node, init, make_model, vi
from onnx import TensorProto, helper

from bnscope.fold.patterns import bn_sites, plan_fold
from bnscope.fold.plan import FoldOptions, FoldPlan, Refusal
from bnscope.onnxio.graph import GraphView


def _w(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _plan(model, bn: str = "bn", options: FoldOptions = FoldOptions()) -> FoldPlan | Refusal:
    view = GraphView(model)
    return plan_fold(view, view.index_of(bn), options)


def _target(model, plan: FoldPlan) -> str:
    return GraphView(model).nodes[plan.target].op_type


def _refused(model, *words: str, bn: str = "bn", options: FoldOptions = FoldOptions()) -> str:
    result = _plan(model, bn, options)
    assert isinstance(result, Refusal), result
    for word in words:
        assert word in result.reason, result.reason
    return result.reason


def _conv_bn(rng, conv_inputs=("x", "w"), c=4, **conv_attrs):
    #   x -> Conv(w) -> BN -> y
    nodes = [helper.make_node("Conv", list(conv_inputs), ["c"], **conv_attrs), bn_node("c", "y")]
    return nodes, [init("w", _w(rng, c, 3, 1, 1))] + bn_inits(rng, c)


# -- plans --------------------------------------------------------------------------------------
def test_plan_conv_bn_into_previous(rng):
    nodes, inits = _conv_bn(rng)
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits)
    plan = _plan(model)
    assert isinstance(plan, FoldPlan)
    assert (plan.direction, _target(model, plan), plan.weight_input, plan.bias_add, plan.rank) == (
        "into_previous",
        "Conv",
        1,
        None,
        4,
    )


def test_plan_constant_left_matmul_uses_weight_input_0(rng):
    #   x (B, K, L) -> MatMul(W @ x) -> BN -> y
    nodes = [helper.make_node("MatMul", ["W", "x"], ["mm"]), bn_node("mm", "y")]
    model = make_model(nodes, [vi("x", [2, 5, 3])], [vi("y", None)], [init("W", _w(rng, 4, 5))] + bn_inits(rng, 4))
    plan = _plan(model)
    assert isinstance(plan, FoldPlan) and plan.weight_input == 0 and _target(model, plan) == "MatMul"


def test_plan_gemm_reshape_block(rng):
    #   x (2, 5) -> Gemm -> (2, 12) -> Reshape(2, 3, 4) -> BN(3) -> y: 4 features per channel
    nodes = [
        helper.make_node("Gemm", ["x", "B"], ["g"]),
        helper.make_node("Reshape", ["g", "s"], ["r"]),
        bn_node("r", "y"),
    ]
    inits = [init("B", _w(rng, 5, 12)), init("s", np.array([2, 3, 4], np.int64))] + bn_inits(rng, 3)
    model = make_model(nodes, [vi("x", [2, 5])], [vi("y", None)], inits)
    plan = _plan(model)
    assert isinstance(plan, FoldPlan) and plan.block == 4 and plan.reshape is not None


def test_plan_gemm_reshape_dynamic_batch(rng):
    #   x (N, 5) -> Gemm -> Reshape(-1, 3, 4) -> BN(3) -> y
    nodes = [
        helper.make_node("Gemm", ["x", "B"], ["g"]),
        helper.make_node("Reshape", ["g", "s"], ["r"]),
        bn_node("r", "y"),
    ]
    inits = [init("B", _w(rng, 5, 12)), init("s", np.array([-1, 3, 4], np.int64))] + bn_inits(rng, 3)
    model = make_model(nodes, [vi("x", ["N", 5])], [vi("y", None)], inits)
    plan = _plan(model)
    assert isinstance(plan, FoldPlan) and plan.block == 4


def test_plan_conv_add_bn_records_the_add(rng):
    #   x -> Conv -> Add(const (C, 1, 1)) -> BN -> y
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Add", ["k", "c"], ["a"]), bn_node("a", "y")]
    inits = [init("w", _w(rng, 4, 3, 1, 1)), init("k", _w(rng, 4, 1, 1))] + bn_inits(rng, 4)
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits)
    plan = _plan(model)
    assert isinstance(plan, FoldPlan) and plan.bias_add == 1


def test_plan_bn_before_conv_into_next(rng):
    nodes = [bn_node("x", "n"), helper.make_node("Conv", ["n", "w"], ["y"], pads=[0, 0, 0, 0])]
    model = make_model(
        nodes, [vi("x", [1, 4, 5, 5])], [vi("y", None)], [init("w", _w(rng, 3, 4, 3, 3))] + bn_inits(rng, 4)
    )
    plan = _plan(model)
    assert isinstance(plan, FoldPlan) and plan.direction == "into_next"


def test_plan_overridable_params_fold_with_note(rng):
    nodes, inits = _conv_bn(rng)
    ins = [vi("x", [1, 3, 4, 4])] + [vi(t.name, list(t.dims)) for t in inits]
    model = make_model(nodes, ins, [vi("y", None)], inits, opset=9, ir_version=3)
    plan = _plan(model)
    assert isinstance(plan, FoldPlan) and any("graph inputs" in n for n in plan.notes)
    _refused(model, "overridable", options=FoldOptions(keep_overridable=True))


def test_bn_sites_in_graph_order(rng):
    nodes = [bn_node("x", "t", "b1"), helper.make_node("Relu", ["t"], ["r"]), bn_node("r", "y", "b2")]
    model = make_model(nodes, [vi("x", [1, 4, 2, 2])], [vi("y", None)], bn_inits(rng, 4, "b1") + bn_inits(rng, 4, "b2"))
    assert bn_sites(GraphView(model)) == [0, 2]


# -- refusals: the BN itself --------------------------------------------------------------------
def test_refuse_training_mode(rng):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", ["y", "m", "v"], training_mode=1)]
    model = make_model(nodes, [vi("x", [2, 3, 4, 4])], [vi("y", None)], _conv_bn(rng)[1], opset=15)
    _refused(model, "training_mode")


def test_refuse_opset6_is_test_0(rng):
    nodes, inits = _conv_bn(rng)
    nodes[1] = bn_node("c", "y", is_test=0)
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])], inits, opset=6)
    _refused(model, "is_test=0")


def test_refuse_spatial_0(rng):
    nodes, inits = _conv_bn(rng)
    nodes[1] = bn_node("c", "y", spatial=0)
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])], inits, opset=7)
    _refused(model, "spatial=0")


def test_refuse_params_graph_inputs(rng):
    nodes, inits = _conv_bn(rng)
    ins = [vi("x", [1, 3, 4, 4]), vi("bn_mean", [4]), vi("bn_var", [4])]
    model = make_model(nodes, ins, [vi("y", None)], [t for t in inits if t.name not in ("bn_mean", "bn_var")])
    _refused(model, "graph inputs", "mean", "var")


def test_refuse_params_computed(rng):
    #   s -> Relu -> scale (computed, not constant)
    nodes, inits = _conv_bn(rng)
    nodes.insert(0, helper.make_node("Relu", ["s"], ["bn_scale"]))
    model = make_model(
        nodes, [vi("x", [1, 3, 4, 4]), vi("s", [4])], [vi("y", None)], [t for t in inits if t.name != "bn_scale"]
    )
    _refused(model, "computed by the graph", "scale")


@pytest.mark.parametrize("bad,words", [(np.nan, ("NaN", "[1]")), (np.inf, ("Inf", "[1]")), (-5.0, ("negative", "[1]"))])
def test_refuse_bad_running_var(rng, bad, words):
    nodes, _ = _conv_bn(rng)
    params = bn_arrays(rng, 4)
    params["var"][1] = bad
    inits = [init("w", _w(rng, 4, 3, 1, 1))] + [init(f"bn_{k}", v) for k, v in params.items()]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits)
    _refused(model, *words)


def test_refuse_used_optional_outputs_opset6(rng):
    #   opset 6, is_test=1: x -> Conv -> BN -> (y, mean) with mean read by Identity
    nodes, inits = _conv_bn(rng)
    nodes[1] = bn_node("c", ["y", "m"], is_test=1)
    nodes.append(helper.make_node("Identity", ["m"], ["mo"]))
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4]), vi("mo", [4])], inits, opset=6)
    _refused(model, "optional outputs", "m")


@pytest.mark.parametrize("opset", [7, 9, 13])
def test_refuse_extra_outputs_mean_training_before_opset14(rng, opset):
    nodes, inits = _conv_bn(rng)
    nodes[1] = bn_node("c", ["y", "m", "v", "sm", "sv"])
    model = make_model(nodes, [vi("x", [2, 3, 4, 4])], [vi("y", [2, 4, 4, 4])], inits, opset=opset)
    _refused(model, "training mode", "5 outputs")


def test_refuse_only_and_skip(rng):
    nodes, inits = _conv_bn(rng)
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits)
    _refused(model, "--only", options=FoldOptions(only=frozenset({"other"})))
    _refused(model, "--skip", options=FoldOptions(skip=frozenset({"bn"})))
    assert isinstance(_plan(model, options=FoldOptions(only=frozenset({"bn"}))), FoldPlan)


# -- refusals: the neighbour before -------------------------------------------------------------
def test_refuse_graph_input_before_and_nothing_after(rng):
    model = make_model([bn_node("x", "y")], [vi("x", [1, 4, 2, 2])], [vi("y", None)], bn_inits(rng, 4))
    _refused(model, "graph input", "graph output")


def test_refuse_non_linear_before(rng):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "y")]
    model = make_model(nodes, [vi("x", [1, 4, 2, 2])], [vi("y", None)], bn_inits(rng, 4))
    _refused(model, "Relu", "not Conv/ConvTranspose/Gemm/MatMul")


def test_refuse_conv_two_consumers(rng):
    nodes, inits = _conv_bn(rng)
    nodes.append(helper.make_node("Relu", ["c"], ["r"]))
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None), vi("r", None)], inits)
    _refused(model, "2 consumers")


def test_refuse_conv_output_is_graph_output(rng):
    nodes, inits = _conv_bn(rng)
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None), vi("c", None)], inits)
    _refused(model, "graph output")


def test_refuse_conv_weight_graph_input(rng):
    nodes, inits = _conv_bn(rng)
    model = make_model(nodes, [vi("x", [1, 3, 4, 4]), vi("w", [4, 3, 1, 1])], [vi("y", None)], inits[1:])
    _refused(model, "weight 'w'", "not a constant")


def test_refuse_conv_bias_not_constant(rng):
    nodes, inits = _conv_bn(rng, ("x", "w", "b"))
    model = make_model(nodes, [vi("x", [1, 3, 4, 4]), vi("b", [4])], [vi("y", None)], inits)
    _refused(model, "bias", "not a constant")


def test_refuse_integer_weight(rng):
    #   int8 weight through Cast is constant but stays non-float when read before the Cast
    nodes = [
        helper.make_node("MatMulInteger", ["x", "w"], ["mi"]),
        helper.make_node("Cast", ["mi"], ["c"], to=TensorProto.FLOAT),
        bn_node("c", "y"),
    ]
    inits = [init("w", rng.integers(-5, 5, (5, 4)).astype(np.int8))] + bn_inits(rng, 4)
    model = make_model(nodes, [vi("x", [3, 5], TensorProto.INT8)], [vi("y", None)], inits)
    _refused(model, "Cast", "not Conv")


def test_refuse_add_with_non_constant_operand(rng):
    #   x -> Conv -> Add(r, residual input) -> BN -> y
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "r"], ["a"]), bn_node("a", "y")]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4]), vi("r", [1, 4, 4, 4])], [vi("y", None)], _conv_bn(rng)[1])
    _refused(model, "Add", "no constant operand")


def test_refuse_add_constant_with_batch_axis(rng):
    #   x (2, ...) -> Conv -> Add(const (2, C, 1, 1)) -> BN -> y: the constant varies per sample
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "k"], ["a"]), bn_node("a", "y")]
    inits = _conv_bn(rng)[1] + [init("k", _w(rng, 2, 4, 1, 1))]
    model = make_model(nodes, [vi("x", [2, 3, 4, 4])], [vi("y", None)], inits)
    _refused(model, "bias Add", "change the output shape")


def test_refuse_matmul_3d_output(rng):
    #   x (B, L, K) -> MatMul(W (K, N)) -> (B, L, N) -> BN over axis 1 (L): not W's output axis
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"]), bn_node("mm", "y")]
    model = make_model(nodes, [vi("x", [2, 4, 5])], [vi("y", None)], [init("W", _w(rng, 5, 3))] + bn_inits(rng, 4))
    _refused(model, "rank 3")


def test_plan_conv_reshape_bn_same_channels(rng):
    #   x -> Conv -> (1, 4, 4, 4) -> Reshape(1, 4, 16) -> BN(4): channel c is conv channel c
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Reshape", ["c", "s"], ["r"]),
        bn_node("r", "y"),
    ]
    inits = _conv_bn(rng)[1] + [init("s", np.array([1, 4, 16], np.int64))]
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits)
    plan = _plan(model)
    assert isinstance(plan, FoldPlan) and plan.feature_channels is None and _target(model, plan) == "Conv"


def test_refuse_conv_reshape_bn_per_position(rng):
    #   x -> Conv -> (1, 4, 4, 4) -> Reshape(1, 16, 4) -> BN(16): BN channel = (conv channel, row),
    #   so one conv channel would need four different scales
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Reshape", ["c", "s"], ["r"]),
        bn_node("r", "y"),
    ]
    inits = [init("w", _w(rng, 4, 3, 1, 1)), init("s", np.array([1, 16, 4], np.int64))] + bn_inits(rng, 16)
    model = make_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", None)], inits)
    _refused(model, "Reshape", "feature 0", "channels 0 and 1", "scale/shift differ")


def test_refuse_reshape_feature_in_two_channels(rng):
    #   x (2, 5) -> Gemm -> (2, 6) -> Reshape(3, 4) -> BN(4): feature 0 is channel 0 in sample 0 and
    #   channel 2 in sample 1
    nodes = [
        helper.make_node("Gemm", ["x", "B"], ["g"]),
        helper.make_node("Reshape", ["g", "s"], ["r"]),
        bn_node("r", "y"),
    ]
    inits = [init("B", _w(rng, 5, 6)), init("s", np.array([3, 4], np.int64))] + bn_inits(rng, 4)
    model = make_model(nodes, [vi("x", [2, 5])], [vi("y", None)], inits)
    _refused(model, "feature 0", "channels 0 and 2")


def test_refuse_reshape_shapes_unknown(rng):
    #   x (N, 5) -> Gemm -> Reshape(shape from the graph input s) -> BN(3): the map cannot be checked
    nodes = [
        helper.make_node("Gemm", ["x", "B"], ["g"]),
        helper.make_node("Reshape", ["g", "s"], ["r"]),
        bn_node("r", "y"),
    ]
    inits = [init("B", _w(rng, 5, 12))] + bn_inits(rng, 3)
    model = make_model(nodes, [vi("x", ["N", 5]), vi("s", [3], TensorProto.INT64)], [vi("y", None)], inits)
    _refused(model, "Reshape", "not known statically")


def test_refuse_previous_bn_in_training_mode(rng):
    #   opset 15: x -> BN1(training_mode=1) -> BN2 -> y
    nodes = [bn_node("x", ["t", "m", "v"], "bn1", training_mode=1), bn_node("t", "y", "bn2")]
    model = make_model(
        nodes,
        [vi("x", [2, 4, 2, 2])],
        [vi("y", [2, 4, 2, 2])],
        bn_inits(rng, 4, "bn1") + bn_inits(rng, 4, "bn2"),
        opset=15,
    )
    _refused(model, "cannot absorb", "training_mode", bn="bn2")


# -- refusals: the neighbour after --------------------------------------------------------------
@pytest.mark.parametrize(
    "attrs,shown", [({"pads": [1, 1, 1, 1]}, "[1, 1, 1, 1]"), ({"auto_pad": "SAME_UPPER"}, "SAME_UPPER")]
)
def test_refuse_next_conv_with_padding(rng, attrs, shown):
    nodes = [bn_node("x", "n"), helper.make_node("Conv", ["n", "w"], ["y"], **attrs)]
    model = make_model(
        nodes, [vi("x", [1, 4, 5, 5])], [vi("y", None)], [init("w", _w(rng, 3, 4, 3, 3))] + bn_inits(rng, 4)
    )
    _refused(model, "padding", shown)


def test_refuse_next_gemm_trans_a(rng):
    nodes = [bn_node("x", "n"), helper.make_node("Gemm", ["n", "B"], ["y"], transA=1)]
    model = make_model(nodes, [vi("x", [5, 4])], [vi("y", None)], [init("B", _w(rng, 5, 3))] + bn_inits(rng, 4))
    _refused(model, "untransposed A")


def test_refuse_next_two_consumers(rng):
    nodes = [bn_node("x", "n"), helper.make_node("Conv", ["n", "w"], ["y"]), helper.make_node("Relu", ["n"], ["r"])]
    model = make_model(
        nodes,
        [vi("x", [1, 4, 5, 5])],
        [vi("y", None), vi("r", None)],
        [init("w", _w(rng, 3, 4, 1, 1))] + bn_inits(rng, 4),
    )
    _refused(model, "2 consumers")


def test_refuse_next_matmul_not_contracting_channels(rng):
    #   x (B, C, L) -> BN(C) -> MatMul(. @ W (L, N)): contracts L, not C
    nodes = [bn_node("x", "n"), helper.make_node("MatMul", ["n", "W"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 4, 3])], [vi("y", None)], [init("W", _w(rng, 3, 6))] + bn_inits(rng, 4))
    _refused(model, "does not contract")


def test_into_next_disabled(rng):
    nodes = [bn_node("x", "n"), helper.make_node("Conv", ["n", "w"], ["y"])]
    model = make_model(
        nodes, [vi("x", [1, 4, 5, 5])], [vi("y", None)], [init("w", _w(rng, 3, 4, 1, 1))] + bn_inits(rng, 4)
    )
    reason = _refused(model, "graph input", options=FoldOptions(into_next=False))
    assert "Conv" not in reason


@pytest.mark.parametrize("direction", ["into_previous", "into_next"])
def test_refuse_float16_bias_overflow(rng, direction):
    #   fp16, |shift| = |beta - mean * scale| ~ 1e5: the folded bias cannot be stored
    params = bn_arrays(rng, 4, np.float16)
    params["mean"][:] = 3e4
    params["scale"][:] = 4
    inits = [init("w", _w(rng, 4, 4, 1, 1, dtype=np.float16))] + [init(f"bn_{k}", v) for k, v in params.items()]
    if direction == "into_previous":
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")]
    else:
        nodes = [bn_node("x", "c"), helper.make_node("Conv", ["c", "w"], ["y"])]
    model = make_model(nodes, [vi("x", [1, 4, 2, 2], TensorProto.FLOAT16)], [vi("y", None, TensorProto.FLOAT16)], inits)
    _refused(model, "folded bias", "overflow float16")
