"""Plugin execution providers: shared libraries registered with onnxruntime at run time.

Since onnxruntime 1.22 an execution provider can ship as a plugin library (``onnxruntime-ep-openvino``,
``onnxruntime-ep-nv-tensorrt-rtx``, ...). It is registered with
``ort.register_execution_provider_library(name, path)``; its devices then appear in ``ort.get_ep_devices()``
(EP name, vendor, device type and id) and a session selects them with
``SessionOptions.add_provider_for_devices``. ``ort.get_available_providers()`` never lists a plugin EP.

Where the libraries come from, in this order: installed ``onnxruntime-ep-*`` packages, by their convention
(module ``onnxruntime_ep_<name>`` with ``get_library_path()`` and ``get_ep_names()``; installed packages
are trusted like any import); ``ep_libraries`` of a configuration file the user names (``--config FILE``);
``--ep-library NAME=PATH``. A ``bnscope.toml`` or ``pyproject.toml`` that merely lies in the working
directory loads nothing: running bnscope in a cloned repository must not execute that repository's
files (as ``--loader`` runs code only when named). Registration is process-wide and happens once per name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from bnscope.errors import BnscopeError
from bnscope.onnxio.config_file import read_bnscope_table
from bnscope.onnxio.outputs import check_input_file
from bnscope.runtime.messages import clean_ort_message
from bnscope.runtime.providers import normalise_distribution_name

logger = logging.getLogger(__name__)

_PACKAGE_PREFIX = "onnxruntime-ep-"


@dataclass(frozen=True)
class PluginLibrary:
    """One plugin EP library and what became of its registration.

    Attributes:
        name: The registration name (the package name, or NAME of ``NAME=PATH``).
        path: The shared library.
        source: Where it came from: ``"package onnxruntime-ep-openvino 1.8.1"``, ``"config"``, ``"--ep-library"``.
        ep_names: The EPs it provides (from the package; else those whose devices appeared).
        error: Why it could not be registered, in onnxruntime's words; None when registered.
    """

    name: str
    path: str
    source: str
    ep_names: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class EpDevice:
    """One device an execution provider offers (``ort.get_ep_devices()``).

    Attributes:
        ep_name: The EP. ep_vendor: Who made the EP. type: ``"CPU"``, ``"GPU"`` or ``"NPU"``.
        vendor: The device's vendor. device_id: The vendor's device id (a PCI id, not an index).
        index: Position among this EP's devices: what ``--provider NAME:INDEX`` selects.
        handle: The ``OrtEpDevice`` itself (not compared, not serialised).
    """

    ep_name: str
    ep_vendor: str
    type: str
    vendor: str
    device_id: int
    index: int
    handle: object = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {
            "ep_name": self.ep_name,
            "ep_vendor": self.ep_vendor,
            "type": self.type,
            "vendor": self.vendor,
            "device_id": self.device_id,
            "index": self.index,
        }


_registered: dict[str, PluginLibrary] = {}


def plugin_api_available() -> bool:
    """Whether this onnxruntime can register plugin EPs and list devices (1.22 and later)."""
    return hasattr(ort, "register_execution_provider_library") and hasattr(ort, "get_ep_devices")


def list_ep_devices() -> list[EpDevice]:
    """Every device of every registered EP, built-in and plugin; [] before onnxruntime 1.22."""
    if not hasattr(ort, "get_ep_devices"):
        return []
    devices, seen = [], {}
    for handle in ort.get_ep_devices():
        index = seen.get(handle.ep_name, 0)
        seen[handle.ep_name] = index + 1
        hw = handle.device
        devices.append(
            EpDevice(
                handle.ep_name,
                handle.ep_vendor,
                str(getattr(hw.type, "name", hw.type)),
                hw.vendor,
                int(hw.device_id),
                index,
                handle,
            )
        )
    return devices


def installed_plugin_libraries() -> list[PluginLibrary]:
    """Plugin EP libraries of installed ``onnxruntime-ep-*`` packages (their ``get_library_path()``)."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = normalise_distribution_name(dist.metadata.get("Name") or "")
        if name.startswith(_PACKAGE_PREFIX) and name not in found:
            found[name] = _package_library(name, dist.version)
    return list(found.values())


def _package_library(name: str, version: str) -> PluginLibrary:
    source = f"package {name} {version}"
    try:
        module = importlib.import_module(name.replace("-", "_"))
        path = str(module.get_library_path())
        ep_names = tuple(module.get_ep_names()) if hasattr(module, "get_ep_names") else ()
    except Exception as exc:  # a broken plugin package must not stop bnscope
        return PluginLibrary(name, "", source, error=f"{type(exc).__name__}: {exc}")
    return PluginLibrary(name, path, source, ep_names)


