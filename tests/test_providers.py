"""Tests for execution providers as onnxruntime has them today: ``--provider NAME[:DEVICE]`` (selection),
plugin EP libraries (plugins), node placement (placement), the provider probe and ``bnscope providers``.

Where the installed build can show the real behaviour (the CPU EP's placement, a plugin library that
fails to register, a GPU build without CUDA libraries), the tests use it and ask the build what it has;
plugin EPs with devices and GPU placement do not exist on a CPU machine and are played by fakes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
from helpers import cli
from onnx import TensorProto, helper

from bnscope.errors import BnscopeError
from bnscope.runtime import messages, placement, plugins, probe, selection
from bnscope.runtime import sessions as rt
from bnscope.runtime.plugins import EpDevice

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
REAL_BUILD = tuple(ort.get_available_providers())
needs_placement = pytest.mark.skipif(not placement.placement_supported(), reason="onnxruntime < 1.31")
needs_plugin_api = pytest.mark.skipif(not plugins.plugin_api_available(), reason="onnxruntime < 1.22")


def _conv_relu():
    #   x[1,2,4,4] -> Conv(w[2,2,1,1]) "conv" -> Shape "shape" (bookkeeping) ; Conv -> Relu "relu" -> y
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2, 1, 1], [1.0, 0.5, -0.5, 1.0])
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
            helper.make_node("Shape", ["c"], ["s"], name="shape"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4]),
            helper.make_tensor_value_info("s", TensorProto.INT64, [4]),
        ],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _device(ep, kind, index, handle=None):
    return EpDevice(ep, "Vendor", kind, "Vendor", 0x1000 + index, index, handle)


@pytest.fixture
def fresh_plugins(monkeypatch):
    """An empty registry of plugin libraries (registration is process-wide)."""
    monkeypatch.setattr(plugins, "_registered", {})


@pytest.fixture
def fake_plugin(monkeypatch):
    """A registered plugin EP "FakeEP" with a CPU and a GPU device; nothing is loaded."""
    library = plugins.PluginLibrary("fake", "/opt/fake/libfake.so", "--ep-library", ("FakeEP",))
    monkeypatch.setattr(plugins, "_registered", {"fake": library})
    monkeypatch.setattr(selection, "register_plugins", lambda *a, **k: [library])
    devices = [_device("FakeEP", "CPU", 0, "cpu-handle"), _device("FakeEP", "GPU", 1, "gpu-handle")]
    monkeypatch.setattr(selection, "list_ep_devices", lambda: devices)
    return devices


@pytest.fixture
def gpu_build(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])


# ---------------------------------------------------------------- --provider NAME[:DEVICE]
@pytest.mark.parametrize(
    ("text", "split"),
    [("cuda", ("cuda", None)), ("cuda:1", ("cuda", "1")), (" openvino:gpu ", ("openvino", "gpu"))],
)
def test_split_device(text, split):
    assert selection.split_device(text) == split


@pytest.mark.parametrize("text", ["cuda:", ":1"])
def test_split_device_rejects(text):
    with pytest.raises(BnscopeError, match="NAME\\[:DEVICE\\]"):
        selection.split_device(text)


def test_choose_provider_builtin_devices(gpu_build):
    strict = {"use_tf32": "0"}
    assert selection.choose_provider("cuda:1").providers == [(CUDA, {**strict, "device_id": "1"}), CPU]
    assert selection.choose_provider("trt:2").providers == [
        (TRT, {"device_id": "2"}),
        (CUDA, {**strict, "device_id": "2"}),
        CPU,
    ]
    assert selection.choose_provider("cpu:0").providers == [CPU]
    choice = selection.choose_provider("cuda")
    assert choice.primary == CUDA and not choice.plugin and choice.providers == [(CUDA, strict), CPU]


def test_choose_provider_builtin_openvino_device_type(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["OpenVINOExecutionProvider", CPU])
    assert selection.choose_provider("openvino:gpu").providers == [
        ("OpenVINOExecutionProvider", {"device_type": "GPU"}),
        CPU,
    ]


@pytest.mark.parametrize(
    ("text", "says"),
    [("cuda:x", "device number"), ("auto:1", "auto takes no device"), ("cpu:3", "cannot choose a device")],
)
def test_choose_provider_bad_device(gpu_build, text, says):
    with pytest.raises(BnscopeError, match=says):
        selection.choose_provider(text)


def test_choose_provider_unavailable_is_the_builtin_error(fresh_plugins, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", CPU])
    monkeypatch.setattr(plugins, "installed_plugin_libraries", lambda: [])
    with pytest.raises(BnscopeError, match="OpenVINOExecutionProvider is not available .* onnxruntime-ep-openvino"):
        selection.choose_provider("openvino")
    with pytest.raises(BnscopeError, match="unknown execution provider 'tpu'"):
        selection.choose_provider("tpu")


@pytest.mark.parametrize(
    ("text", "index"), [("FakeEP", 1), ("fake", 1), ("fakeep:0", 0), ("FakeEP:1", 1), ("fake:gpu", 1), ("fake:CPU", 0)]
)
def test_choose_provider_plugin_by_name_index_or_type(fake_plugin, text, index):
    choice = selection.choose_provider(text)
    assert choice.plugin and choice.primary == "FakeEP" and choice.providers == ["FakeEP", CPU]
    assert choice.devices == (fake_plugin[index],)  # without a device: the GPU before the CPU
    assert [c.providers for c in choice.fallbacks()] == [["FakeEP", CPU], [CPU]]


def test_choose_provider_plugin_onnxruntime_registered_itself(fake_plugin, monkeypatch):
    # onnxruntime-gpu >= 1.32 registers its bundled CUDA plugin EP: devices, and no library of ours.
    monkeypatch.setattr(plugins, "_registered", {})
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    gpu = _device(CUDA, "GPU", 0, "cuda-handle")
    monkeypatch.setattr(selection, "list_ep_devices", lambda: [_device(CPU, "CPU", 0), gpu])
    choice = selection.choose_provider("cuda:0")
    assert choice.plugin and choice.primary == CUDA and choice.devices == (gpu,)


def test_choose_provider_plugin_device_missing(fake_plugin, monkeypatch):
    with pytest.raises(BnscopeError, match=r"has no device 'npu' \(devices: 0 \(CPU, Vendor\), 1 \(GPU, Vendor\)\)"):
        selection.choose_provider("fake:npu")
    monkeypatch.setattr(selection, "list_ep_devices", lambda: [])
    with pytest.raises(BnscopeError, match="registered but offers no device on this machine"):
        selection.choose_provider("fake")


class _FakeOptions:
    """Wraps real SessionOptions and records what the device API was handed."""

    def __init__(self, real):
        self.real, self.devices = real, None

    def add_provider_for_devices(self, devices, options):
        self.devices = (devices, options)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __setattr__(self, name, value):
        if name in ("real", "devices"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.real, name, value)


class _Subgraph:
    def __init__(self, ep, nodes):
        self.ep_name, self._nodes = ep, [types.SimpleNamespace(name=n, op_type=o, domain="") for n, o in nodes]

    def get_nodes(self):
        return self._nodes


def _fake_session_class(reported, subgraphs, seen):
    """An InferenceSession that runs on the real CPU EP but reports ``reported`` providers and placement."""

    real_session = ort.InferenceSession

    class FakeSession:
        def __init__(self, source, options, enable_fallback=1, **kwargs):
            seen.update(options=options, kwargs=kwargs)
            real = options.real if isinstance(options, _FakeOptions) else options
            self._inner = real_session(source, real, providers=[CPU])

        def get_providers(self):
            return list(reported)

        def get_provider_graph_assignment_info(self):
            return subgraphs

        def __getattr__(self, name):
            return getattr(self._inner, name)

    return FakeSession


def test_create_session_plugin_goes_through_the_device_api(fake_plugin, monkeypatch):
    seen = {}
    spec_to_ort = rt.SessionOptionsSpec.to_ort
    monkeypatch.setattr(rt.SessionOptionsSpec, "to_ort", lambda self: _FakeOptions(spec_to_ort(self)))
    nodes = [_Subgraph("FakeEP", [("conv", "Conv"), ("relu", "Relu")]), _Subgraph(CPU, [("shape", "Shape")])]
    monkeypatch.setattr(ort, "InferenceSession", _fake_session_class(["FakeEP", CPU], nodes, seen))
    session = rt.create_session(_conv_relu(), "fake:gpu")
    assert seen["options"].devices == (["gpu-handle"], {})
    assert "providers" not in seen["kwargs"]  # they would override the devices
    assert session.primary_provider == "FakeEP" and not session.fell_back
    assert session.placement.counts == {"FakeEP": 2, CPU: 1} and session.placement.cpu_nodes == ()


# ---------------------------------------------------------------- placement
@needs_placement
def test_create_session_records_real_placement_on_cpu():
    session = rt.create_session(_conv_relu(), "cpu", opt_level="disable")
    assert session.placement.checked
    assert session.placement.counts == {CPU: 3}  # every node, on the CPU EP that was asked for
    assert session.placement.cpu_nodes == ()


def test_read_placement_flags_compute_nodes_only():
    subgraphs = [
        _Subgraph(CUDA, [("relu", "Relu")]),
        _Subgraph(CPU, [("conv", "Conv"), ("shape", "Shape"), ("gather", "Gather"), ("bn", "BatchNormalization")]),
    ]
    session = types.SimpleNamespace(get_provider_graph_assignment_info=lambda: subgraphs)
    if not placement.placement_supported():
        assert not placement.read_placement(session, CUDA).checked
        return
    found = placement.read_placement(session, CUDA)
    assert found.counts == {CUDA: 1, CPU: 4}
    assert [(n.name, n.op_type) for n in found.cpu_nodes] == [("conv", "Conv"), ("bn", "BatchNormalization")]
    assert (
        found.describe_cpu_nodes() == "2 compute node(s) (BatchNormalization, Conv) on CPUExecutionProvider: conv, bn"
    )
    assert placement.read_placement(session, CPU).cpu_nodes == ()  # CPU asked for: nothing fell back


def test_describe_cpu_nodes_shows_a_few_names():
    nodes = tuple(placement.PlacedNode(f"conv{i}", "Conv", CPU) for i in range(8))
    text = placement.Placement(True, {CPU: 8}, nodes).describe_cpu_nodes()
    assert text == "8 compute node(s) (Conv x8) on CPUExecutionProvider: conv0, conv1, conv2, conv3, conv4 and 3 more"


def test_read_placement_without_the_api(monkeypatch):
    monkeypatch.setattr(placement, "placement_supported", lambda: False)
    found = placement.read_placement(object(), CUDA)
    assert not found.checked and found.note.startswith(f"not checked: onnxruntime {ort.__version__}")


def _partial_fallback_session(monkeypatch):
    subgraphs = [_Subgraph(CUDA, [("relu", "Relu")]), _Subgraph(CPU, [("conv", "Conv"), ("shape", "Shape")])]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", _fake_session_class([CUDA, CPU], subgraphs, {}))


def test_create_session_partial_fallback_is_an_error(monkeypatch):
    _partial_fallback_session(monkeypatch)
    with pytest.raises(BnscopeError) as err:
        rt.create_session(_conv_relu(), "cuda")
    message = str(err.value)
    assert message.startswith("partial fallback: CUDAExecutionProvider left 1 compute node(s) (Conv)")
    assert ": conv." in message and "shape" not in message and "--allow-fallback" in message
    assert "\n" not in message


def test_create_session_partial_fallback_allowed(monkeypatch, caplog):
    _partial_fallback_session(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="bnscope.runtime.sessions"):
        session = rt.create_session(_conv_relu(), "cuda", allow_fallback=True)
    assert [n.name for n in session.placement.cpu_nodes] == ["conv"]
    assert "partial fallback" in caplog.text
    (y, _) = session.run({"x": np.ones((1, 2, 4, 4), np.float32)})
    assert y.shape == (1, 2, 4, 4)


# ---------------------------------------------------------------- plugin libraries
def test_parse_ep_libraries():
    parsed = plugins.parse_ep_libraries(["a=/x/liba.so", " b = rel/libb.so "])
    assert parsed == {"a": "/x/liba.so", "b": os.path.join(os.getcwd(), "rel", "libb.so")}
    for bad in ("a", "=/x.so", "a="):
        with pytest.raises(BnscopeError, match="is not NAME=PATH"):
            plugins.parse_ep_libraries([bad])


@needs_plugin_api
def test_cli_relative_ep_library_is_relative_to_the_working_directory(fresh_plugins, tmp_path, monkeypatch):
    # onnxruntime resolves a relative library path beside its own files (onnxruntime/capi/), not here
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "m.onnx"
    model.write_bytes(_conv_relu().SerializeToString())
    args = ["run", str(model), "--random", "-p", "mine", "--ep-library", "mine=./libmine.so"]
    result = cli(*args)
    assert result.exit_code == 2
    assert f"Failed to load library {tmp_path / 'libmine.so'} " in result.stderr
    assert "capi" not in result.stderr


def test_config_ep_libraries(tmp_path):
    pyproject, bnscope_toml = tmp_path / "pyproject.toml", tmp_path / "bnscope.toml"
    pyproject.write_text("[project]\nname = 'x'\n")
    assert plugins.config_ep_libraries(pyproject) == {}
    pyproject.write_text('[tool.bnscope]\nep_libraries = { mine = "plugins/libmine.so" }\n')
    assert plugins.config_ep_libraries(pyproject) == {"mine": str(tmp_path / "plugins/libmine.so")}
    bnscope_toml.write_text('ep_libraries = { other = "/abs/libother.so" }\n')
    assert plugins.config_ep_libraries(bnscope_toml) == {"other": "/abs/libother.so"}
    bnscope_toml.write_text('ep_libraries = "libother.so"\n')
    with pytest.raises(BnscopeError, match="ep_libraries must be a table"):
        plugins.config_ep_libraries(bnscope_toml)
    bnscope_toml.write_text("[tool]\nbnscope = 5\n")
    with pytest.raises(BnscopeError, match=r"\[tool\] bnscope = 5 must be a table"):
        plugins.config_ep_libraries(bnscope_toml)
    bnscope_toml.write_text("a = " + "[" * 100_000)
    with pytest.raises(BnscopeError, match="not valid TOML"):
        plugins.config_ep_libraries(bnscope_toml)


@pytest.mark.parametrize("text", ["[tool]\nbnscope = 5\n", "tool = 5\n"])
def test_cli_run_with_a_pyproject_whose_bnscope_is_no_table(fresh_plugins, tmp_path, monkeypatch, text):
    # a plugin EP name read ep_libraries from ./pyproject.toml (an AttributeError, exit 3); now nothing
    # in the working directory is read when choosing a provider
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(text)
    model = tmp_path / "m.onnx"
    model.write_bytes(_conv_relu().SerializeToString())
    result = cli("run", str(model), "--random", "-p", "mine")
    assert result.exit_code == 2 and "internal error" not in result.stderr
    assert "pyproject.toml" not in result.stderr


def test_check_config_accepts_ep_libraries(tmp_path):
    from bnscope.workflows.check.config import load_config

    (tmp_path / "bnscope.toml").write_text('batch_size = 7\nep_libraries = { mine = "/abs/libmine.so" }\n')
    assert load_config(cwd=tmp_path).batch_size == 7


def test_installed_plugin_libraries_follow_the_package_convention(monkeypatch):
    module = types.ModuleType("onnxruntime_ep_fake")
    module.get_library_path = lambda: "/site/onnxruntime_ep_fake/libfake.so"
    module.get_ep_names = lambda: ["FakeEP"]
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_fake", module)
    dists = [
        types.SimpleNamespace(metadata={"Name": "onnxruntime_ep_fake"}, version="0.1"),
        types.SimpleNamespace(metadata={"Name": "onnxruntime-ep-broken"}, version="2.0"),
        types.SimpleNamespace(metadata={"Name": "numpy"}, version="2.0"),
    ]
    monkeypatch.setattr(plugins.importlib.metadata, "distributions", lambda: dists)
    found = {lib.name: lib for lib in plugins.installed_plugin_libraries()}
    assert set(found) == {"onnxruntime-ep-fake", "onnxruntime-ep-broken"}
    fake = found["onnxruntime-ep-fake"]
    assert (fake.path, fake.ep_names, fake.source, fake.error) == (
        "/site/onnxruntime_ep_fake/libfake.so",
        ("FakeEP",),
        "package onnxruntime-ep-fake 0.1",
        None,
    )
    assert found["onnxruntime-ep-broken"].error.startswith("ModuleNotFoundError")


@needs_plugin_api
def test_register_plugins_reports_a_library_onnxruntime_cannot_load(fresh_plugins, tmp_path, caplog):
    missing = tmp_path / "libnothing.so"
    with caplog.at_level(logging.INFO, logger="bnscope.runtime.plugins"):
        libraries = plugins.register_plugins({"nothing": str(missing)})
    (ours,) = [lib for lib in libraries if lib.name == "nothing"]
    assert ours.source == "--ep-library" and "cannot open shared object file" in ours.error  # onnxruntime's words
    assert "not registered" in caplog.text
    assert plugins.register_plugins({"nothing": str(missing)})[-1] is ours  # once per name
    assert "nothing" not in {lib.name for lib in plugins.plugin_ep_names().values()}


@needs_plugin_api
def test_installed_openvino_plugin_registers(fresh_plugins, tmp_path):
    pytest.importorskip("onnxruntime_ep_openvino")
    libraries = {lib.name: lib for lib in plugins.register_plugins()}
    openvino = libraries["onnxruntime-ep-openvino"]
    assert openvino.error is None and openvino.ep_names == ("OpenVINOExecutionProvider",)
    assert plugins.plugin_ep_names()["OpenVINOExecutionProvider"] is openvino
    devices = [d for d in plugins.list_ep_devices() if d.ep_name == "OpenVINOExecutionProvider"]
    if not devices:  # an AMD CPU: registered, no device
        with pytest.raises(BnscopeError, match="offers no device"):
            selection.choose_provider("openvino")


@needs_plugin_api
def test_list_ep_devices_has_the_cpu():
    cpu = [d for d in plugins.list_ep_devices() if d.ep_name == CPU]
    assert cpu and cpu[0].type == "CPU" and cpu[0].index == 0
    assert set(cpu[0].to_dict()) == {"ep_name", "ep_vendor", "type", "vendor", "device_id", "index"}


# ---------------------------------------------------------------- messages
def test_native_log_capture_drops_the_colour_reset_line(capfd):
    with messages.capture_native_stderr() as log:
        os.write(2, b"\x1b[1;31m2026 [E:onnxruntime:Default, x.cc:1 f] failed\n\x1b[m\nsomeone else\n")
    assert "failed" in "".join(log)
    assert capfd.readouterr().err == "someone else\n"


def test_missing_libraries_from_the_load_error():
    reason = (
        "Failed to load library /site/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: "
        "libcublasLt.so.13: cannot open shared object file: No such file or directory"
    )
    assert messages.missing_libraries(reason) == ["libcublasLt.so.13"]
    assert "not found: libcublasLt.so.13" in messages.fallback_message(CUDA, [CPU], reason)
    assert messages.missing_libraries("CUDA_PATH is set but CUDA wasn't able to be loaded") == []


# ---------------------------------------------------------------- probe and `bnscope providers`
def test_probe_providers_tries_every_provider_of_this_build(tmp_path):
    result = probe.probe_providers()
    by_name = {p.name: p for p in result.providers}
    assert set(REAL_BUILD) <= set(by_name)
    assert by_name[CPU].usable and by_name[CPU].kind == "builtin" and by_name[CPU].reason is None
    for report in result.providers:
        assert report.usable == (report.reason is None)
    assert result.version == ort.__version__
    assert (result.package, result.version) in result.distributions


def test_probe_providers_cuda_that_cannot_load_says_why(tmp_path):
    if CUDA not in REAL_BUILD:
        pytest.skip("this onnxruntime build has no CUDA")
    cuda = next(p for p in probe.probe_providers().providers if p.name == CUDA)
    if cuda.usable:
        pytest.skip("CUDA loads on this machine")
    assert "Failed to load library" in cuda.reason or "Failed to create" in cuda.reason
    assert "onnxruntime-gpu[cuda,cudnn]" in cuda.fix


def test_probe_providers_plugin_without_device(fake_plugin, monkeypatch, tmp_path):
    monkeypatch.setattr(probe, "register_plugins", lambda *a, **k: [plugins._registered["fake"]])
    monkeypatch.setattr(selection, "list_ep_devices", lambda: [])
    monkeypatch.setattr(probe, "list_ep_devices", lambda: [])
    fake = next(p for p in probe.probe_providers().providers if p.name == "FakeEP")
    assert (fake.kind, fake.library, fake.usable) == ("plugin", "/opt/fake/libfake.so", False)
    assert "offers no device" in fake.reason


def test_cli_providers_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("providers", "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {"schema_version", "onnxruntime", "providers", "plugin_libraries"}
    assert doc["onnxruntime"]["version"] == ort.__version__
    cpu = next(p for p in doc["providers"] if p["name"] == CPU)
    assert {"name", "kind", "library", "devices", "usable", "reason"} <= set(cpu) and cpu["usable"] is True


def test_cli_providers_table_and_bad_library(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("providers")
    assert result.exit_code == 0 and CPU in result.stdout and "onnxruntime: " in result.stdout
    bad = cli("providers", "--ep-library", "nopath")
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "NAME=PATH" in bad.stderr


def test_emit_providers_table_says_what_to_do():
    import io

    from rich.console import Console

    from bnscope import report

    result = probe.ProvidersResult(
        "onnxruntime-gpu",
        "1.31.1",
        (("onnxruntime-gpu", "1.31.1"),),
        (CUDA, CPU),
        (
            probe.ProviderReport(CUDA, "builtin", None, (), False, "CUDAExecutionProvider failed to load", "pip it"),
            probe.ProviderReport(CPU, "builtin", None, (_device(CPU, "CPU", 0),), True),
        ),
        (
            plugins.PluginLibrary("ov", "/x/libov.so", "--ep-library"),
            plugins.PluginLibrary("bad", "/x/libbad.so", "config", error="cannot open shared object file"),
        ),
    )
    out = io.StringIO()
    report.emit(result, "table", Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "onnxruntime: onnxruntime-gpu 1.31.1 (installed: onnxruntime-gpu 1.31.1)" in text
    assert "CUDAExecutionProvider: fix: pip it" in text and "0: CPU Vendor" in text
    assert "plugin library ov (--ep-library) registered, but it offers no device here" in text
    assert "plugin library bad (config) not registered: cannot open shared object file" in text
    out = io.StringIO()
    report.emit(result, "json", Console(file=out, width=200))
    doc = json.loads(out.getvalue())
    assert [p["usable"] for p in doc["providers"]] == [False, True]
    assert doc["plugin_libraries"][1]["error"] == "cannot open shared object file"


@needs_plugin_api
def test_cli_run_with_a_plugin_library_that_fails_is_one_line(fresh_plugins, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "m.onnx"
    model.write_bytes(_conv_relu().SerializeToString())
    args = ["run", str(model), "--random", "-p", "mine", "--ep-library", f"mine={tmp_path / 'libmine.so'}"]
    result = cli(*args)
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --ep-library mine={tmp_path / 'libmine.so'} was not registered: Failed to load")
    assert "cannot open shared object file" in line


@needs_plugin_api
def test_cli_ep_library_that_fails_is_an_input_error_for_any_provider(fresh_plugins, tmp_path):
    # a library given on the command line that does not load was ignored (exit 0) unless -p named its EP
    model = tmp_path / "m.onnx"
    model.write_bytes(_conv_relu().SerializeToString())
    args = ["run", str(model), "--random", "--runs", "1", "-p", "cpu", "--ep-library", f"mine={tmp_path / 'lib.so'}"]
    result = cli(*args)
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --ep-library mine=") and "cannot open shared object file" in line


@pytest.mark.slow
@needs_plugin_api
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("command", [["providers"], ["run", "{model}", "--random", "--runs", "1"]])
def test_cli_ep_library_that_is_a_fifo_is_refused_not_opened(tmp_path, command):
    """Loading a FIFO as a shared library blocked forever (issue 13)."""
    model = tmp_path / "m.onnx"
    model.write_bytes(_conv_relu().SerializeToString())
    os.mkfifo(tmp_path / "lib.so")
    args = [a.format(model=model) for a in command] + ["--ep-library", f"mine={tmp_path / 'lib.so'}"]
    result = subprocess.run(
        [sys.executable, "-m", "bnscope", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert "not a regular file" in " ".join((result.stdout + result.stderr).split())
    assert result.returncode == (0 if command == ["providers"] else 2), result.stderr


def test_check_placement_unchecked_is_said_once(monkeypatch, caplog):
    monkeypatch.setattr(rt, "_said_unchecked", [])
    unchecked = placement.Placement(False, {}, note="not checked: onnxruntime 1.19.0 does not report it (1.31+)")
    with caplog.at_level(logging.WARNING, logger="bnscope.runtime.sessions"):
        rt.check_placement(unchecked, CPU, lenient=False)  # CPU asked for: nothing to say
        rt.check_placement(unchecked, CUDA, lenient=False)
        rt.check_placement(unchecked, CUDA, lenient=False)
    assert caplog.text.count("node placement on CUDAExecutionProvider not checked") == 1


def test_cli_provider_that_cannot_load_is_one_clean_line(tmp_path, monkeypatch, capfd):
    # onnxruntime-gpu without CUDA libraries: the real native log (colour reset included) stays hidden.
    # A CPU build: pretend it lists CUDA, and onnxruntime's own warning is the reason.
    if CUDA not in REAL_BUILD:
        monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    model = tmp_path / "m.onnx"
    model.write_bytes(_conv_relu().SerializeToString())
    result = cli("run", str(model), "--random", "-p", "cuda")
    if result.exit_code == 0:
        pytest.skip("CUDA loads on this machine")
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: CUDAExecutionProvider failed to load") and "\x1b" not in line
    native = capfd.readouterr().err
    assert "\x1b" not in native and "onnxruntime" not in native


# ---------------------------------------------------------------- --provider on commands that may not run a session
def test_cli_check_unknown_provider_is_an_input_error_without_data(tmp_path):
    # check without --data creates no session: the provider is still checked (it passed, exit 0)
    model = tmp_path / "m.onnx"
    model.write_bytes(_conv_relu().SerializeToString())
    result = cli("check", str(model), "-p", "tpu")
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: unknown execution provider 'tpu'")


@needs_plugin_api
def test_cli_check_registers_the_ep_libraries_of_its_config_file(fresh_plugins, tmp_path, monkeypatch):
    # ep_libraries in `check --config FILE` (not in the working directory) were accepted and ignored
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "m.onnx"
    model.write_bytes(_conv_relu().SerializeToString())
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "gate.toml").write_text('ep_libraries = { mine = "libmine.so" }\n')
    args = ["check", str(model), "--config", "ci/gate.toml", "-p", "mine"]
    result = cli(*args)
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "plugin EP libraries not registered: mine (config)" in line
    assert str(tmp_path / "ci" / "libmine.so") in line


def test_distinct_providers_keeps_what_asks_for_something_else(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", CPU])
    names = ["auto", "cpu:0", "CPUExecutionProvider", " Cpu ", "azure"]
    assert selection.distinct_providers(names, first="cpu") == ("cpu", "azure")
    with pytest.raises(BnscopeError, match="unknown execution provider 'tpu'"):
        selection.distinct_providers(["tpu"], first="cpu")


def test_cli_fold_verifies_on_cpu_once(tmp_path, monkeypatch):
    # auto on a CPU-only build, cpu:0 and the full name all ask for the CPU: one verification, not four
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", CPU])
    model = tmp_path / "m.onnx"
    model.write_bytes(_conv_relu().SerializeToString())
    args = ["fold", str(model), "-o", tmp_path / "f.onnx", "--format", "json"]
    args += ["-p", "auto", "-p", "cpu:0", "-p", "CPUExecutionProvider"]
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    verified = json.loads(result.stdout)["verification_by_provider"]
    assert [v["provider"] for v in verified] == ["cpu"]


def test_cli_fold_unknown_provider_is_an_input_error_without_verification(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(_conv_relu().SerializeToString())
    args = ["fold", str(model), "-o", str(tmp_path / "f.onnx"), "--no-verify", "-p", "tpu"]
    result = cli(*args)
    assert result.exit_code == 2 and not (tmp_path / "f.onnx").exists()
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: unknown execution provider 'tpu'")


@needs_placement
def test_cli_run_compare_reports_the_compared_models_own_placement(tmp_path):
    # run --compare reported the first model's providers and placement only; the other ran unseen
    first, second = _conv_relu(), _conv_relu()
    second.graph.node.insert(1, helper.make_node("Identity", ["c"], ["c2"], name="identity"))
    second.graph.node[2].input[0] = "c2"  # Conv -> Identity -> Relu: one node more
    (tmp_path / "a.onnx").write_bytes(first.SerializeToString())
    (tmp_path / "b.onnx").write_bytes(second.SerializeToString())
    args = ["run", tmp_path / "a.onnx", "--compare", tmp_path / "b.onnx", "--random", "--runs", "1"]
    args += ["--opt-level", "disable", "--format", "json"]
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["placement"] == {CPU: 3}
    compared = doc["compare"]
    assert compared["placement"] == {CPU: 4} and compared["cpu_nodes"] == []
    assert compared["active_providers"] == [CPU] and compared["fell_back"] is False
    table = cli(*args[:-2])
    assert f"b.onnx on {CPU}, placement (nodes per provider): {CPU} 4" in table.stdout
