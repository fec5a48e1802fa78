"""Tests for bnscope.instrument: the model copy whose only outputs are per-channel BN statistics.

Most graphs here are one layer::

    x (N, C, *S) -> Conv(1x1, bias) -> h -> BatchNormalization(gamma, beta, mean, var) -> y -> Relu -> out

checked for structure (onnx.checker, outputs = the taps, the Tap map, unmutated input), for the
strategy ``auto`` picks, and by value against numpy float64 where the surgery changes numbers
(train mode, unknown ranks).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import bn_in_if_branches_model
from helpers import SAMPLES, moments64
from onnx import TensorProto, helper, numpy_helper

from bnscope.errors import BnscopeError
from bnscope.onnxio.graph import GraphView
from bnscope.stats.accumulate import batch_moments
from bnscope.stats.instrument import INPUT_SUMS, OUTPUT_POOL, instrument
from bnscope.stats.train_ops import BATCH_MOMENTS

EPS = 1e-5


def _model(nodes, inputs, out_shape, inits, *, elem=TensorProto.FLOAT, ir_version=8, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", elem, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version  # onnx 1.23 stamps an IR onnxruntime 1.31 rejects
    return model


def conv_bn(
    rank=4,
    c=3,
    *,
    gamma=None,
    beta=None,
    mean=None,
    var=None,
    dtype=np.float32,
    graph_inputs=(),
    training_mode=False,
    ir_version=8,
    seed=0,
):
    """The module docstring's graph (Gemm instead of Conv at rank 2); ``graph_inputs`` names BN
    parameters (scale, B, mean, var) fed as graph inputs instead of stored."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    params = {
        "scale": gamma if gamma is not None else rng.uniform(0.5, 1.5, c),
        "B": beta if beta is not None else rng.uniform(-0.5, 0.5, c),
        "mean": mean if mean is not None else rng.uniform(-0.2, 0.2, c),
        "var": var if var is not None else rng.uniform(1.0, 2.0, c),
    }
    w = rng.standard_normal((c, c) + (1,) * (rank - 2))
    inits = [
        numpy_helper.from_array(np.asarray(v).astype(dtype), k)
        for k, v in [("W", w), ("b", rng.standard_normal(c) * 0.1)] + list(params.items())
        if k not in graph_inputs
    ]
    spatial = ["S"] * (rank - 2)
    inputs = [helper.make_tensor_value_info("x", elem, ["N", c] + spatial)]
    inputs += [helper.make_tensor_value_info(k, elem, [c]) for k in graph_inputs]
    if ir_version < 4:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    linear = (
        helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="linear", transB=1)
        if rank == 2
        else helper.make_node("Conv", ["x", "W", "b"], ["h"], name="linear")
    )
    outs = ["y", "running_mean", "running_var"] if training_mode else ["y"]
    bn = helper.make_node(
        "BatchNormalization",
        ["h", "scale", "B", "mean", "var"],
        outs,
        name="bn",
        epsilon=EPS,
        **({"training_mode": 1} if training_mode else {}),
    )
    return _model(
        [linear, bn, helper.make_node("Relu", ["y"], ["out"], name="relu")],
        inputs,
        ["N", c] + spatial,
        inits,
        elem=elem,
        ir_version=ir_version,
        opset=15 if training_mode else 17,
    )


def run(model: onnx.ModelProto, feeds: dict, outputs=None) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def instrumented(model, **kwargs):
    before = model.SerializeToString()
    result = instrument(model, GraphView(model), **kwargs)
    assert model.SerializeToString() == before, "the input model was mutated"
    return result


