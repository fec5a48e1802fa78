"""Per-batch reduction inside the graph and NaN/Inf found from the statistics (issue 10).

The instrumented model sums every statistic over the batch's samples, so a batch hands the host
O(C) numbers per layer; the host turns them into the batch's float64 mean and M2. Checked against
numpy float64 over the very tensor the BN reads. The models::

    x (N, C, *S) -> [Conv 1x1, groups C, weight 1, bias 0: h == x exactly] -> h -> BN -> y -> Relu -> out
    x (N, C, *S) ---------------------------------------------------------> BN -> y -> Relu -> out

The second (no Conv before the BN, few values per channel) takes the "flat" taps: per-value sums
over the samples, added up per channel on the host.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import moments64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnscope.errors import BnscopeError
from bnscope.onnxio.external_data import TensorStore, is_external
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.model_io import load_model
from bnscope.stats.accumulate import TapAccumulator
from bnscope.stats.collect import StatsOptions
from bnscope.stats.instrument import instrument
from bnscope.stats.taps import FLAT_MAX_SPATIAL
from bnscope.workflows.stats import collect_stats

EPS = 1e-5


def bn_model(c: int, spatial: tuple[int, ...], mean, var, *, conv: bool, inputs: tuple[str, ...] = ("x",)):
    """The models drawn in the module docstring; with two inputs, BN reads x + z."""
    rng = np.random.default_rng(0)
    gamma = rng.choice([-1.0, 1.0], c) * rng.uniform(0.5, 1.5, c)
    beta = rng.uniform(-1.0, 1.0, c) * np.abs(gamma)
    params = {"scale": gamma, "B": beta, "mean": mean, "var": var}
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), f"bn_{k}") for k, v in params.items()]
    nodes, h = [], inputs[0]
    if len(inputs) == 2:
        nodes.append(helper.make_node("Add", list(inputs), ["xz"], name="add"))
        h = "xz"
    if conv:
        inits.append(numpy_helper.from_array(np.ones((c, 1) + (1,) * len(spatial), np.float32), "W"))
        nodes.append(helper.make_node("Conv", [h, "W"], ["h"], name="conv", group=c))
        h = "h"
    names = [f"bn_{k}" for k in params]
    nodes.append(helper.make_node("BatchNormalization", [h, *names], ["y"], name="bn", epsilon=EPS))
    nodes.append(helper.make_node("Relu", ["y"], ["out"], name="relu"))
    shape = ["N", c, *spatial]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, shape) for i in inputs],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def data(rng, n: int, c: int, spatial, centre: float, spread: float = 1.0) -> np.ndarray:
    channel_centre = centre + spread * rng.standard_normal((1, c) + (1,) * len(spatial))
    return (channel_centre + spread * rng.standard_normal((n, c, *spatial))).astype(np.float32)


def near(x: np.ndarray, rng, jitter: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Running statistics near the data's own, as a trained model's are."""
    mean, var = moments64(x)
    return mean + jitter * np.sqrt(var) * rng.standard_normal(mean.shape), var * np.exp(jitter * rng.standard_normal())


def run(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def errors_in_var_eps_units(mean, var, want_mean, want_var) -> tuple[float, float]:
    """max |dmean| / sqrt(var + eps) and max |dvar| / (var + eps) (the units BN divides by)."""
    scale = want_var + EPS
    return float(np.max(np.abs(mean - want_mean) / np.sqrt(scale))), float(np.max(np.abs(var - want_var) / scale))


# -- the per-batch sums ---------------------------------------------------------------------------
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    conv=st.booleans(),
    spatial=st.sampled_from([(5,), (2, 2), (3, 4), (9, 9), (2, 3, 2)]),
    channels=st.integers(1, 6),
    samples=st.integers(1, 40),
    centre=st.sampled_from([0.0, 5.0, 1e3]),
    strategy=st.sampled_from(["auto", "input_sums", "output_pool"]),
    seed=st.integers(0, 2**16),
)
def test_pack_sums_over_samples_give_the_float64_batch_moments(
    conv, spatial, channels, samples, centre, strategy, seed
):
    rng = np.random.default_rng(seed)
    x = data(rng, samples, channels, spatial, centre)
    model = bn_model(channels, spatial, *near(x, rng), conv=conv)
    result = instrument(model, GraphView(model), strategy=strategy)
    outputs = run(result.model, {"x": x})
    (pack,) = result.packs
    (tap,) = result.taps
    assert bool(pack.shifts) == (tap.strategy == "input_sums")  # shifted by the batch's own values
    assert outputs[pack.output].shape == ((3 if pack.shifts else 2) * tap.columns,)  # whatever the number of samples
    assert outputs[pack.samples][0] == samples
    assert tap.flat == (not conv and int(np.prod(spatial)) <= FLAT_MAX_SPATIAL)
    got = TapAccumulator(result).batch_moments(outputs)["bn"]
    mean, var = moments64(x)
    assert got.count == x.size // channels
    tolerance = 1e-5 if tap.strategy == "input_sums" or centre < 1e3 else 1e-3  # forced output_pool far off 0
    mean_err, var_err = errors_in_var_eps_units(got.mean, got.variance(), mean, var)
    assert mean_err <= tolerance and var_err <= tolerance, (tap.strategy, tap.flat, mean_err, var_err)


