"""Which execution providers this installation has, and whether each one really works here.

Listed is not usable: onnxruntime-gpu lists CUDA on a machine without CUDA libraries, and a plugin EP
can register and offer no device. So every provider is tried with a tiny session (a 1x1 Conv and a
Relu) created the way bnscope creates every session (no silent fallback, placement checked) and run
once; a provider that fails says why in onnxruntime's words, with the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from bnscope.errors import BnscopeError
from bnscope.runtime.placement import placement_supported
from bnscope.runtime.plugins import (
    EpDevice,
    PluginLibrary,
    list_ep_devices,
    plugin_api_available,
    register_plugins,
)
from bnscope.runtime.providers import list_ort_distributions, ort_distribution
from bnscope.runtime.sessions import create_session
from bnscope.schema import SCHEMA_VERSION

BUILTIN, PLUGIN = "builtin", "plugin"
_FIXES = {
    "AzureExecutionProvider": "none needed: the Azure EP calls remote endpoints and runs no model ops here; "
    "every onnxruntime wheel lists it",
}


@dataclass(frozen=True)
class ProviderReport:
    """One execution provider and what trying it here showed.

    Attributes:
        name: The EP name. kind: ``"builtin"`` (compiled into the onnxruntime package) or ``"plugin"``.
        library: The plugin's shared library (None for built-in EPs).
        devices: What ``ort.get_ep_devices()`` lists for it (empty before onnxruntime 1.22).
        usable: A tiny session ran on it, with its compute node placed on it.
        reason: Why not, in onnxruntime's words (None when usable). fix: What to do about it.
    """

    name: str
    kind: str
    library: str | None
    devices: tuple[EpDevice, ...]
    usable: bool
    reason: str | None = None
    fix: str | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "library": self.library,
            "devices": [d.to_dict() for d in self.devices],
            "usable": self.usable,
            "reason": self.reason,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class ProvidersResult:
    """The onnxruntime installation and every provider in it."""

    package: str
    version: str
    distributions: tuple[tuple[str, str], ...]
    available: tuple[str, ...]
    providers: tuple[ProviderReport, ...]
    libraries: tuple[PluginLibrary, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "onnxruntime": {
                "package": self.package,
                "version": self.version,
                "distributions": [{"name": n, "version": v} for n, v in self.distributions],
                "available_providers": list(self.available),
                "plugin_api": plugin_api_available(),
                "placement_api": placement_supported(),
            },
            "providers": [p.to_dict() for p in self.providers],
            "plugin_libraries": [
                {
                    "name": lib.name,
                    "path": lib.path,
                    "source": lib.source,
                    "ep_names": list(lib.ep_names),
                    "error": lib.error,
                }
                for lib in self.libraries
            ],
        }


def probe_providers(
    ep_libraries: Mapping[str, str] | None = None, *, config: str | os.PathLike | None = None
) -> ProvidersResult:
    """Every built-in and plugin EP of this installation, each tried with a tiny session.

    Args:
        ep_libraries: Extra plugin libraries, ``NAME -> PATH``. Defaults to None.
        config: A configuration file the user named, whose ``ep_libraries`` are registered too.
            Defaults to None (none is read).
    """
    libraries = register_plugins(ep_libraries, config=config)
    devices = list_ep_devices()
    available = tuple(ort.get_available_providers())
    reports = [_try(name, BUILTIN, None, devices) for name in available]
    for name, library in _plugin_eps(libraries, devices, available).items():
        reports.append(_try(name, PLUGIN, library, devices))
    package, version = ort_distribution()
    return ProvidersResult(
        package, version, tuple(list_ort_distributions()), available, tuple(reports), tuple(libraries)
    )


def _plugin_eps(libraries: list[PluginLibrary], devices: list[EpDevice], available: tuple[str, ...]) -> dict:
    """Plugin EP name -> its library path (None when onnxruntime registered it itself)."""
    eps: dict[str, str | None] = {}
    for library in libraries:
        for name in library.ep_names:
            eps.setdefault(name, library.path)
    for device in devices:
        if device.ep_name not in available:
            eps.setdefault(device.ep_name, None)
    return eps


def _try(name: str, kind: str, library: str | None, devices: list[EpDevice]) -> ProviderReport:
    own = tuple(d for d in devices if d.ep_name == name)
    try:
        session = create_session(_tiny_model(), name, threads=1)
        session.run({"x": np.ones((1, 2, 4, 4), np.float32)})
    except BnscopeError as exc:
        reason, _, fix = str(exc).partition(". Hint: ")
        return ProviderReport(name, kind, library, own, False, reason, _FIXES.get(name, fix or None))
    return ProviderReport(name, kind, library, own, True)


def _tiny_model() -> bytes:
    #   x[1,2,4,4] -> Conv(W[2,2,1,1]) -> Relu -> y[1,2,4,4]
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2, 1, 1], [1.0, 0.5, -0.5, 1.0])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="probe_conv"), helper.make_node("Relu", ["c"], ["y"])],
        "bnscope_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return model.SerializeToString()
