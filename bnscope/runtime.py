"""onnxruntime sessions: provider resolution without silent fallback, running, timing, comparing.

Providers. ``resolve_provider("cuda")`` returns the list handed to ``InferenceSession``:
``[("CUDAExecutionProvider", {...}), "CPUExecutionProvider"]``. The trailing CPU provider is
node-level placement (onnxruntime puts the nodes a GPU provider cannot run on CPU), not a
fallback. TensorRT is paired with CUDA, as onnxruntime itself does. A provider missing from
``ort.get_available_providers()`` is a ``BnscopeError`` that names the installed package and
the available providers.

Silent fallback. A provider can be *available* (compiled into the build) and still fail to
load: ``libonnxruntime_providers_cuda.so`` needs CUDA and cuDNN at run time. onnxruntime then
writes two lines to the process's stderr (file descriptor 2, from C++, not Python's
``sys.stderr``) and builds the session on CPU without raising::

    [E:onnxruntime:Default, provider_bridge_ort.cc:NNNN TryGetProviderInfo_CUDA] ... Failed to
      load library libonnxruntime_providers_cuda.so with error: libcudnn.so.9: cannot open ...
    [W:onnxruntime:Default, onnxruntime_pybind_state.cc:NNNN CreateExecutionProviderFactoryInstance]
      Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 12.*. ...

In other set-ups (Windows with ``CUDA_PATH`` set, TensorRT) the provider raises instead, and
the Python wrapper prints "EP Error ... Falling back to ['CPUExecutionProvider']" to *stdout*
and retries on CPU. So ``create_session`` passes ``enable_fallback=0``, captures fd 2 while a
non-CPU session is created, and compares ``session.get_providers()`` with the request: a
dropped provider is an error (with onnxruntime's own reason) unless ``allow_fallback``.

Timing uses ``time.perf_counter`` around ``InferenceSession.run``; comparison follows
``np.allclose`` with the second argument as the reference: ``|a - b| <= atol + rtol * |b|``.
"""

from __future__ import annotations

from functools import cached_property

import contextlib
import importlib.metadata
import logging
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
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
    "OpenVINOExecutionProvider": "pip uninstall -y onnxruntime && pip install onnxruntime-openvino",
    "DmlExecutionProvider": "pip uninstall -y onnxruntime && pip install onnxruntime-directml (Windows)",
    "QNNExecutionProvider": "pip uninstall -y onnxruntime && pip install onnxruntime-qnn",
    "ROCMExecutionProvider": "onnxruntime removed ROCm in 1.23; use provider 'migraphx'",
    "MIGraphXExecutionProvider": "install AMD's onnxruntime-migraphx build for ROCm",
    "CoreMLExecutionProvider": "CoreML is in the standard onnxruntime wheel on macOS only",
}

OPT_LEVELS = ("disable", "basic", "extended", "layout", "all")
_ORT_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",  # onnxruntime >= 1.22
    "all": "ORT_ENABLE_ALL",
}
_QUIET = 3  # onnxruntime log severity: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal
_PROTOBUF_LIMIT = 2**31 - 1
ProviderList = list[str | tuple[str, dict[str, str]]]


# ---------------------------------------------------------------- installation and providers
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
        logger.warning("several onnxruntime packages are installed and overwrite each other: %s",
                       ", ".join(f"{n} {v}" for n, v in installed))
    built = getattr(ort, "package_name", "") or ""
    for name, _ in installed:
        if _normalise(name) == _normalise(built):
            return name, ort.__version__
    if built:
        return built, ort.__version__
    return (installed[0][0] if installed else "onnxruntime"), ort.__version__


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _describe_build() -> str:
    name, version = ort_distribution()
    device = ort.get_device()
    return f"{name} {version}, CPU only" if device == "CPU" else f"{name} {version}, {device}"


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
        return (f"{' and '.join(installed)} are installed and overwrite each other; "
                f"pip uninstall -y {' '.join(installed)}, then install only the one you need")
    return _INSTALL_HINTS.get(provider, "install an onnxruntime package built with it")


def _with_options(provider: str, tf32: bool) -> str | tuple[str, dict[str, str]]:
    if provider == CUDA and not tf32 and _ort_version() >= (1, 18):
        return CUDA, {"use_tf32": "0"}
    return provider


