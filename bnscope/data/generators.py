"""Calibration data from code: seeded random data, and a user's loader script (it runs their code)."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np

from bnscope.data.batching import Chunk, GivenSource, SampleSource
from bnscope.data.limits import check_generated_batch
from bnscope.data.spec import (
    DataSource,
    Feed,
    InputSpec,
    format_shape,
    model_batch_size,
    one_line,
    quoted_names,
)
from bnscope.errors import BnscopeError


def _is_batched(spec: InputSpec, batch: int | None) -> bool:
    """Random data stacks samples on axis 0 of inputs whose axis 0 is dynamic or the model's batch;
    other inputs have all dims fixed and get one whole tensor per batch."""
    return bool(spec.shape) and (not isinstance(spec.shape[0], int) or spec.shape[0] == batch)


def open_random(inputs: list[InputSpec], seed: int, samples: int) -> DataSource:
    """Seeded standard-normal samples for float inputs whose dimensions but the first are fixed."""
    if not isinstance(seed, int) or seed < 0:
        raise BnscopeError(f"random seed {seed!r} is not a non-negative integer. Hint: use a seed >= 0")
    if not isinstance(samples, int) or samples < 1:
        raise BnscopeError(f"random sample count {samples!r} is not positive. Hint: use at least 1 sample")
    batch = model_batch_size(inputs)
    for spec in inputs:
        if spec.dtype.kind != "f":
            raise BnscopeError(
                f"input '{spec.name}' is {spec.dtype}; random data is float only. Hint: give real calibration data"
            )
        drawn = spec.shape[1:] if _is_batched(spec, batch) else spec.shape
        if not spec.shape or any(not isinstance(d, int) for d in drawn):  # rank 0: validation makes it 1-d
            raise BnscopeError(
                f"input '{spec.name}' has shape {format_shape(spec.shape)}: random data needs every dimension but "
                "the first fixed. Hint: give real calibration data"
            )
    batched = tuple(_is_batched(spec, batch) for spec in inputs)

    def chunks() -> list[Chunk]:
        return [Chunk(samples, partial(_random_rows, inputs, batched, seed))]

    return SampleSource(f"random normal data ({samples} samples, seed {seed})", samples, True, inputs, chunks)


def _random_rows(inputs: list[InputSpec], batched: tuple[bool, ...], seed: int, start: int, stop: int) -> Feed:
    """Sample i of batched input k comes from its own generator, so data does not depend on batch
    size or shard; an unbatched input is drawn whole, from a generator of the batch's first sample.
    (Random data is one chunk, so a batch is always one call.)"""
    for spec, stacked in zip(inputs, batched):
        check_generated_batch(
            spec.name, stop - start if stacked else 1, spec.shape[1:] if stacked else spec.shape, spec.dtype
        )
    return {
        spec.name: (
            _random_stack(spec, seed, k, start, stop)
            if stacked
            else np.random.default_rng([seed, start, k, 1]).standard_normal(spec.shape, dtype=np.float32)
        ).astype(spec.dtype)
        for k, (spec, stacked) in enumerate(zip(inputs, batched))
    }


def _random_stack(spec: InputSpec, seed: int, k: int, start: int, stop: int) -> np.ndarray:
    return np.stack(
        [
            np.random.default_rng([seed, i, k]).standard_normal(spec.shape[1:], dtype=np.float32)
            for i in range(start, stop)
        ]
    )


def open_loader(loader: str, inputs: list[InputSpec]) -> DataSource:
    """Imports ``file.py`` (running its code) and uses the feeds ``func()`` gives (``file.py:func``, default ``load_data``)."""
    if loader.endswith(".py") or ":" not in loader:
        path_text, name = loader, "load_data"
    else:
        path_text, _, name = loader.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise BnscopeError(f"data loader script {path} does not exist. Hint: give file.py:function")
    description = f"data loader {path.name}:{name}"
    module_name = f"_bnscope_loader_{abs(hash(str(path.resolve())))}"
    source = importlib.machinery.SourceFileLoader(module_name, str(path))  # any file name, not only *.py
    module_spec = importlib.util.spec_from_file_location(module_name, path, loader=source)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses in the script look their module up here
    try:
        with _user_code(description, " on import"):
            module_spec.loader.exec_module(module)
    except BnscopeError:
        del sys.modules[module_name]
        raise
    function = getattr(module, name, None)
    if not callable(function):
        raise BnscopeError(f"{path} has no function '{name}'. Hint: give file.py:function")
    return GivenSource(description, None, False, inputs, partial(_loader_feeds, description, function, inputs))


def _loader_feeds(
    description: str, function: Callable[[], object], inputs: list[InputSpec]
) -> Iterator[Callable[[], Mapping[str, object]]]:
    with _user_code(description):
        produced = function()
    if isinstance(produced, (Mapping, np.ndarray)) or not isinstance(produced, Iterable):
        raise BnscopeError(
            f"{description} returned a {type(produced).__name__}, not an iterable of feed dicts. "
            "Hint: make the function yield {input_name: array} dicts"
        )
    iterator = iter(produced)
    while True:
        with _user_code(description):
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield partial(_loader_feed, description, item, inputs)


def _loader_feed(description: str, item: object, inputs: list[InputSpec]) -> Mapping[str, object]:
    if isinstance(item, Mapping):
        return item
    if len(inputs) == 1 and hasattr(item, "__array__"):
        return {inputs[0].name: item}
    raise BnscopeError(
        f"{description} yielded a {type(item).__name__}, not a feed dict. "
        f"Hint: yield {{input_name: array}} for inputs {quoted_names(inputs)}"
    )


@contextmanager
def _user_code(description: str, when: str = "") -> Iterator[None]:
    """Runs a piece of the user's loader script: its ``print`` goes to stderr (stdout is bnscope's data:
    ``--format json`` must stay JSON), and any exception it raises, ``BaseException`` subclasses such
    as ``GeneratorExit`` included, becomes a one-line BnscopeError. Ctrl-C and SIGTERM pass."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except (BnscopeError, KeyboardInterrupt):
        raise
    except SystemExit as exc:  # sys.exit(0) must not end bnscope with "success" and no output
        raise BnscopeError(
            f"{description} called sys.exit({exc.code!r}){when}. Hint: a loader returns or yields feed dicts; "
            "it must not exit"
        ) from None
    except BaseException as exc:
        raise BnscopeError(
            f"{description} raised {type(exc).__name__}{when}: {one_line(exc)}. Hint: fix the loader script"
        ) from exc
