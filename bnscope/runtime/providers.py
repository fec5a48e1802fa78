"""Execution providers: which onnxruntime is installed, and the provider list a session asks for.

``resolve_provider("cuda")`` returns the list handed to ``InferenceSession``:
``[("CUDAExecutionProvider", {...}), "CPUExecutionProvider"]``. The trailing CPU provider is
node-level placement (onnxruntime puts the nodes a GPU provider cannot run on CPU), not a
fallback. TensorRT is paired with CUDA, as onnxruntime itself does. A provider missing from
``ort.get_available_providers()`` is a ``BnscopeError`` that names the installed package and
the available providers.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import re

import onnxruntime as ort

from bnscope.errors import BnscopeError

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

PROVIDER_ALIASES: dict[str, str] = {
    "cpu": CPU,
    "cuda": CUDA,
    "tensorrt": TENSORRT,
    "trt": TENSORRT,
    "tensorrt-rtx": "NvTensorRTRTXExecutionProvider",
    "trt-rtx": "NvTensorRTRTXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "cann": "CANNExecutionProvider",
}
"""Short names (lower case) for onnxruntime execution providers; full names work too."""

AUTO_ORDER: tuple[str, ...] = (
    TENSORRT,
    "NvTensorRTRTXExecutionProvider",
    CUDA,
    "MIGraphXExecutionProvider",
    "ROCMExecutionProvider",
    "DmlExecutionProvider",
    "OpenVINOExecutionProvider",
    "CoreMLExecutionProvider",
    CPU,
)
"""The order ``provider="auto"`` tries, best first."""

_INSTALL_HINTS = {
    CUDA: "pip uninstall -y onnxruntime && pip install onnxruntime-gpu",
    TENSORRT: "pip uninstall -y onnxruntime && pip install onnxruntime-gpu, plus TensorRT",
    "OpenVINOExecutionProvider": "pip install onnxruntime-ep-openvino (plugin EP; onnxruntime >= 1.23)",
    "NvTensorRTRTXExecutionProvider": "pip install onnxruntime-ep-nv-tensorrt-rtx (plugin EP)",
    "DmlExecutionProvider": "pip uninstall -y onnxruntime && pip install onnxruntime-directml (Windows)",
    "QNNExecutionProvider": "pip uninstall -y onnxruntime && pip install onnxruntime-qnn",
    "ROCMExecutionProvider": "onnxruntime removed ROCm in 1.23; use provider 'migraphx'",
    "MIGraphXExecutionProvider": "install AMD's onnxruntime-migraphx build for ROCm",
    "CoreMLExecutionProvider": "CoreML is in the standard onnxruntime wheel on macOS only",
}
ProviderList = list[str | tuple[str, dict[str, str]]]


def list_ort_distributions() -> list[tuple[str, str]]:
    """Every installed distribution that provides the ``onnxruntime`` module, with its version.

    More than one (``onnxruntime`` and ``onnxruntime-gpu``) means they overwrite each other's
    files; the one that won is what ``ort_distribution`` reports.
    """
    names = importlib.metadata.packages_distributions().get("onnxruntime", [])
    found = []
    for name in dict.fromkeys(names):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append((name, importlib.metadata.version(name)))
    return found


def ort_distribution() -> tuple[str, str]:
    """The onnxruntime package actually imported, e.g. ``("onnxruntime-gpu", "1.31.0")``.

    The name comes from the build info compiled into the imported files, so it is right even
    when several onnxruntime packages are installed (that case is logged as a warning).
    """
    installed = list_ort_distributions()
    if len(installed) > 1:
        logger.warning(
            "several onnxruntime packages are installed and overwrite each other: %s",
            ", ".join(f"{n} {v}" for n, v in installed),
        )
    built = getattr(ort, "package_name", "") or ""
    for name, _ in installed:
        if normalise_distribution_name(name) == normalise_distribution_name(built):
            return name, ort.__version__
    if built:
        return built, ort.__version__
    return (installed[0][0] if installed else "onnxruntime"), ort.__version__


def normalise_distribution_name(name: str) -> str:
    """A distribution name in PEP 503 form: ``onnxruntime_gpu`` and ``onnxruntime-gpu`` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


_NOT_COMPUTE = {CPU, "AzureExecutionProvider"}


def _describe_build() -> str:
    """``"onnxruntime 1.32.0, CPU only"``, or the build's other providers: what the build lists, not the device."""
    name, version = ort_distribution()
    others = [p.removesuffix("ExecutionProvider") for p in ort.get_available_providers() if p not in _NOT_COMPUTE]
    return f"{name} {version}, {'with ' + ', '.join(others) if others else 'CPU only'}"


def canonical_provider(name: str) -> str:
    """The full onnxruntime name for an alias or a full name, any case; ``"auto"`` stays."""
    key = name.strip().lower()
    if key == "auto":
        return "auto"
    if key in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[key]
    known = {p.lower(): p for p in (*ort.get_all_providers(), *PROVIDER_ALIASES.values())}
    for candidate in (key, key + "executionprovider"):
        if candidate in known:
            return known[candidate]
    raise BnscopeError(
        f"unknown execution provider '{name}'. Hint: use auto, one of "
        f"{', '.join(sorted(PROVIDER_ALIASES))}, or a full onnxruntime name such as {CUDA}"
    )


def resolve_provider(name: str, *, tf32: bool = False) -> ProviderList:
    """The provider list to pass to ``InferenceSession`` for ``name``.

    Args:
        name: ``"auto"``, an alias from ``PROVIDER_ALIASES``, or a full provider name (any case).
            ``"auto"`` picks the first available provider in ``AUTO_ORDER``.
        tf32: Let CUDA run float32 Conv/MatMul in TF32 (onnxruntime's own default; 10-bit
            mantissa, relative errors near 1e-3). Defaults to False: full float32, so that
            comparisons and statistics mean what they say.

    Returns:
        Provider names or ``(name, options)`` pairs, ending with ``"CPUExecutionProvider"``.

    Raises:
        BnscopeError: the provider is unknown or not in this onnxruntime build.
    """
    wanted = canonical_provider(name)
    available = list(ort.get_available_providers())
    if wanted == "auto":
        wanted = next((p for p in AUTO_ORDER if p in available), CPU)
    elif wanted not in available:
        raise BnscopeError(
            f"{wanted} is not available in this onnxruntime build ({_describe_build()}; "
            f"available: {', '.join(available)}). Hint: {_install_hint(wanted)}"
        )
    chain = [wanted]
    if wanted in (TENSORRT, "NvTensorRTRTXExecutionProvider") and CUDA in available:
        chain.append(CUDA)
    if wanted != CPU:
        chain.append(CPU)
    return [_with_options(p, tf32) for p in chain]


def _install_hint(provider: str) -> str:
    installed = [name for name, _ in list_ort_distributions()]
    if len(installed) > 1:
        return (
            f"{' and '.join(installed)} are installed and overwrite each other; "
            f"pip uninstall -y {' '.join(installed)}, then install only the one you need"
        )
    return _INSTALL_HINTS.get(provider, "install an onnxruntime package built with it")


def _with_options(provider: str, tf32: bool) -> str | tuple[str, dict[str, str]]:
    if provider == CUDA and not tf32 and _ort_version() >= (1, 18):
        return CUDA, {"use_tf32": "0"}
    return provider


def _ort_version() -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", ort.__version__)[:2])


def provider_name(entry: str | tuple[str, dict[str, str]]) -> str:
    """The provider name of one entry of a ``ProviderList``."""
    return entry if isinstance(entry, str) else entry[0]