@pytest.mark.parametrize("conv", [False, True])
def test_collect_stats_at_mean_over_std_1e4_within_5e_5_in_var_eps_units(tmp_path, conv):
    rng = np.random.default_rng(1)
    x = data(rng, 96, 4, (3, 3), centre=1e4, spread=1.0)
    mean, var = moments64(x)
    assert np.all(np.abs(mean) / np.sqrt(var) > 5e3)
    onnx.save(bn_model(4, (3, 3), *near(x, rng), conv=conv), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "x.npz", x=x)
    for strategy in ("auto", "input_sums"):
        result = collect_stats(
            tmp_path / "m.onnx", tmp_path / "x.npz", options=StatsOptions(batch_size=13, strategy=strategy)
        )
        (layer,) = result.layers
        mean_err, var_err = errors_in_var_eps_units(layer.batch_mean, layer.batch_var, mean, var)
        assert mean_err <= 5e-5 and var_err <= 5e-5, (strategy, mean_err, var_err)


# -- NaN and Inf, found from the statistics -------------------------------------------------------
def _two_input_run(tmp_path, x, z, **options):
    model = bn_model(3, (2, 2), np.zeros(3), np.ones(3) * 2, conv=False, inputs=("x", "z"))
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=x, z=z)
    return collect_stats(tmp_path / "m.onnx", tmp_path / "d.npz", options=StatsOptions(batch_size=4, **options))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_collect_stats_names_the_batch_and_input_of_a_nonfinite_value(tmp_path, bad):
    rng = np.random.default_rng(2)
    x, z = rng.standard_normal((2, 14, 3, 2, 2)).astype(np.float32)
    z[9, 2, 1, 0] = bad  # sample 9: the third batch of 4
    with pytest.raises(BnscopeError, match=r"batch 3 holds NaN/Inf values \(1 in 'z'\).*--allow-nonfinite"):
        _two_input_run(tmp_path, x, z)
    result = _two_input_run(tmp_path, x, z, allow_nonfinite=True)
    assert result.data["nonfinite_values"] == 1
    assert result.layers[0].verdict == "broken"


def test_collect_stats_nonfinite_made_inside_the_model_is_reported_not_blamed_on_the_data(tmp_path):
    # Sqrt of a negative input: the data are finite, the statistics are not.
    rng = np.random.default_rng(3)
    model = bn_model(3, (2, 2), np.zeros(3), np.ones(3), conv=False)
    model.graph.node.insert(0, helper.make_node("Sqrt", ["x"], ["root"], name="sqrt"))
    model.graph.node[1].input[0] = "root"
    x = np.abs(rng.standard_normal((8, 3, 2, 2))).astype(np.float32)
    x[5, 0, 0, 0] = -1.0
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "x.npz", x=x)
    result = collect_stats(tmp_path / "m.onnx", tmp_path / "x.npz", options=StatsOptions(batch_size=4))
    assert result.data["nonfinite_values"] == 0
    assert result.layers[0].verdict == "broken"


