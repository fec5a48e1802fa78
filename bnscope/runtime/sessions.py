"""onnxruntime sessions: settings, creation without silent fallback, running with checked feeds.

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
A provider that loads can still leave compute nodes to the CPU EP: the session's node placement
is read (:mod:`bnscope.runtime.placement`) and such a partial fallback is an error too, unless
``allow_fallback``. Providers, built-in or plugin, are chosen by :mod:`bnscope.runtime.selection`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from bnscope.errors import BnscopeError
from bnscope.runtime.feeds import TensorInfo, check_feed, tensor_info
from bnscope.runtime.messages import (
    capture_native_stderr,
    clean_ort_message,
    creation_error,
    fallback_message,
    provider_load_errors,
    run_error,
)
from bnscope.runtime.model_source import InMemoryWeights, model_source
from bnscope.runtime.options import SessionOptionsSpec
from bnscope.runtime.placement import Placement, read_placement, record_placement
from bnscope.runtime.providers import CPU, ProviderList, provider_name
from bnscope.runtime.selection import ProviderChoice, choose_provider

logger = logging.getLogger(__name__)


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
        placement: Which EP runs how many nodes, and the compute nodes left on the CPU EP.
        pinned: The values given for initializers, kept alive as long as the session reads them.
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
    placement: Placement = field(default_factory=lambda: Placement(False, {}, note="not checked"))
    pinned: tuple = field(default=(), repr=False)

    @property
    def primary_provider(self) -> str:
        """The provider bnscope asked onnxruntime for first."""
        return provider_name(self.providers[0])

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @cached_property
    def _known_outputs(self) -> frozenset[str]:
        return frozenset(self.output_names)

    @cached_property
    def _run_options(self) -> ort.RunOptions:
        # Fatal only: a failing run raises, and bnscope turns that into its one line; at the
        # session's level onnxruntime would print its own copy to stderr first.
        options = ort.RunOptions()
        options.log_severity_level = 4
        return options

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
            raise BnscopeError(
                f"unknown output {', '.join(map(repr, unknown))}. "
                f"Hint: the model's outputs are {', '.join(self.output_names)}"
            )
        try:
            return self.inner.run(names, arrays, self._run_options)
        except Exception as exc:  # onnxruntime's pybind errors derive from Exception only
            raise run_error(exc, arrays) from exc

    def check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check the feeds' names, dtypes and ranks/static dims against the model's inputs."""
        arrays = {name: np.asarray(value) for name, value in feeds.items()}
        expected = {i.name: i for i in (*self.inputs, *self.overridable)}
        missing = [i.name for i in self.inputs if i.name not in arrays]
        extra = [n for n in arrays if n not in expected]
        if missing or extra:
            what = "; ".join(
                filter(
                    None,
                    [
                        missing and f"missing input {', '.join(map(repr, missing))}",
                        extra and f"unknown input {', '.join(map(repr, extra))}",
                    ],
                )
            )
            raise BnscopeError(f"{what}. Hint: the model's inputs are {', '.join(self.input_names)}")
        for name, array in arrays.items():
            check_feed(expected[name], array)
        return arrays