def _ort_version() -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", ort.__version__)[:2])


def _provider_name(entry: str | tuple[str, dict[str, str]]) -> str:
    return entry if isinstance(entry, str) else entry[0]


# ---------------------------------------------------------------- session options
@dataclass(frozen=True)
class SessionOptionsSpec:
    """The onnxruntime session settings bnscope controls.

    Attributes:
        opt_level: ``"disable"``, ``"basic"``, ``"extended"``, ``"layout"`` or ``"all"``.
            Defaults to "all". Use "disable" for a baseline: every other level folds Conv+BN.
        threads: Intra-op threads. Defaults to None (onnxruntime's choice).
        log_severity: onnxruntime's session log level. Defaults to 3 (errors only).
        spin: Let idle intra-op threads busy-wait for the next parallel section. Defaults to True
            (onnxruntime's default). Turn it off when the caller computes between runs (the
            statistics merge): spinning workers then take the cores the caller needs.
    """

    opt_level: str = "all"
    threads: int | None = None
    log_severity: int = _QUIET
    spin: bool = True

    def __post_init__(self) -> None:
        if self.opt_level not in OPT_LEVELS:
            raise BnscopeError(f"unknown optimisation level '{self.opt_level}'. "
                               f"Hint: use one of {', '.join(OPT_LEVELS)}")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise BnscopeError(f"threads must be a positive integer, got {self.threads!r}. "
                               "Hint: leave it unset for onnxruntime's default")

    def to_ort(self) -> ort.SessionOptions:
        """Build the ``onnxruntime.SessionOptions``."""
        options = ort.SessionOptions()
        level = getattr(ort.GraphOptimizationLevel, _ORT_OPT_LEVELS[self.opt_level], None)
        if level is None:
            raise BnscopeError(f"optimisation level '{self.opt_level}' needs a newer onnxruntime "
                               f"than {ort.__version__}. Hint: use 'extended' or 'all'")
        options.graph_optimization_level = level
        options.log_severity_level = self.log_severity
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options


# ---------------------------------------------------------------- sessions
@dataclass(frozen=True)
class TensorInfo:
    """Name, shape (ints, symbolic names or None) and onnxruntime type of a model input/output."""

    name: str
    shape: tuple[int | str | None, ...] | None
    type: str

    @property
    def dtype(self) -> np.dtype | None:
        """The numpy dtype for a tensor type numpy knows, else None."""
        return _NUMPY_TYPES.get(self.type)


