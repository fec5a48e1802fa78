"""Calibration data, the core: the inputs a model takes, batch validation, and the DataSource contract.

A source yields feed dicts ``{input_name: array}`` whose first axis is the sample axis; the formats
that produce them are in :mod:`bnscope.data.sources` (``open_source``).

* ``shard=(i, n)``: batch ``k`` goes to shard ``k % n``. ``max_batches`` counts the batches of the whole
  run, before sharding, so the n sharded runs together are exactly the unsharded run.
* Every batch passes :func:`validate_batch` before it is yielded. NaN/Inf values pass it; each
  command decides (``stats`` refuses them unless asked to report them, using :func:`nonfinite_count`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import onnx

from bnscope.errors import BnscopeError

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
LABELS_KEY = "labels"
_FEEDABLE = frozenset(
    getattr(onnx.TensorProto, name)
    for name in (
        "FLOAT",
        "FLOAT16",
        "DOUBLE",
        "BOOL",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
    )
)


@dataclass(frozen=True)
class InputSpec:
    """One model input. A ``str`` (named) or ``None`` dimension is dynamic."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Returns the inputs a caller feeds: graph inputs that are not initializers."""
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    return [_input_spec(value) for value in graph.input if value.name not in constants]


def _input_spec(value: onnx.ValueInfoProto) -> InputSpec:
    if not value.type.HasField("tensor_type"):
        kind = value.type.WhichOneof("value") or "untyped"
        raise BnscopeError(f"input '{value.name}' is a {kind}, not a tensor. Hint: bnscope feeds tensor inputs only")
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type not in _FEEDABLE:
        raise BnscopeError(
            f"input '{value.name}' has element type {_type_name(tensor_type.elem_type)}, which bnscope cannot "
            "feed from numpy. Hint: export the model with a float32 input and cast inside the graph"
        )
    if not tensor_type.HasField("shape"):
        raise BnscopeError(
            f"input '{value.name}' has no shape in the model. Hint: set it, e.g. with onnx.tools.update_model_dims"
        )
    shape = tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
        for d in tensor_type.shape.dim
    )
    return InputSpec(value.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)), shape)