def assert_well_formed(result) -> None:
    """Valid model; the graph outputs are exactly the taps, each named once, in the Tap map."""
    onnx.checker.check_model(result.model, full_check=True)
    outputs = [o.name for o in result.model.graph.output]
    assert outputs == result.output_names
    assert len(set(outputs)) == len(outputs)
    packed = {t for pack in result.packs for t in pack.firsts + pack.seconds}
    for tap in result.taps:
        want = {"s1", "s2"} if tap.strategy in (INPUT_SUMS, BATCH_MOMENTS) else {"m1", "m2"}
        assert set(tap.outputs) == want | ({"shape"} if tap.spatial is None else set())
        assert all(name.startswith("bnscope/") for name in tap.outputs.values())
        assert {tap.outputs[k] for k in want} <= packed  # every statistic sits in a packed output
    names = [n.name for n in result.model.graph.node if n.name.startswith("bnscope/")]
    assert len(names) == len(set(names))


def x_for(rank, c=3, n=5, seed=1, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((n, c) + (4,) * (rank - 2)).astype(dtype)


# -- structure ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize(
    "mode,strategy,ops",
    [("eval", "auto", "ops"), ("eval", INPUT_SUMS, "ops"), ("eval", OUTPUT_POOL, "ops"), ("train", "auto", "ops")]
    + [("train", "auto", "bn")],
)
def test_instrument_outputs_are_only_the_taps(rank, mode, strategy, ops):
    result = instrumented(conv_bn(rank), mode=mode, strategy=strategy, train_ops=ops)
    assert_well_formed(result)
    (tap,) = result.taps
    assert tap.layer == "bn" and tap.channels == 3 and result.mode == mode and not result.skipped
    got = run(result.model, {"x": x_for(rank)})
    assert list(got) == result.output_names
    declared = {o.name: [d.dim_value or None for d in o.type.tensor_type.shape.dim] for o in result.model.graph.output}
    for name, value in got.items():  # the declared shapes hold
        assert value.ndim == len(declared[name])
        assert all(d is None or d == s for d, s in zip(declared[name], value.shape))
    if mode == "train":  # "ops": no BN left; "bn": every BN in training mode
        bns = [n for n in result.model.graph.node if n.op_type == "BatchNormalization"]
        assert len(bns) == (ops == "bn")
        assert all(helper.get_attribute_value(a) == 1 for n in bns for a in n.attribute if a.name == "training_mode")


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_instrument_taps_give_the_moments_of_h(rank):
    model, x = conv_bn(rank), x_for(rank, n=6)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
    h = run(probe, {"x": x}, ["h"])["h"]
    mean, var = moments64(h)
    for strategy in ("auto", INPUT_SUMS, OUTPUT_POOL):
        result = instrumented(model, strategy=strategy)
        (tap,) = result.taps
        got = batch_moments(result, run(result.model, {"x": x}))[tap.layer]
        assert got.count == h.size // h.shape[1]
        np.testing.assert_allclose(got.mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.variance(), var, rtol=1e-5)


# -- which strategy -----------------------------------------------------------------------------
def test_instrument_auto_prefers_output_pool_where_it_is_exact():
    assert instrumented(conv_bn(4)).taps[0].strategy == OUTPUT_POOL
    assert instrumented(conv_bn(3)).taps[0].strategy == OUTPUT_POOL


@pytest.mark.parametrize(
    "case,kwargs",
    [
        ("rank 2", {"rank": 2}),
        ("a zero gamma", {"gamma": np.array([1.0, 0.0, 1.0])}),
        ("large mean: |b| = |beta - mean * a| >> |a| std", {"mean": np.full(3, 1e4), "var": np.ones(3)}),
        ("|beta| >> |gamma|: y far from zero-mean", {"beta": np.full(3, 100.0), "gamma": np.ones(3)}),
    ],
)
def test_instrument_auto_falls_back_to_input_sums(case, kwargs):
    assert instrumented(conv_bn(**kwargs)).taps[0].strategy == INPUT_SUMS, case