def create_session(
    model: str | os.PathLike[str] | bytes | onnx.ModelProto,
    provider: str = "cpu",
    *,
    opt_level: str = "all",
    threads: int | None = None,
    allow_fallback: bool = False,
    tf32: bool = False,
    spin: bool = True,
    external_data_dir: str | os.PathLike | None = None,
    label: str | None = None,
    initializers: Mapping[str, np.ndarray] | None = None,
) -> Session:
    """Create an onnxruntime session and check that it runs where it was asked to.

    Args:
        model: A path (required for models with external data, whose files onnxruntime finds
            beside the path, and for models over 2 GB unless their weights go in memory: a
            ``ModelProto`` on the CPU provider), serialized bytes, or a ``ModelProto``.
        provider: ``NAME[:DEVICE]``, built-in or plugin; see ``selection.choose_provider``. Defaults to "cpu".
        opt_level: See ``SessionOptionsSpec``. Defaults to "all".
        threads: Intra-op threads. Defaults to None (onnxruntime's choice).
        allow_fallback: Accept a session whose requested provider failed to load (logged as a
            warning, ``fell_back=True``), or that left compute nodes to the CPU EP (logged as a
            warning, ``placement.cpu_nodes``). Defaults to False. ``"auto"`` always allows both.
        tf32: See ``resolve_provider``. Defaults to False.
        spin: See ``SessionOptionsSpec``. Defaults to True.
        external_data_dir: For a model given as bytes: the folder its external data files are in.
            Defaults to None.
        label: How messages name the model (e.g. its file for an edited copy). Defaults to None
            (the path, or "the in-memory model").
        initializers: Values that replace these initializers (or Constant node outputs) of the
            model, without copying or rewriting it. Defaults to None.

    Raises:
        BnscopeError: unknown/unavailable provider, a provider that failed to load (unless
            allowed), or a model onnxruntime cannot load (one cleaned line and a hint).
    """
    folder = str(external_data_dir) if external_data_dir is not None else None
    spec = SessionOptionsSpec(opt_level=opt_level, threads=threads, spin=spin, external_data_dir=folder)
    choice = choose_provider(provider, tf32=tf32)
    # Large weights in memory beside the model bytes: for the CPU provider only (device providers and
    # compilers such as TensorRT get the model whole).
    on_cpu = choice.providers == [CPU] and not choice.plugin
    source, default_label, weights = model_source(model, split=on_cpu, keep=frozenset(initializers or ()))
    label = label or default_label
    lenient = allow_fallback or provider.strip().lower() == "auto"
    wanted = choice.primary
    reason = None
    attempts = choice.fallbacks()
    pinned = tuple(
        (name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))) for name, a in (initializers or {}).items()
    )
    for attempt in attempts:  # when lenient, a provider that raises is dropped
        try:
            inner, native_log = _new_session(source, spec, attempt, pinned, weights)
            break
        except Exception as exc:  # onnxruntime's pybind errors derive from Exception only
            if not lenient or attempt is attempts[-1]:
                raise creation_error(exc, label, attempt.primary) from exc
            reason = reason or clean_ort_message(str(exc))
    active = list(inner.get_providers())
    fell_back = wanted not in active
    if fell_back:
        reason = reason or provider_load_errors(native_log) or "no reason given by onnxruntime"
        if not lenient:
            raise BnscopeError(fallback_message(wanted, active, reason))
        logger.warning("%s failed to load; running on %s: %s", wanted, ", ".join(active), reason)
    placement = read_placement(inner, CPU if fell_back else wanted)
    check_placement(placement, wanted, lenient)
    return Session(
        inner=inner,
        requested_provider=provider,
        providers=choice.providers,
        active_providers=active,
        fell_back=fell_back,
        fallback_reason=reason if fell_back else None,
        options=spec,
        inputs=tuple(tensor_info(a) for a in inner.get_inputs()),
        outputs=tuple(tensor_info(a) for a in inner.get_outputs()),
        overridable=tuple(tensor_info(a) for a in inner.get_overridable_initializers()),
        placement=placement,
        pinned=pinned,
    )


def _new_session(
    source: str | bytes,
    spec: SessionOptionsSpec,
    choice: ProviderChoice,
    pinned: tuple = (),
    weights: InMemoryWeights = InMemoryWeights(),
) -> tuple[ort.InferenceSession, str]:
    options = spec.to_ort()
    weights.add_to(options)
    for name, value in pinned:
        options.add_initializer(name, value)
    record_placement(options)
    providers = choice.providers
    if any(provider_name(p) == "DmlExecutionProvider" for p in providers):
        options.enable_mem_pattern = False  # DirectML supports neither (onnxruntime's DML docs)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if choice.plugin:
        options.add_provider_for_devices([d.handle for d in choice.devices], {})
    native = contextlib.nullcontext([]) if providers == [CPU] else capture_native_stderr()
    with native as log, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # enable_fallback=0: the wrapper would otherwise print to stdout and retry on CPU.
        # A plugin EP comes from the options' devices: passing providers too would override them.
        listed = {} if choice.plugin else {"providers": providers}
        inner = ort.InferenceSession(source, options, enable_fallback=0, **listed)
    ours = [w for w in caught if "provider" in str(w.message).lower()]
    for w in caught:
        if w not in ours:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return inner, "".join(log) + "".join(f"{w.message}\n" for w in ours)


_said_unchecked: list[str] = []


def check_placement(placement: Placement, wanted: str, lenient: bool) -> None:
    """A partial fallback (compute nodes on the CPU EP) is an error unless ``lenient`` (then a warning)."""
    if not placement.checked:
        if wanted != CPU and not _said_unchecked:
            _said_unchecked.append(wanted)  # once per process: every session would say the same
            logger.warning("node placement on %s %s", wanted, placement.note)
        return
    if not placement.cpu_nodes:
        return
    what = f"{wanted} left {placement.describe_cpu_nodes()}"
    if not lenient:
        raise BnscopeError(
            f"partial fallback: {what}. Hint: the provider does not support these ops or types here; "
            "convert them, use another provider, or pass --allow-fallback to run anyway"
        )
    logger.warning("partial fallback: %s", what)
