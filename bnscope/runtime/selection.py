"""``--provider NAME[:DEVICE]``: a built-in or a plugin execution provider, and which of its devices.

A built-in EP (in ``ort.get_available_providers()``) goes to ``InferenceSession(providers=...)``; its
device is a provider option (``cuda:1`` -> ``device_id=1``, built-in ``openvino:gpu`` ->
``device_type=GPU``). A plugin EP (see :mod:`bnscope.runtime.plugins`) goes through the device API:
``SessionOptions.add_provider_for_devices(devices, options)``; its device is an index among the EP's
devices (``openvino:1``) or a device type (``openvino:gpu``); without one, its first GPU, else NPU,
else CPU device. Either way the CPU EP stays behind it for the nodes the EP does not take, and
:mod:`bnscope.runtime.placement` checks which those are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import onnxruntime as ort

from bnscope.errors import BnscopeError
from bnscope.runtime.plugins import EpDevice, failed_libraries, list_ep_devices, plugin_ep_names, register_plugins
from bnscope.runtime.providers import (
    CPU,
    ProviderList,
    canonical_provider,
    provider_name,
    resolve_provider,
)

_DEVICE_ID_OPTION = {
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "NvTensorRTRTXExecutionProvider",
    "DmlExecutionProvider",
    "MIGraphXExecutionProvider",
    "ROCMExecutionProvider",
}
_DEVICE_TYPE_ORDER = ("GPU", "NPU", "CPU")


@dataclass(frozen=True)
class ProviderChoice:
    """What a session asks onnxruntime for.

    Attributes:
        requested: The ``--provider`` value as given.
        providers: Built-in: the list for ``InferenceSession``. Plugin: the EP's name then the CPU EP
            (what the session should report).
        devices: Plugin only: the devices handed to ``add_provider_for_devices``.
    """

    requested: str
    providers: ProviderList
    devices: tuple[EpDevice, ...] = ()

    @property
    def primary(self) -> str:
        """The provider asked for first."""
        return provider_name(self.providers[0])

    @property
    def plugin(self) -> bool:
        return bool(self.devices)

    def fallbacks(self) -> list[ProviderChoice]:
        """This choice, then what remains when its first provider is dropped (for ``allow_fallback``)."""
        if self.plugin:
            return [self, ProviderChoice(self.requested, [CPU])]
        return [ProviderChoice(self.requested, self.providers[i:]) for i in range(len(self.providers))]


def split_device(text: str) -> tuple[str, str | None]:
    """``"cuda:1"`` -> ``("cuda", "1")``; ``"cuda"`` -> ``("cuda", None)``."""
    name, sep, device = text.strip().rpartition(":")
    if not sep:
        return text.strip(), None
    if not name or not device:
        raise BnscopeError(f"--provider {text!r} is not NAME[:DEVICE]. Hint: e.g. cuda, cuda:1, openvino:gpu")
    return name, device


def choose_provider(text: str, *, tf32: bool = False) -> ProviderChoice:
    """The built-in or plugin provider ``text`` names, with its device.

    Raises:
        BnscopeError: unknown provider or device, or a provider neither built in nor registered.
    """
    name, device = split_device(text)
    if name.lower() == "auto":
        if device is not None:
            raise BnscopeError(f"--provider {text!r}: auto takes no device. Hint: name the provider, e.g. cuda:1")
        return ProviderChoice(text, resolve_provider("auto", tf32=tf32))
    wanted = _canonical_or_none(name)
    if wanted in ort.get_available_providers():
        return ProviderChoice(text, _with_device(resolve_provider(wanted, tf32=tf32), device, text))
    plugin = _plugin_named(name, wanted)
    if plugin is not None:
        return ProviderChoice(text, [plugin, CPU], (_plugin_device(plugin, device, text),))
    try:
        resolve_provider(name, tf32=tf32)  # raises the built-in error: unknown, or not in this build
    except BnscopeError as exc:
        raise _with_failed_plugins(exc) from None
    raise AssertionError("unreachable: resolve_provider accepts only available providers")


def distinct_providers(names: Iterable[str], *, first: str = "cpu") -> tuple[str, ...]:
    """``first``, then each of ``names`` that asks onnxruntime for something else, each checked.

    ``auto`` on a CPU-only build, ``cpu:0`` and ``CPUExecutionProvider`` all ask for what ``cpu`` does;
    ``cuda:0`` and ``cuda:1`` differ.

    Raises:
        BnscopeError: a name ``choose_provider`` refuses.
    """
    seen, kept = set(), []
    for name in (first, *names):
        choice = choose_provider(name)
        key = (repr(choice.providers), tuple((d.ep_name, d.index) for d in choice.devices))
        if key not in seen:
            seen.add(key)
            kept.append(name)
    return tuple(kept)


def _with_failed_plugins(exc: BnscopeError) -> BnscopeError:
    """The error, plus the plugin libraries that did not register (one of them may be the EP asked for)."""
    failed = failed_libraries()
    if not failed:
        return exc
    what, _, hint = str(exc).partition(". Hint: ")
    libraries = "; ".join(f"{lib.name} ({lib.source}): {lib.error}" for lib in failed)
    return BnscopeError(f"{what}; plugin EP libraries not registered: {libraries}. Hint: {hint}")


def _canonical_or_none(name: str) -> str | None:
    try:
        return canonical_provider(name)
    except BnscopeError:
        return None


def _plugin_named(name: str, canonical: str | None) -> str | None:
    register_plugins()
    # ours, and those onnxruntime registered itself (onnxruntime-gpu >= 1.32 bundles a CUDA plugin EP)
    built_in = set(ort.get_available_providers())
    eps = [*plugin_ep_names(), *(d.ep_name for d in list_ep_devices() if d.ep_name not in built_in)]
    names = {n.lower(): n for n in eps}
    names.update({_short(n): n for n in eps if _short(n) not in names})
    for key in (canonical or "", name):
        if key.lower() in names:
            return names[key.lower()]
    return None


def _short(ep_name: str) -> str:
    """``OpenVINOExecutionProvider`` -> ``openvino``, ``FakeEP`` -> ``fake``: a plugin EP's alias."""
    low = ep_name.lower()
    for suffix in ("executionprovider", "ep"):
        if low.endswith(suffix) and len(low) > len(suffix):
            return low[: -len(suffix)]
    return low