def test_graph_view_infers_shapes_without_the_weights_data():
    # x (N, 64, 5, 5) -> Conv(W: 64x64x3x3, 36864 values, pads 1) -> h -> Reshape(shape: 4 values) -> r
    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(rng.standard_normal((64, 64, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array([0, 64, 25, 1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["h", "shape"], ["r"], name="reshape"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 5, 5])
    r = helper.make_tensor_value_info("r", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [r], inits))
    before = model.SerializeToString()
    view = GraphView(model)
    assert view.shape_of("h") == ("N", 64, 5, 5)
    assert view.shape_of("r") == ("N", 64, 25, 1)  # the small shape tensor's values still propagate
    assert view.shape_of("W") == (64, 64, 3, 3) and view.elem_type_of("W") == TensorProto.FLOAT
    assert model.SerializeToString() == before


def test_flat_output_pool_off_centre_y_is_shifted_by_the_batch_itself():
    # No Conv, 2x2 values a channel: flat taps. beta = 20 |gamma|: y's mean is 20 spreads off zero,
    # so the flat tap subtracts the batch's first sample before summing.
    rng = np.random.default_rng(5)
    x = data(rng, 33, 3, (2, 2), centre=2.0)
    model = bn_model(3, (2, 2), *near(x, rng), conv=False)
    inits = {t.name: t for t in model.graph.initializer}
    gamma = numpy_helper.to_array(inits["bn_scale"])
    inits["bn_B"].CopyFrom(numpy_helper.from_array((20 * np.abs(gamma)).astype(np.float32), "bn_B"))
    result = instrument(model, GraphView(model))
    (tap,), (pack,) = result.taps, result.packs
    assert tap.strategy == "output_pool" and tap.flat and pack.shifts
    got = TapAccumulator(result).batch_moments(run(result.model, {"x": x}))["bn"]
    mean_err, var_err = errors_in_var_eps_units(got.mean, got.variance(), *moments64(x))
    assert mean_err <= 1e-5 and var_err <= 1e-5, (mean_err, var_err)
    forced = instrument(model, GraphView(model), strategy="output_pool")  # uncentred: what the shift saves
    got = TapAccumulator(forced).batch_moments(run(forced.model, {"x": x}))["bn"]
    assert not forced.packs[0].shifts and errors_in_var_eps_units(got.mean, got.variance(), *moments64(x))[1] > 1e-5


def test_graph_view_reads_small_external_initializers_for_shape_inference(tmp_path):
    # x (N, 64) -> Reshape(shape: [-1, 4, 4, 4], stored as external data) -> r (N, 4, 4, 4) -> BN -> y
    c = 4
    inits = [numpy_helper.from_array(np.array([-1, c, 4, 4], np.int64), "shape")]
    inits += [numpy_helper.from_array(np.ones(c, np.float32), k) for k in ("scale", "B", "mean", "var")]
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
        helper.make_node("BatchNormalization", ["r", "scale", "B", "mean", "var"], ["y"], name="bn"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 4, 4])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = load_model(path)
    assert is_external(loaded.model.graph.initializer[0])
    view = GraphView(loaded.model, TensorStore(loaded))
    assert view.shape_of("r")[1:] == (c, 4, 4)  # the shape tensor's values propagate from the data file


@pytest.mark.parametrize("spike", [1e2, 1e4])
def test_input_sums_shift_survives_an_outlier_as_the_batch_first_value(spike):
    # One saturated pixel at the batch's first position: a shift by that one value made float32
    # sums of d^2 lose 2e-3 of the variance; the first sample's mean keeps it within 5e-5.
    rng = np.random.default_rng(5)
    x = data(rng, 32, 3, (16, 16), 5.0)
    x[0, :, 0, 0] += spike
    model = bn_model(3, (16, 16), *near(x, rng), conv=True)
    result = instrument(model, GraphView(model), strategy="input_sums")
    assert not result.taps[0].flat
    got = TapAccumulator(result).batch_moments(run(result.model, {"x": x}))["bn"]
    mean_err, var_err = errors_in_var_eps_units(got.mean, got.variance(), *moments64(x))
    assert mean_err <= 5e-5 and var_err <= 5e-5, (mean_err, var_err)


@pytest.mark.parametrize("conv, spatial", [(True, (16, 16)), (False, (16, 16)), (False, (2, 2))])
def test_collect_stats_auto_is_exact_on_data_far_from_the_running_statistics(tmp_path, conv, spatial):
    # Running statistics never updated (mean 0, var 1), data 300 spreads away: auto's output_pool
    # tap of y = BN(x) lost 1e-3 of var + eps to float32 E[y^2] - E[y]^2; such layers are collected
    # again with input_sums. Data near the statistics keep output_pool.
    rng = np.random.default_rng(7)
    x = data(rng, 32, 3, spatial, 300.0)
    onnx.save(bn_model(3, spatial, np.zeros(3), np.ones(3), conv=conv), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "x.npz", x=x)
    result = collect_stats(tmp_path / "m.onnx", tmp_path / "x.npz", options=StatsOptions(batch_size=8))
    (layer,) = result.layers
    assert layer.strategy == "input_sums" and result.data["batches"] == 4
    mean_err, var_err = errors_in_var_eps_units(layer.batch_mean, layer.batch_var, *moments64(x))
    assert mean_err <= 5e-5 and var_err <= 5e-5, (mean_err, var_err)
    x = data(rng, 32, 3, spatial, 2.0)
    np.savez(tmp_path / "x.npz", x=x)
    onnx.save(bn_model(3, spatial, *near(x, rng), conv=conv), str(tmp_path / "near.onnx"))
    near_result = collect_stats(tmp_path / "near.onnx", tmp_path / "x.npz", options=StatsOptions(batch_size=8))
    assert near_result.layers[0].strategy == "output_pool"