def test_instrument_auto_centres_y_on_beta_where_y_is_off_centre():
    # Running statistics = h's own, beta = mean, gain 1: y = h, so b = 0, but y's mean is beta,
    # hundreds of spreads away from zero: the tap reads y - beta.
    x = x_for(4) + np.float32(1e3)
    ones = np.ones(3)  # all four parameters given, so the Conv weights drawn are the same below
    ((mean, var),) = reference_moments(conv_bn(beta=ones, mean=ones, var=ones, gamma=ones), x, names=("h",))
    model = conv_bn(beta=mean, mean=mean, var=var, gamma=np.sqrt(var + EPS))
    result = instrumented(model)
    (tap,) = result.taps
    assert tap.strategy == OUTPUT_POOL and np.all(np.abs(mean) > 100 * np.sqrt(var))
    np.testing.assert_allclose(tap.offset, -mean, rtol=1e-6)  # b - beta
    assert any(n.op_type == "Sub" and n.input[0] == "y" for n in result.model.graph.node)
    got = batch_moments(result, run(result.model, {"x": x}))["bn"]
    np.testing.assert_allclose(got.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(got.variance(), var, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [{"rank": 2}, {"gamma": np.array([1.0, 0.0, 1.0])}])
def test_instrument_forced_output_pool_only_where_it_can_work(kwargs):
    result = instrumented(conv_bn(**kwargs), strategy=OUTPUT_POOL)
    assert result.taps[0].strategy == INPUT_SUMS
    assert_well_formed(result)
    moments = batch_moments(result, run(result.model, {"x": x_for(kwargs.get("rank", 4))}))["bn"]
    assert np.all(np.isfinite(moments.mean)) and np.all(np.isfinite(moments.m2))


def test_instrument_forced_output_pool_is_honoured_where_only_inaccurate():
    result = instrumented(conv_bn(mean=np.full(3, 1e4), var=np.ones(3)), strategy=OUTPUT_POOL)
    assert result.taps[0].strategy == OUTPUT_POOL


@pytest.mark.parametrize("kwargs", [{"mode": "training"}, {"strategy": "pooled"}])
def test_instrument_unknown_mode_or_strategy_is_a_user_error(kwargs):
    with pytest.raises(BnscopeError, match="Hint"):
        instrumented(conv_bn(), **kwargs)


# -- models the runtime or the BN cannot take as they are ---------------------------------------
def test_instrument_training_mode_model_runs_in_eval_mode():
    model = conv_bn(training_mode=True)
    for mode in ("eval", "train"):
        result = instrumented(model, mode=mode)
        assert_well_formed(result)
        bns = [n for n in result.model.graph.node if n.op_type == "BatchNormalization"]
        if mode == "eval":
            (bn,) = bns
            assert len(bn.output) == 1 and not [a for a in bn.attribute if a.name == "training_mode"]
        run(result.model, {"x": x_for(4)})  # onnxruntime cannot run training_mode=1 BN: it is gone


@pytest.mark.parametrize("graph_inputs", [("scale", "B", "mean", "var"), ("mean",), ("B",)])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_instrument_parameters_fed_as_inputs_are_skipped_with_a_reason(graph_inputs, mode):
    result = instrumented(conv_bn(graph_inputs=graph_inputs), mode=mode)
    assert result.taps == [] and "graph inputs" in result.skipped["bn"]
    onnx.checker.check_model(result.model, full_check=True)


def test_instrument_ir3_model_with_initializers_as_inputs_passes_the_checker():
    model = conv_bn(ir_version=3, seed=3)
    onnx.checker.check_model(model, full_check=True)
    for mode, strategy in [("eval", INPUT_SUMS), ("eval", OUTPUT_POOL), ("train", "auto")]:
        result = instrumented(model, mode=mode, strategy=strategy)
        assert result.model.ir_version == 3
        assert_well_formed(result)
        run(result.model, {"x": x_for(4)})


def test_instrument_fp16_model_sums_in_float32():
    model = conv_bn(dtype=np.float16)
    x = x_for(4, dtype=np.float16)
    for mode, strategy in [("eval", INPUT_SUMS), ("eval", OUTPUT_POOL), ("train", "auto")]:
        result = instrumented(model, mode=mode, strategy=strategy)
        assert_well_formed(result)
        got = run(result.model, {"x": x})
        assert all(v.dtype in (np.float32, np.int64) for v in got.values())


# -- train mode by value ------------------------------------------------------------------------
def _train_bn(x: np.ndarray, gamma, beta) -> np.ndarray:
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x = x.astype(np.float64)
    mean, var = x.mean(axis=axes).reshape(shape), x.var(axis=axes).reshape(shape)
    return (x - mean) / np.sqrt(var + EPS) * np.reshape(gamma, shape) + np.reshape(beta, shape)


def unknown_rank_model(c=3, seed=0):
    """x (N, C, 4, 4, 4) -> Reshape(x, shape: a graph input of unknown length) -> h -> BN -> out.

    Shape inference cannot know h's rank, so the taps and train-mode BN must work without it.
    """
    rng = np.random.default_rng(seed)
    params = {
        "scale": rng.uniform(0.5, 1.5, c),
        "B": rng.uniform(-0.5, 0.5, c),
        "mean": rng.uniform(-0.2, 0.2, c),
        "var": rng.uniform(1.0, 2.0, c),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()]
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["h"], name="reshape"),
        helper.make_node("BatchNormalization", ["h", "scale", "B", "mean", "var"], ["out"], name="bn"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 4, 4, 4]),
        helper.make_tensor_value_info("shape", TensorProto.INT64, ["k"]),
    ]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, params