def _type_name(elem_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"#{elem_type}"


def fixed_batch_size(inputs: list[InputSpec]) -> int | None:
    """Returns the batch size every input fixes on axis 0, or None when it is dynamic or differs."""
    firsts = {spec.shape[0] if spec.shape else None for spec in inputs}
    first = firsts.pop() if len(firsts) == 1 else None
    return first if isinstance(first, int) else None


def model_batch_size(inputs: list[InputSpec]) -> int | None:
    """Returns the batch size the model fixes, or None when it is dynamic or unclear.

    That is the axis-0 size its inputs of rank >= 2 share: rank-0 and rank-1 inputs are usually
    per-channel parameters (ONNX's node tests feed BN's scale, bias, mean and var as inputs).
    With no input of rank >= 2, the axis-0 size all inputs share.
    """
    batched = [spec for spec in inputs if len(spec.shape) >= 2] or inputs
    return fixed_batch_size(batched)


def resolve_batch_size(requested: int | None, inputs: list[InputSpec], default: int) -> int:
    """The batch size to use: the one asked for, else the model's fixed one, else ``default``.

    Raises:
        BnscopeError: it is not a positive integer.
    """
    size = requested if requested is not None else model_batch_size(inputs) or default
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise BnscopeError(f"batch size {size!r} is not a positive integer. Hint: use --batch-size 1 or more")
    return size


# --- validation -------------------------------------------------------------------------------


def validate_batch(batch: Mapping[str, object], inputs: list[InputSpec]) -> Feed:
    """Checks one feed dict against the model's inputs and returns it ready to feed.

    Casts float data to the input's float type (float64 -> float32 -> float16) and integer data to
    the input's integer type when the values fit; drops a ``labels`` entry. Raises BnscopeError for
    a missing or unexpected name, a wrong rank or fixed dimension, or int/float/bool mismatches.
    """
    if not isinstance(batch, Mapping):
        raise BnscopeError(
            f"a batch is a {type(batch).__name__}, not a dict of input arrays. "
            f"Hint: give {{input_name: array}} for inputs {quoted_names(inputs)}"
        )
    expected = {spec.name for spec in inputs}
    for key in batch:
        if key not in expected and key != LABELS_KEY:
            raise BnscopeError(
                f"unexpected input '{key}' in the data; the model's inputs are {quoted_names(inputs)}. "
                "Hint: key each array by a model input name"
            )
    dims: dict[str, tuple[int, str]] = {}
    feed = {}
    for spec in inputs:
        if spec.name not in batch:
            raise BnscopeError(
                f"missing input '{spec.name}' in the data; the model's inputs are {quoted_names(inputs)}. "
                "Hint: give one array per input, keyed by input name"
            )
        feed[spec.name] = _check_array(spec, batch[spec.name], dims)
    return feed


def _check_array(spec: InputSpec, value: object, dims: dict[str, tuple[int, str]]) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise BnscopeError(
            f"input '{spec.name}': data of dtype {array.dtype} is not numeric. "
            f"Hint: convert it to a plain numeric array of dtype {spec.dtype}"
        )
    _check_shape(spec, array.shape, dims)
    return np.ascontiguousarray(_cast(spec, array))


def _check_shape(spec: InputSpec, shape: tuple[int, ...], dims: dict[str, tuple[int, str]]) -> None:
    fits = len(shape) == len(spec.shape) and all(
        not isinstance(want, int) or want == got for want, got in zip(spec.shape, shape)
    )
    if not fits:
        raise BnscopeError(
            f"input '{spec.name}': expected shape {format_shape(spec.shape)}{_dynamic_note(spec.shape)}, "
            f"got {format_shape(shape)}. Hint: {_shape_hint(spec, shape)}"
        )
    for want, got in zip(spec.shape, shape):
        if isinstance(want, str):
            seen, owner = dims.setdefault(want, (got, spec.name))
            if seen != got:
                raise BnscopeError(
                    f"input '{spec.name}': dimension {want} is {got} but input '{owner}' has {want}={seen}. "
                    f"Hint: give every input the same {want}"
                )


def _shape_hint(spec: InputSpec, shape: tuple[int, ...]) -> str:
    same_rest = len(shape) == len(spec.shape) and format_shape(shape[1:]) == format_shape(spec.shape[1:])
    if same_rest and spec.shape[0] == 0:
        return "the model fixes the batch size to 0, so it takes no samples: re-export it with a dynamic batch size"
    if same_rest and isinstance(spec.shape[0], int):
        return (
            f"the model fixes the batch size to {spec.shape[0]}: use that batch size and a sample count divisible by it"
        )
    return "reshape or resize the data to the model's input shape"


def _cast(spec: InputSpec, array: np.ndarray) -> np.ndarray:
    want, have = spec.dtype, array.dtype
    if have == want:
        return array
    if want.kind == "f" and have.kind == "f":
        logger.debug("input '%s': casting %s data to %s", spec.name, have, want)
        return array.astype(want)
    if want.kind in "iu" and have.kind in "iu":
        info = np.iinfo(want)
        if array.size == 0 or (int(array.min()) >= info.min and int(array.max()) <= info.max):
            logger.debug("input '%s': casting %s data to %s", spec.name, have, want)
            return array.astype(want)
        raise BnscopeError(
            f"input '{spec.name}': {have} values do not fit in the model's {want}. Hint: check the data's range"
        )
    raise BnscopeError(
        f"input '{spec.name}': expected {want} data, got {have}. "
        f"Hint: convert it with .astype(np.{want.name}) if the values mean the same thing"
    )


def nonfinite_count(batch: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Returns the number of NaN/Inf values per array (0 for integer and bool arrays)."""
    counts = {}
    for name, value in batch.items():
        array = np.asarray(value)
        counts[name] = int(array.size - np.count_nonzero(np.isfinite(array))) if array.dtype.kind in "fc" else 0
    return counts


def quoted_names(inputs: list[InputSpec]) -> str:
    """The inputs' names, quoted, for messages: ``'x', 'y'``."""
    return ", ".join(f"'{spec.name}'" for spec in inputs)


def format_shape(shape: tuple[int | str | None, ...]) -> str:
    """A shape for messages: ``[N,3,?]`` (``?`` for an unknown dimension)."""
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _dynamic_note(shape: tuple[int | str | None, ...]) -> str:
    dynamic = ["?" if d is None else d for d in shape if not isinstance(d, int)]
    return f" ({', '.join(dynamic)} dynamic)" if dynamic else ""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type name when empty)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def input_names(inputs: list[InputSpec]) -> list[str]:
    """The inputs' names, in order."""
    return [spec.name for spec in inputs]


# --- sources ----------------------------------------------------------------------------------


@dataclass
class DataSource:
    """Calibration data for a model's inputs.

    Attributes:
        description: what the data is, for reports, e.g. "calib.npz (96 samples)".
        samples: the number of samples, or None when unknown (a loader).
        is_random: True for random data: statistics from it describe nothing real.
        inputs: the model inputs the batches are validated against.
    """

    description: str
    samples: int | None
    is_random: bool
    inputs: list[InputSpec] = field(repr=False)

    def batches(
        self, batch_size: int, max_batches: int | None = None, shard: tuple[int, int] | None = None
    ) -> Iterator[Feed]:
        """Yields validated feed dicts of ``batch_size`` samples (the last may be smaller).

        Args:
            batch_size: samples per batch; ignored where feeds are used as given (loader, ONNX test data).
            max_batches: stop after this many batches of the whole run (counted before sharding).
                Defaults to all.
            shard: ``(i, n)``: yield only batches ``k`` with ``k % n == i``. Defaults to all batches.
        """
        _check_batching(batch_size, max_batches, shard)
        return self._batches(batch_size, max_batches, shard or (0, 1))

    def _batches(self, batch_size: int, max_batches: int | None, shard: tuple[int, int]) -> Iterator[Feed]:
        index, count = shard
        produced = 0
        for k, read in enumerate(self._plan(batch_size)):
            if max_batches is not None and k >= max_batches:
                break
            produced += 1
            if k % count == index:
                yield validate_batch(read(), self.inputs)
        if produced == 0:
            raise BnscopeError(f"{self.description} gave no data. Hint: check that it yields at least one batch")

    def batch_count(self, batch_size: int, max_batches: int | None = None) -> int:
        """How many batches :meth:`batches` yields, counted without reading them (a loader script runs)."""
        _check_batching(batch_size, max_batches, None)
        count = sum(1 for _ in islice(self._plan(batch_size), max_batches))
        if count == 0:
            raise BnscopeError(f"{self.description} gave no data. Hint: check that it yields at least one batch")
        return count

    def batch_range(self, batch_size: int, start: int, stop: int, step: int = 1) -> Iterator[Feed]:
        """Batches ``range(start, stop, step)`` of :meth:`batches`, validated; only those are read."""
        _check_batching(batch_size, None, None)
        for read in islice(self._plan(batch_size), start, stop, step):
            yield validate_batch(read(), self.inputs)

    def labels(self) -> np.ndarray | None:
        """Returns the labels stored with the data (an npz ``labels`` array), in sample order, or None."""
        return None

    def _plan(self, batch_size: int) -> Iterator[Callable[[], Mapping[str, object]]]:
        raise NotImplementedError


def _check_batching(batch_size: int, max_batches: int | None, shard: tuple[int, int] | None) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BnscopeError(f"batch size {batch_size!r} is not a positive integer. Hint: use a batch size >= 1")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise BnscopeError(f"max batches {max_batches!r} is not a positive integer. Hint: use >= 1, or no limit")
    if shard is not None:
        index, count = shard
        if not (isinstance(count, int) and isinstance(index, int) and 0 <= index < count):
            raise BnscopeError(f"shard {index}/{count} is invalid. Hint: use shard (i, n) with 0 <= i < n")