def config_ep_libraries(config: str | os.PathLike) -> dict[str, str]:
    """``ep_libraries = {NAME = "PATH"}`` from the configuration file the user named (``--config FILE``):
    its top level or its ``[tool.bnscope]`` table. Nothing else is read: see the module docstring."""
    candidate = Path(config)
    check_input_file(candidate, "config file", "check the path")
    table = read_bnscope_table(candidate) or {}
    return _library_table(table.get("ep_libraries", {}), candidate)


def _library_table(value: object, where: Path) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise BnscopeError(
            f'{where}: ep_libraries must be a table of NAME = "PATH". '
            'Hint: ep_libraries = { my_ep = "/path/to/libmy_ep.so" }'
        )
    return {str(k): os.path.abspath(where.parent / v) for k, v in value.items()}


def parse_ep_libraries(values: list[str]) -> dict[str, str]:
    """``NAME=PATH`` items (``--ep-library``) as a mapping, each PATH made absolute (onnxruntime would
    look for a relative one beside its own files)."""
    out = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise BnscopeError(
                f"--ep-library {item!r} is not NAME=PATH. Hint: e.g. --ep-library openvino=/opt/ov/libplugin.so"
            )
        out[name.strip()] = os.path.abspath(path.strip())
    return out


def register_plugins(
    extra: Mapping[str, str] | None = None, *, config: str | os.PathLike | None = None
) -> list[PluginLibrary]:
    """Register the plugin EP libraries the user chose (once per name) and report each one: installed
    ``onnxruntime-ep-*`` packages, ``extra``, and the ``ep_libraries`` of ``config``.

    Args:
        extra: ``NAME -> PATH`` from the command line. Defaults to None.
        config: A configuration file named on the command line (``--config``). Defaults to None: no
            configuration file is read, whatever lies in the working directory.
    """
    if not plugin_api_available():
        return []
    wanted = installed_plugin_libraries()
    if config is not None:
        wanted += [PluginLibrary(n, p, "config") for n, p in config_ep_libraries(config).items()]
    wanted += [PluginLibrary(n, p, "--ep-library") for n, p in (extra or {}).items()]
    return [_register(library) for library in wanted]


def _register(library: PluginLibrary) -> PluginLibrary:
    if library.name in _registered:
        return _registered[library.name]
    if library.error is None and _not_a_file(library.path):
        library = PluginLibrary(library.name, library.path, library.source, library.ep_names, _not_a_file(library.path))
    if library.error is None:
        before = {d.ep_name for d in list_ep_devices()}
        try:
            ort.register_execution_provider_library(library.name, library.path)
        except Exception as exc:  # onnxruntime's pybind errors derive from Exception only
            if "already registered" not in str(exc).lower():
                library = _failed(library, exc)
        if library.error is None and not library.ep_names:
            library = _with_ep_names(library, sorted({d.ep_name for d in list_ep_devices()} - before))
    if library.error:  # reported where it matters: `bnscope providers`, and an unknown --provider
        logger.info("plugin EP library %s (%s) not registered: %s", library.name, library.path, library.error)
    _registered[library.name] = library
    return library


def _not_a_file(path: str) -> str | None:
    """Why ``path`` cannot be a shared library without opening it: loading a FIFO blocks forever. A
    name that is not there is left to the loader (it may search LD_LIBRARY_PATH)."""
    if path and os.path.exists(path) and not os.path.isfile(path):
        return f"{path} is not a regular file (a folder, device or FIFO)"
    return None


def _failed(library: PluginLibrary, exc: Exception) -> PluginLibrary:
    return PluginLibrary(library.name, library.path, library.source, library.ep_names, clean_ort_message(str(exc)))


def _with_ep_names(library: PluginLibrary, names: list[str]) -> PluginLibrary:
    return PluginLibrary(library.name, library.path, library.source, tuple(names), library.error)


def failed_libraries() -> list[PluginLibrary]:
    """The plugin EP libraries that could not be registered, with onnxruntime's reason."""
    return [lib for lib in _registered.values() if lib.error]


def plugin_ep_names() -> dict[str, PluginLibrary]:
    """EP name -> the registered library that provides it."""
    return {ep: lib for lib in _registered.values() if lib.error is None for ep in lib.ep_names}