@pytest.mark.parametrize("ops", ["ops", "bn"])
@pytest.mark.parametrize("target", [[0, 0, -1], [0, 0, 4, 16], [0, 0, 4, 4, 4]])
def test_instrument_unknown_rank(target, ops):
    model, params = unknown_rank_model()
    view = GraphView(model)
    assert view.rank_of("h") is None
    x = x_for(5, n=4)
    feeds = {"x": x, "shape": np.array(target, np.int64)}
    h = x.reshape(x.shape[:2] + (-1,))
    want_mean, want_var = moments64(h)
    for mode in ("eval", "train"):
        result = instrumented(model, mode=mode, strategy=OUTPUT_POOL, train_ops=ops)
        assert_well_formed(result)
        (tap,) = result.taps
        assert tap.strategy == (INPUT_SUMS if mode == "eval" else BATCH_MOMENTS)
        result.model.graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, None))
        got = run(result.model, feeds)
        moments = batch_moments(result, got)[tap.layer]
        assert moments.count == h.shape[0] * h.shape[2]
        np.testing.assert_allclose(moments.mean, want_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(moments.variance(), want_var, rtol=1e-5)
        if mode == "train":
            assert got["out"].shape == tuple(x.reshape(x.shape[:2] + tuple(target[2:])).shape)
            expected = _train_bn(h, params["scale"], params["B"]).reshape(got["out"].shape)
            np.testing.assert_allclose(got["out"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ops", ["ops", "bn"])
def test_instrument_train_mode_normalises_with_batch_statistics(ops):
    # x -> Conv -> h -> BN1 -> y -> Relu -> out: y as an extra output must be BN with batch stats.
    model = conv_bn(4, mean=np.full(3, 5.0))
    x = x_for(4, n=7) + 2.0
    result = instrumented(model, mode="train", train_ops=ops)
    result.model.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("h", "y")])
    got = run(result.model, {"x": x})
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_allclose(got["y"], _train_bn(got["h"], inits["scale"], inits["B"]), rtol=1e-4, atol=1e-5)


# -- sample models --------------------------------------------------------------------------------
def test_instrument_sample_models_pass_the_checker():
    paths = sorted(SAMPLES.glob("*.onnx"))
    assert paths, f"no committed sample models in {SAMPLES}"
    for path in paths:
        model = onnx.load(str(path))
        for mode, strategy in [("eval", "auto"), ("eval", INPUT_SUMS), ("train", "auto")]:
            result = instrumented(model, mode=mode, strategy=strategy)
            assert_well_formed(result)
            bns = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
            assert len(result.taps) + len(result.skipped) == bns, path.name


# -- packed outputs, static spatial sizes ---------------------------------------------------------
def two_layer_model(spatial=(6, 5), batch="N", second_batch_reshape=False, seed=3):
    """x -> Conv(3->4) -> h1 -> BN1 -> Relu -> Conv(4->6, 3x3 pad 1) -> h2 -> BN2 -> out, static H, W.
    With ``second_batch_reshape`` h1's activation goes through Reshape([-1, 4, H, W]) first, so
    shape inference cannot prove that BN2's batch dimension equals BN1's."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32) * 0.3, "W2"),
        numpy_helper.from_array(np.array([-1, 4, *spatial], np.int64), "shape"),
    ]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h1"], name="conv1")]
    for i, c in ((1, 4), (2, 6)):
        for k, v in (
            ("g", rng.uniform(0.5, 1.5, c)),
            ("b", rng.uniform(-0.3, 0.3, c)),
            ("m", rng.uniform(-0.2, 0.2, c)),
            ("v", rng.uniform(0.5, 2.0, c)),
        ):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{k}{i}"))
    nodes += [
        helper.make_node("BatchNormalization", ["h1", "g1", "b1", "m1", "v1"], ["y1"], name="bn1"),
        helper.make_node("Relu", ["y1"], ["a1"], name="relu"),
    ]
    src = "a1"
    if second_batch_reshape:
        nodes.append(helper.make_node("Reshape", ["a1", "shape"], ["a1r"], name="reshape"))
        src = "a1r"
    nodes += [
        helper.make_node("Conv", [src, "W2"], ["h2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["h2", "g2", "b2", "m2", "v2"], ["out"], name="bn2"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, *spatial])]
    return _model(nodes, inputs, [batch, 6, *spatial], inits)


def reference_moments(model, x, names=("h1", "h2")) -> list[tuple[np.ndarray, np.ndarray]]:
    """float64 numpy mean and variance of each named tensor, read from an unoptimised run."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names])
    got = run(probe, {"x": x}, list(names))
    return [moments64(got[n]) for n in names]


@pytest.mark.parametrize("strategy", ["auto", INPUT_SUMS, OUTPUT_POOL])
def test_instrument_static_shapes_pack_every_statistic_into_one_output(strategy):
    model, x = two_layer_model(), x_for(4, n=7)[:, :3, :1, :1] + np.zeros((7, 3, 6, 5), np.float32)
    x = x + np.random.default_rng(9).standard_normal(x.shape).astype(np.float32)
    result = instrumented(model, strategy=strategy)
    assert_well_formed(result)
    assert all(t.spatial == 30 and "shape" not in t.outputs for t in result.taps)  # no Shape consumers
    assert len(result.packs) == 1 and result.output_names == [result.packs[0].output, result.packs[0].samples]
    per_sample = [
        n for n in result.model.graph.node if n.op_type == "Concat" and helper.get_node_attr_value(n, "axis") == 1
    ]
    assert len(per_sample) == 1  # one Concat of every layer's per-sample statistics
    sums, shape = run(result.model, {"x": x}).values()
    assert (
        sums.shape == ((3 if strategy == INPUT_SUMS else 2) * (4 + 6),) and shape[0] == 7
    )  # summed over the samples in the graph
    got = batch_moments(result, run(result.model, {"x": x}))
    for tap, (mean, var) in zip(result.taps, reference_moments(model, x)):
        assert got[tap.layer].count == 7 * 30
        np.testing.assert_allclose(got[tap.layer].mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[tap.layer].variance(), var, rtol=1e-5)


def test_instrument_unprovable_batch_dimension_gets_its_own_output():
    model = two_layer_model(second_batch_reshape=True)
    x = np.random.default_rng(4).standard_normal((5, 3, 6, 5)).astype(np.float32)
    result = instrumented(model, strategy=INPUT_SUMS)
    assert_well_formed(result)
    assert len(result.packs) == 2  # Concat would need the batch axes equal: not proven, so apart
    got = batch_moments(result, run(result.model, {"x": x}))
    for tap, (mean, var) in zip(result.taps, reference_moments(model, x)):
        np.testing.assert_allclose(got[tap.layer].mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[tap.layer].variance(), var, rtol=1e-5)


def test_instrument_symbolic_spatial_size_reads_shape_each_batch():
    model = conv_bn(4)  # spatial dims are the symbol "S"
    result = instrumented(model, strategy=OUTPUT_POOL)
    (tap,) = result.taps
    assert tap.spatial is None and "shape" in tap.outputs
    for size in (3, 5):  # two batches of different resolution: counts follow the data
        x = x_for(4, n=2)[:, :, :1, :1] + np.random.default_rng(size).standard_normal((2, 3, size, size)).astype(
            np.float32
        )
        assert batch_moments(result, run(result.model, {"x": x}))["bn"].count == 2 * size * size


def test_instrument_lists_bns_inside_subgraphs_as_skipped():
    model = bn_in_if_branches_model()
    onnx.checker.check_model(model, full_check=True)
    inst = instrument(model, GraphView(model))
    assert [t.layer for t in inst.taps] == ["main_bn"]
    assert set(inst.skipped) == {"then_bn", "else_bn"}
    assert all("subgraph of If 'choose'" in why for why in inst.skipped.values())


def bn_chain(layers=3, c=4, equal_stats=True, opset=17):
    """x (N, C, 3, 3) -> [BN_i -> Tanh] x layers, every BN with running mean 0 / var 1
    (``equal_stats``: the initializers onnxruntime would merge) and its own gamma."""
    nodes, inits, h = [], [], "x"
    for i in range(layers):
        names = [f"g{i}", f"b{i}", f"m{i}", f"v{i}"]
        stats = (np.zeros(c), np.ones(c)) if equal_stats else (np.full(c, 0.1 * i), np.full(c, 1 + i))
        values = (np.full(c, 1.0 + i), np.full(c, 0.1 * i), *stats)
        inits += [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, values)]
        nodes.append(helper.make_node("BatchNormalization", [h, *names], [f"y{i}"], name=f"bn{i}"))
        nodes.append(helper.make_node("Tanh", [f"y{i}"], [f"t{i}"], name=f"tanh{i}"))
        h = f"t{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 3, 3])],
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _train_chain_moments(x: np.ndarray, layers: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """float64 oracle: each BN's input mean and variance when every BN normalises with batch statistics."""
    out, h = [], x.astype(np.float64)
    for i in range(layers):
        out.append(moments64(h))
        h = np.tanh(_train_bn(h, np.full(h.shape[1], 1.0 + i), np.full(h.shape[1], 0.1 * i)))
    return out


@pytest.mark.parametrize("ops", ["ops", "bn"])
@pytest.mark.parametrize("equal_stats", [True, False])
def test_instrument_train_mode_taps_each_layer_of_a_chain(ops, equal_stats):
    # Equal running statistics in every BN: onnxruntime merges the initializers, and training-mode
    # BNs sharing one gave every layer the last layer's statistics (found by planted_stale).
    model = bn_chain(equal_stats=equal_stats)
    result = instrumented(model, mode="train", train_ops=ops)
    rng = np.random.default_rng(5)
    for k in range(3):  # batches in turn: nothing carries over from one run to the next
        x = (rng.standard_normal((6, 4, 3, 3)) * (1 + k) + k).astype(np.float32)
        got = batch_moments(result, run(result.model, {"x": x}))
        for i, (mean, var) in enumerate(_train_chain_moments(x, 3)):
            assert got[f"bn{i}"].count == x.size // x.shape[1]
            np.testing.assert_allclose(got[f"bn{i}"].mean, mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got[f"bn{i}"].variance(), var, rtol=1e-4)