_NUMPY_TYPES = {
    f"tensor({k})": np.dtype(v) for k, v in {
        "float": "float32", "double": "float64", "float16": "float16", "bool": "bool",
        "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
        "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    }.items()
}


@dataclass
class Session:
    """An onnxruntime session with the providers it was asked for and the ones it got.

    Attributes:
        inner: The ``onnxruntime.InferenceSession``.
        requested_provider: What the caller asked for, as given (``"cuda"``, ``"auto"``...).
        providers: The resolved list passed to onnxruntime.
        active_providers: ``inner.get_providers()`` after creation.
        fell_back: The first requested provider is not active (only with ``allow_fallback``
            or ``"auto"``).
        fallback_reason: onnxruntime's reason when ``fell_back``, else None.
        options: The session settings used.
        inputs: Required model inputs. outputs: Model outputs.
        overridable: Initializers listed as graph inputs (IR >= 4); feeding them is optional.
    """

    inner: ort.InferenceSession
    requested_provider: str
    providers: ProviderList
    active_providers: list[str]
    fell_back: bool
    fallback_reason: str | None
    options: SessionOptionsSpec
    inputs: tuple[TensorInfo, ...] = field(default=())
    outputs: tuple[TensorInfo, ...] = field(default=())
    overridable: tuple[TensorInfo, ...] = field(default=())

    @property
    def primary_provider(self) -> str:
        """The provider bnscope asked onnxruntime for first."""
        return _provider_name(self.providers[0])

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @cached_property
    def _known_outputs(self) -> frozenset[str]:
        return frozenset(self.output_names)

    def run(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Run the model.

        Args:
            feeds: Input name to array; arrays are not cast, a wrong dtype is an error.
            output_names: Outputs to fetch. Defaults to None (all, in model order).

        Raises:
            BnscopeError: an input is missing, unknown, or has the wrong dtype or shape (the
                message names it), or onnxruntime fails while running.
        """
        arrays = self.check_feeds(feeds)
        names = list(output_names) if output_names is not None else self.output_names
        known = self._known_outputs
        unknown = [n for n in names if n not in known]
        if unknown:
            raise BnscopeError(f"unknown output {', '.join(map(repr, unknown))}. "
                               f"Hint: the model's outputs are {', '.join(self.output_names)}")
        try:
            return self.inner.run(names, arrays)
        except Exception as exc:  # onnxruntime's pybind errors derive from Exception only
            raise _run_error(exc, arrays) from exc

    def check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check the feeds' names, dtypes and ranks/static dims against the model's inputs."""
        arrays = {name: np.asarray(value) for name, value in feeds.items()}
        expected = {i.name: i for i in (*self.inputs, *self.overridable)}
        missing = [i.name for i in self.inputs if i.name not in arrays]
        extra = [n for n in arrays if n not in expected]
        if missing or extra:
            what = "; ".join(filter(None, [missing and f"missing input {', '.join(map(repr, missing))}",
                                           extra and f"unknown input {', '.join(map(repr, extra))}"]))
            raise BnscopeError(f"{what}. Hint: the model's inputs are {', '.join(self.input_names)}")
        for name, array in arrays.items():
            _check_feed(expected[name], array)
        return arrays


def _check_feed(info: TensorInfo, array: np.ndarray) -> None:
    want = info.dtype
    if want is not None and array.dtype != want:
        raise BnscopeError(f"input '{info.name}' is {array.dtype} but the model expects {want} "
                           f"({info.type}). Hint: cast it with .astype(np.{want.name})")
    if info.shape is None:
        return
    if array.ndim != len(info.shape):
        raise BnscopeError(f"input '{info.name}' has shape {array.shape} (rank {array.ndim}) but "
                           f"the model expects rank {len(info.shape)} {_show_shape(info.shape)}. "
                           "Hint: reshape or batch the data to match")
    for axis, (got, dim) in enumerate(zip(array.shape, info.shape)):
        if isinstance(dim, int) and dim >= 0 and got != dim:
            raise BnscopeError(f"input '{info.name}' has shape {array.shape} but the model expects "
                               f"{_show_shape(info.shape)} (dimension {axis} must be {dim}). "
                               "Hint: resize or batch the data to match")


def _show_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _run_error(exc: Exception, arrays: Mapping[str, np.ndarray]) -> BnscopeError:
    message = clean_ort_message(str(exc))
    named = [n for n in arrays if re.search(rf"\b{re.escape(n)}\b", message)]
    shown = ", ".join(f"{n}: {arrays[n].dtype}{list(arrays[n].shape)}" for n in (named or arrays))
    return BnscopeError(f"onnxruntime failed while running the model with {shown}: {message}. "
                        "Hint: check the input shapes and dtypes against the model's inputs")


def create_session(
    model: str | os.PathLike[str] | bytes | onnx.ModelProto,
    provider: str = "cpu",
    *,
    opt_level: str = "all",
    threads: int | None = None,
    allow_fallback: bool = False,
    tf32: bool = False,
    spin: bool = True,
) -> Session:
    """Create an onnxruntime session and check that it runs where it was asked to.

    Args:
        model: A path (required for models over 2 GB or with external data, whose files
            onnxruntime finds beside the path), serialized bytes, or a ``ModelProto``.
        provider: See ``resolve_provider``. Defaults to "cpu".
        opt_level: See ``SessionOptionsSpec``. Defaults to "all".
        threads: Intra-op threads. Defaults to None (onnxruntime's choice).
        allow_fallback: Accept a session whose requested provider failed to load (logged as a
            warning, ``fell_back=True``). Defaults to False. ``"auto"`` always allows it.
        tf32: See ``resolve_provider``. Defaults to False.
        spin: See ``SessionOptionsSpec``. Defaults to True.

    Raises:
        BnscopeError: unknown/unavailable provider, a provider that failed to load (unless
            allowed), or a model onnxruntime cannot load (one cleaned line and a hint).
    """
    spec = SessionOptionsSpec(opt_level=opt_level, threads=threads, spin=spin)
    providers = resolve_provider(provider, tf32=tf32)
    source, label = _model_source(model)
    lenient = allow_fallback or provider.strip().lower() == "auto"
    wanted = _provider_name(providers[0])
    reason = None
    for start in range(len(providers)):  # when lenient, a provider that raises is dropped
        chain = providers[start:]
        try:
            inner, native_log = _new_session(source, spec, chain)
            break
        except Exception as exc:  # onnxruntime's pybind errors derive from Exception only
            if not lenient or len(chain) == 1:
                raise _creation_error(exc, label, _provider_name(chain[0])) from exc
            reason = reason or clean_ort_message(str(exc))
    active = list(inner.get_providers())
    fell_back = wanted not in active
    if fell_back:
        reason = reason or provider_load_errors(native_log) or "no reason given by onnxruntime"
        if not lenient:
            raise BnscopeError(_fallback_message(wanted, active, reason))
        logger.warning("%s failed to load; running on %s: %s", wanted, ", ".join(active), reason)
    return Session(
        inner=inner, requested_provider=provider, providers=providers, active_providers=active,
        fell_back=fell_back, fallback_reason=reason if fell_back else None, options=spec,
        inputs=tuple(_tensor_info(a) for a in inner.get_inputs()),
        outputs=tuple(_tensor_info(a) for a in inner.get_outputs()),
        overridable=tuple(_tensor_info(a) for a in inner.get_overridable_initializers()),
    )


def _model_source(model: str | os.PathLike[str] | bytes | onnx.ModelProto) -> tuple[str | bytes, str]:
    if isinstance(model, bytes):
        return model, "the model bytes"
    if isinstance(model, onnx.ModelProto):
        if _uses_external_data(model.graph):
            raise BnscopeError("the in-memory model refers to external data files, which onnxruntime "
                               "cannot find without the model's path. Hint: pass the .onnx path instead")
        if model.ByteSize() > _PROTOBUF_LIMIT:
            raise BnscopeError("the model is larger than 2 GB and cannot be passed to onnxruntime "
                               "in memory. Hint: save it with onnx.save(model, path, "
                               "save_as_external_data=True) and pass the path")
        return model.SerializeToString(), f"the in-memory model '{model.graph.name}'"
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise BnscopeError(f"model file {path} does not exist. Hint: check the path")
        return str(path), str(path)
    raise BnscopeError(f"cannot make a session from a {type(model).__name__}. "
                       "Hint: pass a path, bytes or an onnx.ModelProto")


def _uses_external_data(graph: onnx.GraphProto) -> bool:
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        return True
    for node in graph.node:
        for attr in node.attribute:
            if attr.t.data_location == onnx.TensorProto.EXTERNAL:
                return True
            if any(_uses_external_data(g) for g in (*([attr.g] if attr.HasField("g") else []), *attr.graphs)):
                return True
    return False


def _new_session(source: str | bytes, spec: SessionOptionsSpec,
                 providers: ProviderList) -> tuple[ort.InferenceSession, str]:
    options = spec.to_ort()
    if any(_provider_name(p) == "DmlExecutionProvider" for p in providers):
        options.enable_mem_pattern = False  # DirectML supports neither (onnxruntime's DML docs)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    native = contextlib.nullcontext([]) if providers == [CPU] else _capture_native_stderr()
    with native as log, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # enable_fallback=0: the wrapper would otherwise print to stdout and retry on CPU.
        inner = ort.InferenceSession(source, options, providers=providers, enable_fallback=0)
    ours = [w for w in caught if "provider" in str(w.message).lower()]
    for w in caught:
        if w not in ours:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return inner, "".join(log) + "".join(f"{w.message}\n" for w in ours)


def _tensor_info(arg: Any) -> TensorInfo:
    shape = None if arg.shape is None else tuple(arg.shape)
    return TensorInfo(name=arg.name, shape=shape, type=arg.type)


_CAPTURE_LOCK = threading.Lock()


@contextlib.contextmanager
def _capture_native_stderr() -> Iterator[list[str]]:
    """Redirect file descriptor 2 to a file; the yielded list receives what C++ wrote.

    onnxruntime reports provider load failures only through its C++ logger on fd 2. Lines
    that are not onnxruntime log lines are written back to the real stderr afterwards.
    """
    captured: list[str] = []
    with _CAPTURE_LOCK, tempfile.TemporaryFile() as sink:
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(sink.fileno(), 2)
        except (OSError, ValueError):  # no usable fd 2 (some embedded interpreters)
            saved = None
        if saved is None:
            yield captured
            return
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            captured.append(text)
            other = [ln for ln in text.splitlines(keepends=True)
                     if ln.strip() and not _ORT_LOG.search(_strip_ansi(ln))]
            if other:
                os.write(2, "".join(other).encode())
            if text.strip():
                logger.debug("onnxruntime wrote while creating the session:\n%s", _strip_ansi(text))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ORT_LOG = re.compile(r"\[(?P<sev>[VIWEF]):onnxruntime:[^\]]*\]\s*(?P<msg>.*)")
_ORT_PREFIX = re.compile(r"^\s*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")
_SOURCE_LOCATION = re.compile(r"^\s*(?:[A-Za-z]:)?[^\s]*\.(?:cc|cpp|cu|h|hpp):\d+\s+")
_FUNCTION_NAME = re.compile(r"^\S+\s+")  # MSVC logs the name without arguments
_SIGNATURE = re.compile(r"^[^()\[\s][^()\[]*?\((?:[^()]|\([^()]*\))*\)(?:\s*const)?\s+")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def clean_ort_message(message: str) -> str:
    """One line from an onnxruntime error: no error-code prefix, source location or C++ signature."""
    lines = [ln.strip() for ln in _strip_ansi(message).splitlines() if ln.strip()]
    text = lines[0] if lines else message.strip()
    while True:
        before = text
        text = _ORT_PREFIX.sub("", text)
        if _SOURCE_LOCATION.match(text):
            text = _SOURCE_LOCATION.sub("", text)
            signature = _SIGNATURE if _SIGNATURE.match(text) else _FUNCTION_NAME
            text = signature.sub("", text, count=1)
        if text == before:
            break
    text = " ".join(text.split()).rstrip(".")
    return text if len(text) <= 300 else text[:297] + "..."


def provider_load_errors(log_text: str) -> str:
    """The reasons onnxruntime logged for a provider it dropped, joined in one line ("" if none).

    Keeps error/fatal lines and warnings that say "Failed to create ...", as well as Python
    warnings about providers not in the build.
    """
    reasons = []
    for line in _strip_ansi(log_text).splitlines():
        match = _ORT_LOG.search(line)
        if match:
            msg = match["msg"]
            if match["sev"] in "EF" or re.search(r"failed to (create|load)", msg, re.I):
                reasons.append(re.split(r"\.\s+Please\b", clean_ort_message(msg))[0])
        elif "not in available provider names" in line:
            reasons.append(line.strip().rstrip("."))
    return "; ".join(dict.fromkeys(reasons))


def _fallback_message(wanted: str, active: list[str], reason: str) -> str:
    gpu = wanted in (CUDA, TENSORRT, "NvTensorRTRTXExecutionProvider")
    hint = ("check with `python -c 'import onnxruntime as ort; ort.preload_dlls(); ort.print_debug_info()'`, "
            "install the CUDA and cuDNN versions your onnxruntime-gpu needs "
            "(pip install 'onnxruntime-gpu[cuda,cudnn]'), or allow the fallback to run on CPU"
            if gpu else "check the provider's runtime libraries, or allow the fallback to run on CPU")
    libraries = " (CUDA or cuDNN libraries missing or incompatible)" if wanted == CUDA else (
        " (TensorRT, CUDA or cuDNN libraries missing or incompatible)" if gpu else "")
    return (f"{wanted} failed to load{libraries}, so onnxruntime would run on "
            f"{', '.join(active)}: {reason}. Hint: {hint}")


def _creation_error(exc: Exception, label: str, provider: str) -> BnscopeError:
    message = clean_ort_message(str(exc))
    return BnscopeError(f"onnxruntime cannot load {label} on {provider}: {message}. "
                        f"Hint: {_creation_hint(message, provider)}")


def _creation_hint(message: str, provider: str) -> str:
    low = message.lower()
    if "training_mode" in low:
        return "BatchNormalization with training_mode=1 is a training graph; export in eval mode"
    if "batchnormalization(6)" in low or "batchnormalization(1)" in low:
        return ("onnxruntime has no BatchNormalization before opset 7; convert the model with "
                "onnx.version_converter.convert_version(model, 15)")
    if "ir version" in low:
        return (f"onnxruntime {ort.__version__} is too old for this model; "
                "upgrade onnxruntime or lower ir_version")
    if "protobuf parsing failed" in low or "invalid_protobuf" in low:
        return "the file is not an ONNX model or is truncated; check it with onnx.checker.check_model"
    if "external data" in low or "external_data" in low:
        return "pass the model by path, with its external data files beside it"
    if "could not find an implementation" in low or "not implemented" in low:
        return (f"this operator or type is not supported on {provider}; "
                "convert the opset or use another provider")
    if provider != CPU and any(k in low for k in ("cuda", "cudnn", "tensorrt", "provider", "ep error")):
        return "the provider failed to start; check its libraries and driver, or use provider 'cpu'"
    return "validate the model with onnx.checker.check_model(path, full_check=True)"


# ---------------------------------------------------------------- timing
@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of ``InferenceSession.run`` over ``runs`` calls after ``warmup``."""

    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    runs: int
    warmup: int
    batch_size: int
    throughput_samples_per_s: float


def time_session(session: Session, feeds: Mapping[str, Any], warmup: int = 5, runs: int = 50,
                 *, batch_size: int | None = None) -> LatencyStats:
    """Time ``session`` on ``feeds`` with ``time.perf_counter``.

    Args:
        session: The session to time.
        feeds: One batch of inputs (checked once, then run unchanged).
        warmup: Untimed runs first. Defaults to 5.
        runs: Timed runs. Defaults to 50.
        batch_size: Samples per run for throughput. Defaults to None (the first input's
            leading dimension, or 1 for a scalar input).
    """
    if warmup < 0 or runs < 1:
        raise BnscopeError(f"need warmup >= 0 and runs >= 1, got warmup={warmup}, runs={runs}. "
                           "Hint: use e.g. warmup=5, runs=50")
    arrays = session.check_feeds(feeds)
    session.run(arrays)  # turns a first-run error into a BnscopeError; counts as warm-up
    for _ in range(max(warmup - 1, 0)):
        session.inner.run(None, arrays)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        session.inner.run(None, arrays)
        times[i] = time.perf_counter() - start
    times_ms = times * 1e3
    if batch_size is None:
        first = next(iter(arrays.values()), np.empty(()))
        batch_size = int(first.shape[0]) if first.ndim else 1
    median = float(np.median(times_ms))
    return LatencyStats(
        median_ms=median, p90_ms=float(np.percentile(times_ms, 90)), min_ms=float(times_ms.min()),
        mean_ms=float(times_ms.mean()), runs=runs, warmup=warmup, batch_size=batch_size,
        throughput_samples_per_s=batch_size / (median / 1e3) if median > 0 else float("inf"),
    )


# ---------------------------------------------------------------- comparing outputs
@dataclass(frozen=True)
class OutputDiff:
    """How one output of run ``a`` differs from the reference run ``b``.

    ``max_abs`` and ``max_rel`` cover the elements finite in both; a NaN/inf mismatch makes
    them ``inf``. ``reason`` says why a comparison failed beyond tolerance (shape, NaN).
    """

    name: str
    max_abs: float
    max_rel: float
    passed: bool
    shape: tuple[int, ...]
    dtype: str
    atol: float = 0.0
    rtol: float = 0.0
    reason: str | None = None


def default_tolerances(dtype: Any) -> tuple[float, float]:
    """``(atol, rtol)`` for comparing two runs of the same model computed in ``dtype``.

    Two correct runs differ by rounding: a fold, a layout change or another kernel reorders
    sums of length K (hundreds to thousands in Conv/Gemm), costing up to about K * eps
    relative, compounded over layers.
    - float64 (eps 2.2e-16): (1e-9, 1e-7), far above rounding, far below any real error.
    - float32 (eps 1.2e-7): (1e-4, 1e-4), about 1000 eps.
    - float16 (eps 9.8e-4): (1e-2, 1e-2), about 10 eps; mean relative errors of fp16 models
      against an fp32 twin measure 3e-4 to 6e-4, and the max over elements is larger.
    - bfloat16 (eps 7.8e-3): (5e-2, 5e-2), about 6 eps.
    - float8 types: (1.25e-1, 1.25e-1). Integers, bool and strings: (0, 0), exact.
    """
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    table = {"float64": (1e-9, 1e-7), "float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2),
             "bfloat16": (5e-2, 5e-2)}
    if name in table:
        return table[name]
    if name.startswith("float8"):
        return 1.25e-1, 1.25e-1
    return 0.0, 0.0


def compare_outputs(
    a: Mapping[str, np.ndarray],
    b: Mapping[str, np.ndarray],
    atol: float | Mapping[str, float] | None = None,
    rtol: float | Mapping[str, float] | None = None,
) -> list[OutputDiff]:
    """Compare outputs of ``a`` with the reference ``b``, output by output, in ``a``'s order.

    An element passes when ``|a - b| <= atol + rtol * |b|`` (``np.allclose``); NaN matches
    NaN in the same place, an infinity matches the same infinity, anything else non-finite
    fails. Computed in float64.

    Args:
        a: Output name to array (e.g. the folded model).
        b: Output name to array (the reference); must have the same names.
        atol: A number, a per-output mapping, or None for ``default_tolerances`` of ``b``'s dtype.
        rtol: Likewise.

    Raises:
        BnscopeError: the two sets of outputs have different names.
    """
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise BnscopeError(f"the outputs differ: only in the first {only_a}, only in the reference "
                           f"{only_b}. Hint: compare models with the same output names")
    return [_compare_one(name, np.asarray(a[name]), np.asarray(b[name]), atol, rtol) for name in a]


def _pick(value: float | Mapping[str, float] | None, name: str, default: float) -> float:
    if isinstance(value, Mapping):
        value = value.get(name)
    return default if value is None else float(value)


def _compare_one(name: str, x: np.ndarray, ref: np.ndarray, atol: Any, rtol: Any) -> OutputDiff:
    default_atol, default_rtol = default_tolerances(ref.dtype)
    at, rt = _pick(atol, name, default_atol), _pick(rtol, name, default_rtol)
    base = dict(name=name, shape=tuple(ref.shape), dtype=ref.dtype.name, atol=at, rtol=rt)
    if x.shape != ref.shape:
        return OutputDiff(max_abs=float("inf"), max_rel=float("inf"), passed=False,
                          reason=f"shape {x.shape} != reference {ref.shape}", **base)
    if x.dtype.kind in "OSU" or ref.dtype.kind in "OSU":
        same = bool(np.array_equal(x, ref))
        return OutputDiff(max_abs=0.0 if same else float("inf"), max_rel=0.0 if same else float("inf"),
                          passed=same, reason=None if same else "non-numeric values differ", **base)
    x64, r64 = x.astype(np.float64), ref.astype(np.float64)
    finite = np.isfinite(x64) & np.isfinite(r64)
    diff = np.abs(np.subtract(x64, r64, out=np.zeros_like(x64), where=finite))
    scale = np.abs(np.where(finite, r64, 0.0))
    ok = np.where(finite, diff <= at + rt * scale, _same_nonfinite(x64, r64))
    rel = np.divide(diff, scale, out=np.where(diff > 0, np.inf, 0.0), where=scale > 0)
    bad_nonfinite = int(np.count_nonzero(~finite & ~ok))
    max_abs = float(diff.max(initial=0.0)) if not bad_nonfinite else float("inf")
    max_rel = float(rel.max(initial=0.0)) if not bad_nonfinite else float("inf")
    passed = bool(ok.all())
    reason = None
    if bad_nonfinite:
        reason = f"{bad_nonfinite} NaN/inf element(s) do not match the reference"
    elif not passed:
        reason = f"{int(np.count_nonzero(~ok))} of {ok.size} element(s) outside tolerance"
    return OutputDiff(max_abs=max_abs, max_rel=max_rel, passed=passed, reason=reason, **base)


def _same_nonfinite(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return (np.isnan(x) & np.isnan(ref)) | (np.isinf(x) & (x == ref))
