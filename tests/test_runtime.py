"""Tests for bnscope.runtime and its neighbours: providers, sessions, silent-fallback detection (ort_messages),
timing and comparison (measure)."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from bnscope.errors import BnscopeError
from bnscope.runtime import measure, providers
from bnscope.runtime import messages as ort_messages
from bnscope.runtime import options as rt_options
from bnscope.runtime import sessions as rt

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
GPU_BUILD = [TRT, CUDA, CPU]
CPU_BUILD = ["AzureExecutionProvider", CPU]

# What onnxruntime-gpu writes to fd 2 when libcudnn is missing (Linux, 1.2x), then keeps going on CPU.
CUDA_LOAD_FAILURE = (
    "2025-12-03 18:27:23.637 [E:onnxruntime:Default, provider_bridge_ort.cc:2251 TryGetProviderInfo_CUDA] "
    "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1844 onnxruntime::Provider& "
    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
    "libonnxruntime_providers_cuda.so with error: libcudnn.so.9: cannot open shared object file: "
    "No such file or directory\n\n"
    "\x1b[0;93m2025-12-03 18:27:23.637 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1013 "
    "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* "
    "and CUDA 12.*. Please install all dependencies as mentioned in the GPU requirements page.\x1b[m\n"
)


def _model(nodes, inputs, outputs, initializers=(), opset=13, ir_version=8):
    # onnx 1.23 stamps IR 14 by default, which onnxruntime 1.31 refuses (max 13): pin it.
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def _relu(shape=(1, 4)):
    #   x[shape] -> Relu -> y[shape]
    return _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )


def _add_const(shape=("N", 4)):
    #   x[N,4] --Add(c)--> y[N,4],  c initializer [4] also listed as a graph input (overridable)
    c = helper.make_tensor("c", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    return _model(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape)),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [c],
    )


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "Hint: " in message, message
    return message


REAL_BUILD = tuple(ort.get_available_providers())


@pytest.fixture(scope="session")
def cuda_cannot_load():
    """Skip where CUDA really loads (a GPU machine): the tests that use it need it to fail."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if CUDA in REAL_BUILD:
        session = ort.InferenceSession(_relu().SerializeToString(), options, providers=[CUDA, CPU])
        if CUDA in session.get_providers():
            pytest.skip("CUDA loads on this machine")


