"""The output rule applied to a whole run: what the run reads, and the paths it is asked to write.

Every workflow that writes calls :func:`check_run_outputs` once, with every output of the run
(``--html`` included), after it has loaded the model and before any work starts; the CLI does not
check outputs itself. The rule itself is :func:`bnscope.onnxio.outputs.check_outputs`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path

import onnx

from bnscope.errors import BnscopeError
from bnscope.onnxio.external_data import all_tensors, is_external
from bnscope.onnxio.model_io import LoadedModel
from bnscope.onnxio.outputs import check_outputs, external_files, loader_file, same_file

PathLike = str | os.PathLike


def check_run_outputs(
    model: PathLike | LoadedModel | None,
    outputs: Mapping[str, PathLike | None],
    *,
    data: PathLike | None = None,
    loader: str | None = None,
    others: Mapping[str, PathLike | None] | None = None,
    model_writable: bool = False,
) -> None:
    """Refuse any output that is an input of the run, not a regular file, or not writable.

    Args:
        model: The model the run reads (its external data files are inputs too): loaded (the run's one
            parse, whose external data locations are read from it) or a path.
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
    locations = _external_locations(model)
    if isinstance(model, LoadedModel):
        model = model.path
    externals = {} if model is None else external_files(locations, Path(model).parent)
    if model is not None and not model_writable:
        inputs["the input model"] = model
    check_outputs(outputs, {**inputs, **externals})
    for option, out in ((o, Path(p)) for o, p in outputs.items() if p is not None and o.startswith("-o")):
        replaces_model = model_writable and model is not None and same_file(out, model)
        read = inputs if replaces_model else {**inputs, **externals}
        data_file = out.with_name(out.name + ".data")
        if len(os.fsencode(data_file.name)) <= NAME_MAX:  # longer, no such file can exist
            check_outputs({f"{option} (its data file)": data_file}, read)


NAME_MAX = 255
"""The longest file name, in bytes, of Linux, macOS and Windows file systems."""


def refuse_overwrite(
    model: PathLike, output: PathLike | None, force: bool, hint: str = "choose another -o, or pass --force"
) -> None:
    """``-o`` naming the input model is refused unless ``--force`` allows it (fold, recalibrate, quantize)."""
    if output is not None and same_file(model, output) and not force:
        raise BnscopeError(f"refusing to overwrite the input model {model}. Hint: {hint}")


def _external_locations(model: PathLike | LoadedModel | None) -> list[str]:
    """External data locations named by the model; none when it cannot be read (the workflow will
    refuse it with its own message). A loaded model is not parsed again; a path is parsed once per
    version of the file."""
    if model is None:
        return []
    if isinstance(model, LoadedModel):
        return list(_locations(model.model))
    path = Path(model)
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
    return _locations(model)


def _locations(model: onnx.ModelProto) -> tuple[str, ...]:
    return tuple(e.value for t in all_tensors(model) if is_external(t) for e in t.external_data if e.key == "location")
