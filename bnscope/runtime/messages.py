"""onnxruntime's native log and its error messages, turned into one line with a hint.

A provider can be *available* (compiled into the build) and still fail to load; onnxruntime then
says why only through its C++ logger on file descriptor 2 (see :mod:`bnscope.runtime.sessions`).
``capture_native_stderr`` catches those lines, ``provider_load_errors`` keeps the reasons, and
``clean_ort_message`` strips error-code prefixes, source locations and C++ signatures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping

import numpy as np
import onnxruntime as ort

from bnscope.errors import BnscopeError
from bnscope.runtime.providers import CPU, CUDA, TENSORRT

logger = logging.getLogger(__name__)

_CAPTURE_LOCK = threading.Lock()


@contextlib.contextmanager
def capture_native_stderr() -> Iterator[list[str]]:
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
            other = [ln for ln in text.splitlines(keepends=True) if _foreign_line(ln)]
            if other:
                os.write(2, "".join(other).encode())
            if text.strip():
                logger.debug("onnxruntime wrote while creating the session:\n%s", _strip_ansi(text))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ORT_LOG = re.compile(r"\[(?P<sev>[VIWEF]):onnxruntime:[^\]]*\]\s*(?P<msg>.*)")
_ORT_PREFIX = re.compile(r"^\s*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")
_SOURCE_LOCATION = re.compile(r"^\s*(?:[A-Za-z]:)?[^\s]*\.(?:cc|cpp|cu|h|hpp):\d+\s+")
_EMBEDDED_LOCATION = re.compile(
    r"^(?P<head>.*?\berror:\s*)(?P<tail>(?:[A-Za-z]:)?[^\s]*\.(?:cc|cpp|cu|h|hpp):\d+\s.*)$"
)
_FUNCTION_NAME = re.compile(r"^\S+\s+")  # MSVC logs the name without arguments
_SIGNATURE = re.compile(r"^[^()\[\s][^()\[]*?\((?:[^()]|\([^()]*\))*\)(?:\s*const)?\s+")


def _foreign_line(line: str) -> bool:
    """A line someone else wrote: not onnxruntime's log, and not the colour reset (``\\x1b[m``) its
    logger leaves on a line of its own after a multi-line message."""
    plain = _strip_ansi(line).strip()
    return bool(plain) and not _ORT_LOG.search(plain)


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


_LOAD_FAILED = re.compile(r"^Load model from .*? failed:\s*")


def clean_ort_message(message: str) -> str:
    """One line from an onnxruntime error: no error-code prefix, source location or C++ signature."""
    lines = [ln.strip() for ln in _strip_ansi(message).splitlines() if ln.strip()]
    text = lines[0] if lines else message.strip()
    while True:
        before = text
        text = _ORT_PREFIX.sub("", text)
        text = _LOAD_FAILED.sub("", text)  # our message names the model already
        if _SOURCE_LOCATION.match(text):
            text = _SOURCE_LOCATION.sub("", text)
            signature = _SIGNATURE if _SIGNATURE.match(text) else _FUNCTION_NAME
            text = signature.sub("", text, count=1)
        if text == before:
            break
    embedded = _EMBEDDED_LOCATION.match(text)  # "Failed to load model with error: model.cc:180 Model::Model(...) ..."
    if embedded:
        text = embedded["head"] + clean_ort_message(embedded["tail"])
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


_MISSING_LIBRARY = re.compile(r"([\w.+-]+\.so(?:\.\d+)*): cannot open shared object file")  # dlopen's words


def missing_libraries(reason: str) -> list[str]:
    """The shared libraries onnxruntime's message says it could not open, e.g. ``["libcublasLt.so.13"]``."""
    return list(dict.fromkeys(_MISSING_LIBRARY.findall(reason)))


def fallback_message(wanted: str, active: list[str], reason: str) -> str:
    """The error text for a requested provider that onnxruntime dropped."""
    gpu = wanted in (CUDA, TENSORRT, "NvTensorRTRTXExecutionProvider")
    hint = (
        "check with `python -c 'import onnxruntime as ort; ort.preload_dlls(); ort.print_debug_info()'`, "
        "install the CUDA and cuDNN versions your onnxruntime-gpu needs "
        "(pip install 'onnxruntime-gpu[cuda,cudnn]'), or allow the fallback to run on CPU"
        if gpu
        else "check the provider's runtime libraries, or allow the fallback to run on CPU"
    )
    missing = missing_libraries(reason)
    not_found = f"; not found: {', '.join(missing)}" if missing else ""
    libraries = (
        f" (CUDA or cuDNN libraries missing or incompatible{not_found})"
        if wanted == CUDA
        else (f" (TensorRT, CUDA or cuDNN libraries missing or incompatible{not_found})" if gpu else "")
    )
    return (
        f"{wanted} failed to load{libraries}, so onnxruntime would run on {', '.join(active)}: {reason}. Hint: {hint}"
    )


def creation_error(exc: Exception, label: str, provider: str) -> BnscopeError:
    """The error for a session onnxruntime cannot create, with a hint chosen by its message."""
    message = clean_ort_message(str(exc))
    return BnscopeError(
        f"onnxruntime cannot load {label} on {provider}: {message}. Hint: {_creation_hint(message, provider)}"
    )


def _creation_hint(message: str, provider: str) -> str:
    low = message.lower()
    if "training_mode" in low:
        return "BatchNormalization with training_mode=1 is a training graph; export in eval mode"
    if "batchnormalization(6)" in low or "batchnormalization(1)" in low:
        return (
            "onnxruntime has no BatchNormalization before opset 7; convert the model with "
            "onnx.version_converter.convert_version(model, 15)"
        )
    if "ir version" in low:
        return f"onnxruntime {ort.__version__} is too old for this model; upgrade onnxruntime or lower ir_version"
    if "protobuf parsing failed" in low or "invalid_protobuf" in low:
        return "the file is not an ONNX model or is truncated; check it with onnx.checker.check_model"
    if "external data" in low or "external_data" in low:
        return "pass the model by path, with its external data files beside it"
    if "could not find an implementation" in low or "not implemented" in low:
        return f"this operator or type is not supported on {provider}; convert the opset or use another provider"
    if provider == TENSORRT and "tensorrt" in low:
        return (
            "install TensorRT for your CUDA (NVIDIA's tensorrt pip package or its libraries on LD_LIBRARY_PATH), "
            "or use provider 'cuda'"
        )
    if provider != CPU and any(k in low for k in ("cuda", "cudnn", "tensorrt", "provider", "ep error")):
        return "the provider failed to start; check its libraries and driver, or use provider 'cpu'"
    return "validate the model with onnx.checker.check_model(path, full_check=True)"


def run_error(exc: Exception, arrays: Mapping[str, np.ndarray]) -> BnscopeError:
    """The error for a failed ``InferenceSession.run``, naming the inputs the message mentions."""
    message = clean_ort_message(str(exc))
    named = [n for n in arrays if re.search(rf"\b{re.escape(n)}\b", message)]
    shown = ", ".join(f"{n}: {arrays[n].dtype}{list(arrays[n].shape)}" for n in (named or arrays))
    return BnscopeError(
        f"onnxruntime failed while running the model with {shown}: {message}. "
        "Hint: check the input shapes and dtypes against the model's inputs"
    )