@pytest.fixture
def gpu_build(monkeypatch):
    """Pretend onnxruntime lists TensorRT and CUDA; the real C++ build still has only CPU."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU_BUILD))


@pytest.fixture
def cpu_build(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(CPU_BUILD))


# ---------------------------------------------------------------- provider resolution
@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu ", "CPUExecutionProvider", "cpuexecutionprovider"])
def test_resolve_provider_cpu_spellings(name):
    assert providers.resolve_provider(name) == [CPU]


def test_resolve_provider_auto_on_cpu_build(cpu_build):
    assert providers.resolve_provider("auto") == [CPU]


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this build has CUDA")
def test_resolve_provider_auto_on_this_machine():
    assert providers.resolve_provider("auto") == [CPU]


@pytest.mark.parametrize("name", ["cuda", "CUDAExecutionProvider", "trt", "dml", "openvino"])
def test_resolve_provider_unavailable_names_available(cpu_build, name):
    with pytest.raises(BnscopeError) as err:
        providers.resolve_provider(name)
    message = _one_line(err)
    assert "not available in this onnxruntime build" in message
    assert "available: AzureExecutionProvider, CPUExecutionProvider" in message
    assert "CPU only" in message


def test_resolve_provider_cuda_hint_names_gpu_package(cpu_build):
    with pytest.raises(BnscopeError, match=r"pip uninstall -y onnxruntime && pip install onnxruntime-gpu"):
        providers.resolve_provider("cuda")


def test_resolve_provider_unknown_name():
    with pytest.raises(BnscopeError, match="unknown execution provider 'tpu'") as err:
        providers.resolve_provider("tpu")
    _one_line(err)


def test_resolve_provider_gpu_build_order(gpu_build):
    strict_cuda = (CUDA, {"use_tf32": "0"})
    assert providers.resolve_provider("auto") == [TRT, strict_cuda, CPU]
    assert providers.resolve_provider("trt") == [TRT, strict_cuda, CPU]
    assert providers.resolve_provider("TensorRT") == [TRT, strict_cuda, CPU]
    assert providers.resolve_provider("cuda") == [strict_cuda, CPU]
    assert providers.resolve_provider("cuda", tf32=True) == [CUDA, CPU]
    assert providers.resolve_provider("cpu") == [CPU]


def test_resolve_provider_auto_skips_missing_and_non_compute(monkeypatch):
    available = ["AzureExecutionProvider", "OpenVINOExecutionProvider", CPU]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    assert providers.resolve_provider("auto") == ["OpenVINOExecutionProvider", CPU]


def test_resolve_provider_tensorrt_without_cuda(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CPU])
    assert providers.resolve_provider("tensorrt") == [TRT, CPU]


def test_provider_aliases_map_to_known_names():
    # onnxruntime's built-in list changes with the release, so ask this one: ROCm left in 1.23,
    # WebGPU arrived in 1.20, TensorRT RTX became a plugin EP (onnxruntime-ep-nv-tensorrt-rtx) in 1.32.
    not_in_every_release = {"ROCMExecutionProvider", "NvTensorRTRTXExecutionProvider", "WebGpuExecutionProvider"}
    known = set(ort.get_all_providers()) | not_in_every_release
    assert set(providers.PROVIDER_ALIASES.values()) <= known
    assert {CPU, CUDA, TRT} <= set(ort.get_all_providers())
    for alias, name in providers.PROVIDER_ALIASES.items():
        assert alias == alias.lower() and providers.canonical_provider(alias.upper()) == name


# ---------------------------------------------------------------- installation
def test_ort_distribution_here():
    # onnxruntime, onnxruntime-gpu, ...: whichever this environment has, as its build info says.
    name, version = providers.ort_distribution()
    assert version == ort.__version__
    assert (name, version) in providers.list_ort_distributions()
    built = getattr(ort, "package_name", "") or name
    assert providers.normalise_distribution_name(name) == providers.normalise_distribution_name(built)


def test_ort_distribution_several_installed(monkeypatch, caplog):
    monkeypatch.setattr(
        providers, "list_ort_distributions", lambda: [("onnxruntime", "1.31.1"), ("onnxruntime_gpu", "1.31.0")]
    )
    monkeypatch.setattr(ort, "package_name", "onnxruntime-gpu", raising=False)
    with caplog.at_level(logging.WARNING, logger="bnscope.runtime.providers"):
        assert providers.ort_distribution() == ("onnxruntime_gpu", ort.__version__)
    assert "overwrite each other" in caplog.text


def test_resolve_provider_several_installed_hint(monkeypatch, cpu_build):
    monkeypatch.setattr(
        providers, "list_ort_distributions", lambda: [("onnxruntime", "1.31.1"), ("onnxruntime-gpu", "1.31.0")]
    )
    with pytest.raises(BnscopeError, match="pip uninstall -y onnxruntime onnxruntime-gpu"):
        providers.resolve_provider("cuda")


# ---------------------------------------------------------------- sessions
def test_create_session_runs_and_reports():
    session = rt.create_session(_relu())
    x = np.array([[-1.0, 0.0, 2.0, -3.5]], np.float32)
    (y,) = session.run({"x": x})
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    assert session.requested_provider == "cpu"
    assert session.active_providers == [CPU] and session.primary_provider == CPU
    assert not session.fell_back and session.fallback_reason is None
    assert session.inputs == (rt.TensorInfo("x", (1, 4), "tensor(float)"),)
    assert session.output_names == ["y"]


def test_create_session_from_path_and_bytes(tmp_path):
    path = tmp_path / "relu.onnx"
    onnx.save(_relu(), path)
    for source in (path, str(path), path.read_bytes()):
        (y,) = rt.create_session(source).run({"x": np.ones((1, 4), np.float32)})
        np.testing.assert_array_equal(y, np.ones((1, 4), np.float32))


@pytest.mark.parametrize("level", rt_options.OPT_LEVELS)
def test_create_session_every_opt_level(level):
    if not hasattr(ort.GraphOptimizationLevel, rt_options.ORT_OPT_LEVELS[level]):
        pytest.skip(f"{level} not in onnxruntime {ort.__version__}")
    session = rt.create_session(_add_const(), opt_level=level, threads=1)
    assert session.inner.get_session_options().intra_op_num_threads == 1
    (y,) = session.run({"x": np.zeros((2, 4), np.float32)})
    np.testing.assert_array_equal(y, np.tile([1.0, 2.0, 3.0, 4.0], (2, 1)))


def test_session_options_spec_maps_settings():
    options = rt_options.SessionOptionsSpec(opt_level="disable", threads=2).to_ort()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.intra_op_num_threads == 2 and options.log_severity_level == 4
    default = rt_options.SessionOptionsSpec().to_ort()
    assert default.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(RuntimeError):  # onnxruntime's default (spinning) is left alone
        default.get_session_config_entry("session.intra_op.allow_spinning")
    still = rt_options.SessionOptionsSpec(spin=False).to_ort()
    assert still.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("kwargs", [{"opt_level": "max"}, {"threads": 0}, {"threads": -2}, {"threads": True}])
def test_session_options_spec_rejects(kwargs):
    with pytest.raises(BnscopeError) as err:
        rt.create_session(_relu(), **kwargs)
    _one_line(err)


def test_create_session_unknown_provider():
    with pytest.raises(BnscopeError, match="unknown execution provider"):
        rt.create_session(_relu(), "quantum")


# ---------------------------------------------------------------- silent fallback
def test_create_session_dropped_provider_is_an_error(gpu_build, cuda_cannot_load, capfd):
    # A CPU build has no CUDA: onnxruntime warns and builds the session on CPU. A GPU build on a
    # machine without CUDA libraries logs why it could not load the library, and does the same.
    with pytest.raises(BnscopeError) as err:
        rt.create_session(_relu(), "cuda")
    message = _one_line(err)
    assert message.startswith("CUDAExecutionProvider failed to load (CUDA or cuDNN libraries")
    assert "would run on CPUExecutionProvider" in message
    own_reason = "Failed to load library" if CUDA in REAL_BUILD else "not in available provider names"
    assert own_reason in message  # onnxruntime's own words
    assert "preload_dlls" in message
    assert "\x1b" not in capfd.readouterr().err  # not even the colour reset on a line of its own


def test_create_session_dropped_provider_allowed(gpu_build, cuda_cannot_load, caplog):
    with caplog.at_level(logging.WARNING, logger="bnscope.runtime.sessions"):
        session = rt.create_session(_relu(), "CUDA", allow_fallback=True)
    assert session.fell_back and session.active_providers == [CPU]
    assert session.primary_provider == CUDA and session.requested_provider == "CUDA"
    assert "CUDAExecutionProvider" in session.fallback_reason
    assert "failed to load" in caplog.text
    (y,) = session.run({"x": np.ones((1, 4), np.float32)})
    assert y.shape == (1, 4)


def test_create_session_auto_tolerates_a_drop(gpu_build, cuda_cannot_load):
    session = rt.create_session(_relu(), "auto")
    assert session.fell_back and session.primary_provider == TRT and session.active_providers == [CPU]


class _NativeLoggingSession:
    """Stands in for InferenceSession: writes what onnxruntime-gpu writes when libcudnn is
    missing to fd 2 (plus one unrelated line), and builds the real session on CPU."""

    real = ort.InferenceSession

    def __init__(self, source, options, providers=None, **kwargs):
        names = [p if isinstance(p, str) else p[0] for p in providers]
        assert kwargs.get("enable_fallback") == 0  # the wrapper's stdout-printing retry is off
        if names != [CPU]:
            os.write(2, (CUDA_LOAD_FAILURE + "unrelated native line\n").encode())
        self._inner = self.real(source, options, providers=[CPU])

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_create_session_reads_native_log(gpu_build, monkeypatch, capfd):
    monkeypatch.setattr(ort, "InferenceSession", _NativeLoggingSession)
    with pytest.raises(BnscopeError) as err:
        rt.create_session(_relu(), "cuda")
    message = _one_line(err)
    assert "libcudnn.so.9: cannot open shared object file" in message
    assert "Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 12.*" in message
    assert "Please install" not in message
    captured = capfd.readouterr()
    assert "unrelated native line" in captured.err  # passed through
    assert "onnxruntime:Default" not in captured.err  # held back, reported in the error instead
    assert captured.out == ""


class _RaisingProviderSession:
    """Stands in for InferenceSession: a GPU provider that raises, as on Windows with CUDA_PATH."""

    real = ort.InferenceSession

    def __init__(self, source, options, providers=None, **kwargs):
        if [p if isinstance(p, str) else p[0] for p in providers] != [CPU]:
            raise RuntimeError(
                "/onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:1013 "
                "onnxruntime::python::CreateExecutionProviderFactoryInstance "
                "CUDA_PATH is set but CUDA wasn't able to be loaded.\nmore detail"
            )
        self._inner = self.real(source, options, providers=[CPU])

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_create_session_provider_raises(gpu_build, monkeypatch):
    monkeypatch.setattr(ort, "InferenceSession", _RaisingProviderSession)
    with pytest.raises(BnscopeError) as err:
        rt.create_session(_relu(), "cuda")
    message = _one_line(err)
    assert "on CUDAExecutionProvider: CUDA_PATH is set but CUDA wasn't able to be loaded" in message
    assert "more detail" not in message and "pybind_state" not in message
    session = rt.create_session(_relu(), "cuda", allow_fallback=True)
    assert session.fell_back and "CUDA_PATH is set" in session.fallback_reason
    assert session.active_providers == [CPU]


def test_create_session_lenient_still_reports_model_errors(gpu_build, monkeypatch):
    monkeypatch.setattr(ort, "InferenceSession", _RaisingProviderSession)
    with pytest.raises(BnscopeError, match="cannot load the model bytes on CPUExecutionProvider"):
        rt.create_session(b"not a model", "auto")


# ---------------------------------------------------------------- models onnxruntime refuses
def _relu_stamped_ir(version):
    model = _relu()
    model.ir_version = version
    return model


def _bn_model(opset, training_mode=None, outputs=1):
    #   x[1,2,3,3] -> BatchNormalization(scale, bias, mean, var) -> y  (+ running mean/var)
    attrs = {"is_test": 1} if opset < 7 else {}
    if training_mode is not None:
        attrs["training_mode"] = training_mode
    outs = ["y", "rm", "rv"][:outputs]
    params = [helper.make_tensor(n, TensorProto.FLOAT, [2], [1.0, 1.0]) for n in ("s", "b", "m", "v")]
    return _model(
        [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], outs, **attrs)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        params,
        opset=opset,
        ir_version=3 if opset < 7 else 8,
    )


@pytest.mark.parametrize(
    ("model", "says", "hint"),
    [
        (b"not an onnx model", "protobuf parsing failed", "check_model"),
        (_relu().SerializeToString()[:-7], "protobuf parsing failed", "truncated"),
        (
            _model(
                [helper.make_node("NoSuchOp", ["x"], ["y"])],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
            ),
            "No Op registered for NoSuchOp",
            "check_model",
        ),
        (_relu_stamped_ir(99), "Unsupported model IR version: 99", "upgrade onnxruntime"),
        (_bn_model(6), "BatchNormalization(6)", "version_converter"),
        (_bn_model(15, training_mode=1), "Training_mode", "eval mode"),
    ],
    ids=["garbage", "truncated", "unknown-op", "ir-too-new", "bn-opset6", "bn-training"],
)
def test_create_session_refused_model_is_one_line(model, says, hint):
    with pytest.raises(BnscopeError) as err:
        rt.create_session(model)
    message = _one_line(err)
    assert message.startswith("onnxruntime cannot load ")
    assert says in message and hint in message
    assert "[ONNXRuntimeError]" not in message and ".cc:" not in message


def test_create_session_missing_file(tmp_path):
    with pytest.raises(BnscopeError, match="does not exist") as err:
        rt.create_session(tmp_path / "absent.onnx")
    _one_line(err)


def test_create_session_in_memory_external_data():
    model = _add_const()
    init = model.graph.initializer[0]
    init.ClearField("float_data")
    init.data_location = TensorProto.EXTERNAL
    init.external_data.add(key="location", value="weights.bin")
    with pytest.raises(BnscopeError, match="pass the .onnx path") as err:
        rt.create_session(model)
    _one_line(err)


def test_create_session_rejects_other_types():
    with pytest.raises(BnscopeError, match="cannot make a session from a dict"):
        rt.create_session({"model": 1})


# ---------------------------------------------------------------- running
@pytest.fixture(scope="module")
def fixed():
    return rt.create_session(_relu((1, 4)))


@pytest.mark.parametrize(
    ("feeds", "says"),
    [
        (
            {"x": np.ones((2, 4), np.float32)},
            "input 'x' has shape (2, 4) but the model expects [1, 4] (dimension 0 must be 1)",
        ),
        ({"x": np.ones(4, np.float32)}, "input 'x' has shape (4,) (rank 1)"),
        ({"x": np.ones((1, 4))}, "input 'x' is float64 but the model expects float32"),
        ({}, "missing input 'x'"),
        ({"x": np.ones((1, 4), np.float32), "z": 1.0}, "unknown input 'z'"),
    ],
)
def test_session_run_bad_feeds_name_the_input(fixed, feeds, says):
    with pytest.raises(BnscopeError) as err:
        fixed.run(feeds)
    assert says in _one_line(err)


def test_session_run_unknown_output(fixed):
    with pytest.raises(BnscopeError, match="unknown output 'z'"):
        fixed.run({"x": np.ones((1, 4), np.float32)}, ["z"])


def test_session_run_dynamic_dims_and_overridable_initializer():
    session = rt.create_session(_add_const(("N", 4)))
    assert [i.name for i in session.overridable] == ["c"] and session.input_names == ["x"]
    (y,) = session.run({"x": np.zeros((3, 4), np.float32)})
    np.testing.assert_array_equal(y[2], [1.0, 2.0, 3.0, 4.0])
    (y,) = session.run({"x": np.zeros((1, 4), np.float32), "c": np.full(4, 7.0, np.float32)})
    np.testing.assert_array_equal(y, np.full((1, 4), 7.0))


def test_session_run_failure_inside_graph_names_the_input():
    #   x[N] --Reshape([3])--> y[3]: only N == 3 works, and only onnxruntime finds out
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [3])
    session = rt.create_session(
        _model(
            [helper.make_node("Reshape", ["x", "shape"], ["y"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
            [shape],
        )
    )
    with pytest.raises(BnscopeError) as err:
        session.run({"x": np.ones(4, np.float32)})
    message = _one_line(err)
    assert message.startswith("onnxruntime failed while running the model with x: float32[4]")


# ---------------------------------------------------------------- timing
def test_time_session_returns_sane_numbers():
    session = rt.create_session(_add_const())
    stats = measure.time_session(session, {"x": np.ones((3, 4), np.float32)}, warmup=2, runs=7)
    assert (stats.runs, stats.warmup, stats.batch_size) == (7, 2, 3)
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms
    assert stats.min_ms <= stats.mean_ms
    assert stats.throughput_samples_per_s == pytest.approx(3 / (stats.median_ms / 1e3))


def test_time_session_checks_arguments(fixed):
    with pytest.raises(BnscopeError, match="runs >= 1"):
        measure.time_session(fixed, {"x": np.ones((1, 4), np.float32)}, runs=0)
    with pytest.raises(BnscopeError, match="input 'x' is float64"):
        measure.time_session(fixed, {"x": np.ones((1, 4))})


# ---------------------------------------------------------------- comparing outputs
def test_compare_outputs_tolerance_boundary():
    # |a - b| <= atol + rtol * |b| with the second argument as reference; powers of two are exact.
    b = {"y": np.array([1.0, -2.0])}
    on_edge = {"y": np.array([1.75, -3.25])}  # 0.75 = 0.25 + 0.5 * 1;  1.25 = 0.25 + 0.5 * 2
    (diff,) = measure.compare_outputs(on_edge, b, atol=0.25, rtol=0.5)
    assert diff.passed and diff.max_abs == 1.25 and diff.max_rel == 0.75
    over = {"y": np.array([np.nextafter(1.75, 2.0), -2.0])}
    (diff,) = measure.compare_outputs(over, b, atol=0.25, rtol=0.5)
    assert not diff.passed and "1 of 2 element(s) outside tolerance" in diff.reason


def test_compare_outputs_reference_is_second():
    (forward,) = measure.compare_outputs({"y": np.array([0.0])}, {"y": np.array([1.0])}, atol=0.0, rtol=1.0)
    (backward,) = measure.compare_outputs({"y": np.array([1.0])}, {"y": np.array([0.0])}, atol=0.0, rtol=1.0)
    assert forward.passed and not backward.passed and backward.max_rel == np.inf


@pytest.mark.parametrize(
    ("a", "b", "passed"),
    [
        ([np.nan, 1.0], [np.nan, 1.0], True),
        ([np.nan, 1.0], [1.0, np.nan], False),
        ([np.nan, 1.0], [0.0, 1.0], False),
        ([0.0, 1.0], [np.nan, 1.0], False),
        ([np.inf, -np.inf], [np.inf, -np.inf], True),
        ([np.inf, 1.0], [-np.inf, 1.0], False),
        ([np.inf, 1.0], [1e30, 1.0], False),
    ],
)
def test_compare_outputs_nonfinite_rules(a, b, passed):
    (diff,) = measure.compare_outputs({"y": np.array(a, np.float32)}, {"y": np.array(b, np.float32)})
    assert diff.passed is passed
    if passed:
        assert diff.max_abs == 0.0 and diff.reason is None
    else:
        assert diff.max_abs == np.inf and "NaN/inf" in diff.reason


def test_compare_outputs_defaults_and_per_output_tolerances():
    ref = {"f32": np.ones(3, np.float32), "f16": np.ones(3, np.float16), "i": np.arange(3)}
    close = {"f32": ref["f32"] * (1 + 5e-5), "f16": ref["f16"] * np.float16(1.005), "i": np.arange(3)}
    diffs = {d.name: d for d in measure.compare_outputs(close, ref)}
    assert all(d.passed for d in diffs.values())
    assert (diffs["f32"].atol, diffs["f32"].rtol) == (1e-4, 1e-4)
    assert (diffs["f16"].dtype, diffs["i"].atol) == ("float16", 0.0)
    strict = measure.compare_outputs(close, ref, atol={"f32": 0.0}, rtol={"f32": 1e-6})
    assert [d.passed for d in strict] == [False, True, True]
    off_by_one = {**close, "i": np.array([0, 1, 3])}
    assert not {d.name: d for d in measure.compare_outputs(off_by_one, ref)}["i"].passed


def test_compare_outputs_shape_and_names():
    (diff,) = measure.compare_outputs({"y": np.zeros((2, 3))}, {"y": np.zeros((3, 2))})
    assert not diff.passed and diff.shape == (3, 2) and "shape" in diff.reason
    with pytest.raises(BnscopeError, match=r"only in the first \['a'\], only in the reference \['b'\]"):
        measure.compare_outputs({"a": np.zeros(1)}, {"b": np.zeros(1)})
    (empty,) = measure.compare_outputs({"y": np.zeros((0, 4))}, {"y": np.zeros((0, 4))})
    assert empty.passed and empty.max_abs == 0.0


def test_output_diff_to_dict_with_and_without_tolerances():
    (diff,) = measure.compare_outputs({"y": np.array([1.5])}, {"y": np.array([1.0])}, atol=0.25, rtol=0.0)
    assert diff.to_dict() == {
        "name": "y",
        "max_abs": 0.5,
        "max_rel": 0.5,
        "passed": False,
        "atol": 0.25,
        "rtol": 0.0,
        "reason": "1 of 1 element(s) outside tolerance",
    }
    assert diff.to_dict(tolerances=False) == {"name": "y", "max_abs": 0.5, "max_rel": 0.5, "passed": False}


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (np.float64, (1e-9, 1e-7)),
        (np.float32, (1e-4, 1e-4)),
        ("float32", (1e-4, 1e-4)),
        (np.float16, (1e-2, 1e-2)),
        ("bfloat16", (5e-2, 5e-2)),
        ("float8e4m3fn", (0.125, 0.125)),
        (np.int64, (0.0, 0.0)),
        (np.bool_, (0.0, 0.0)),
    ],
)
def test_default_tolerances(dtype, expected):
    assert measure.default_tolerances(dtype) == expected


# ---------------------------------------------------------------- onnxruntime's messages
@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (
            "[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model.cc:256 "
            "onnxruntime::Model::Model(onnx::ModelProto&&, const onnxruntime::PathString&, "
            "const onnxruntime::logging::Logger&, const onnxruntime::ModelOptions&) "
            "Unsupported model IR version: 14, max supported IR version: 13",
            "Unsupported model IR version: 14, max supported IR version: 13",
        ),
        (
            "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: x for the "
            "following indices\n index: 0 Got: 2 Expected: 1\n Please fix either the inputs/outputs or the model.",
            "Got invalid dimensions for input: x for the following indices",
        ),
        (
            "D:\\onnxruntime\\core\\session\\provider_bridge_ort.cc:1636 onnxruntime::ProviderLibrary::Get "
            '[ONNXRuntimeError] : 1 : FAIL : LoadLibrary failed with error 126 "" when trying to load "x.dll"',
            'LoadLibrary failed with error 126 "" when trying to load "x.dll"',
        ),
        (  # onnxruntime 1.19 puts the location after its own prefix
            "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Failed to load model with error: "
            "/onnxruntime_src/onnxruntime/core/graph/model.cc:180 onnxruntime::Model::Model(onnx::ModelProto&&, "
            "const onnxruntime::ModelOptions&) Unsupported model IR version: 99, max supported IR version: 10\n",
            "Failed to load model with error: Unsupported model IR version: 99, max supported IR version: 10",
        ),
        ("\n\x1b[1;31mplain message.\x1b[m\n", "plain message"),
    ],
)
def test_clean_ort_message(raw, clean):
    assert ort_messages.clean_ort_message(raw) == clean


def test_provider_load_errors_keeps_the_reasons_only():
    log = CUDA_LOAD_FAILURE + (
        "2025-01-01 00:00:00.0 [W:onnxruntime:, session_state.cc:1166 VerifyEachNodeIsAssignedToAnEp] "
        "Some nodes were not assigned to the preferred execution providers.\n"
        "2025-01-01 00:00:00.0 [I:onnxruntime:, inference_session.cc:1 Init] Initializing session.\n"
    )
    assert ort_messages.provider_load_errors(log) == (
        "Failed to load library libonnxruntime_providers_cuda.so with error: libcudnn.so.9: cannot open "
        "shared object file: No such file or directory; Failed to create CUDAExecutionProvider. "
        "Require cuDNN 9.* and CUDA 12.*"
    )
    assert ort_messages.provider_load_errors("") == ""