def _with_device(providers: ProviderList, device: str | None, text: str) -> ProviderList:
    if device is None:
        return providers
    first = provider_name(providers[0])
    if first in _DEVICE_ID_OPTION:
        if not device.isdigit():
            raise BnscopeError(f"--provider {text!r}: {first} takes a device number. Hint: e.g. cuda:0, cuda:1")
        return [_add_option(p, "device_id", device) if provider_name(p) in _DEVICE_ID_OPTION else p for p in providers]
    if first == "OpenVINOExecutionProvider":
        return [_add_option(providers[0], "device_type", device.upper()), *providers[1:]]
    if first == CPU and device.lower() in ("0", "cpu"):
        return providers
    raise BnscopeError(
        f"--provider {text!r}: bnscope cannot choose a device of {first}. Hint: give the provider without ':{device}'"
    )


def _add_option(entry, key: str, value: str):
    name, options = (entry, {}) if isinstance(entry, str) else entry
    return name, {**options, key: value}


def _plugin_device(ep_name: str, device: str | None, text: str) -> EpDevice:
    devices = [d for d in list_ep_devices() if d.ep_name == ep_name]
    offered = ", ".join(f"{d.index} ({d.type}, {d.vendor})" for d in devices) or "none"
    if device is None:
        ranked = sorted(devices, key=lambda d: _rank(d.type))
        picked = ranked[:1]
    elif device.isdigit():
        picked = [d for d in devices if d.index == int(device)]
    else:
        picked = [d for d in devices if d.type.lower() == device.lower()]
    if not devices:
        raise BnscopeError(
            f"plugin execution provider {ep_name} is registered but offers no device on this machine. "
            "Hint: it found no hardware it supports here; check the device's driver, or use another provider"
        )
    if not picked:
        raise BnscopeError(
            f"plugin execution provider {ep_name} has no device {device!r} (devices: {offered}). "
            "Hint: `bnscope providers` lists every EP's devices; pick one as NAME:INDEX or NAME:gpu"
        )
    return picked[0]


def _rank(device_type: str) -> int:
    return _DEVICE_TYPE_ORDER.index(device_type) if device_type in _DEVICE_TYPE_ORDER else len(_DEVICE_TYPE_ORDER)
