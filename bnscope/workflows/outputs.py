"""The output rule applied to a whole run: what the run reads, and the paths it is asked to write.

Every workflow that writes calls :func:`check_run_outputs` before any work starts; the CLI calls it
too with every output of a command (``--html`` included) before it calls the workflow. The rule
itself is :func:`bnscope.onnxio.outputs.check_outputs`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path

import onnx

from bnscope.onnxio.external_data import all_tensors, is_external
from bnscope.onnxio.outputs import check_outputs, external_files, loader_file

PathLike = str | os.PathLike


def check_run_outputs(
    model: PathLike | None,
    outputs: Mapping[str, PathLike | None],
    *,
    data: PathLike | None = None,
    loader: str | None = None,
    others: Mapping[str, PathLike | None] | None = None,
    model_writable: bool = False,
) -> None:
    """Refuse any output that is an input of the run, not a regular file, or not writable.

    Args:
        model: The model the run reads (its external data files are inputs too).
        outputs: option -> path to be written. A model output (``-o``) also writes ``<out>.data``.
        data: ``--data`` (a file or a folder). loader: ``--loader file.py:func``.
        others: further inputs, e.g. ``{"the config": path, "the baseline": path}``.
        model_writable: ``--force``: the model itself may be overwritten (and, when ``-o`` is the
            model, its data files); an external data file is never a model output.

    Raises:
        BnscopeError: see :func:`bnscope.onnxio.outputs.check_outputs`.
    """
    if not any(p is not None for p in outputs.values()):
        return
    inputs: dict[str, PathLike | None] = {"the data": data, "the loader script": loader_file(loader), **(others or {})}
    externals = {} if model is None else external_files(_external_locations(Path(model)), Path(model).parent)
    if model is not None and not model_writable:
        inputs["the input model"] = model
    check_outputs(outputs, {**inputs, **externals})
    for option, out in ((o, Path(p)) for o, p in outputs.items() if p is not None and o.startswith("-o")):
        replaces_model = model_writable and model is not None and _same_path(out, Path(model))
        read = inputs if replaces_model else {**inputs, **externals}
        data_file = out.with_name(out.name + ".data")
        if len(os.fsencode(data_file.name)) <= NAME_MAX:  # longer, no such file can exist
            check_outputs({f"{option} (its data file)": data_file}, read)


NAME_MAX = 255
"""The longest file name, in bytes, of Linux, macOS and Windows file systems."""


def _same_path(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b) or (a.exists() and b.exists() and os.path.samefile(a, b))


def _external_locations(path: Path) -> list[str]:
    """External data locations named by the model; none when it cannot be read (the workflow will
    refuse it with its own message). The CLI and then the workflow both check a run's outputs: the
    model is parsed once per version of the file, not once per check."""
    try:
        stat = os.stat(path)
    except OSError:
        return []
    return list(_locations_in(os.path.realpath(path), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _locations_in(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # not a model: load_model reports it
        return ()
    return tuple(e.value for t in all_tensors(model) if is_external(t) for e in t.external_data if e.key == "location")
