"""Opening calibration data: a file, a folder, a loader script or random data -> a DataSource.

* An array whose rank is one less than its model input's rank holds one sample and gets a batch axis
  (``(3, 32, 32)`` for an input ``[N, 3, 32, 32]``); an array of the full rank holds ``shape[0]`` samples.
* Folders are read in name order (plain string sort: zero-pad numbers), one file at a time; ``.npy``
  files are memory-mapped. Nothing is ever unpickled (``allow_pickle=False`` everywhere).
* Feeds are used as given, one batch each, ``batch_size`` not applying, from a ``loader`` script
  (Polygraphy's data-loader convention: a function that returns or yields feed dicts; a bare array
  feeds a single-input model) and from ONNX test data (``input_0.pb``... in a folder or in each of its
  ``test_data_set_*`` folders; a tensor goes to the input it names, else to input ``i`` of
  ``input_<i>.pb``): model-ready tensors whose first axis need not be a sample axis.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from bnscope.data.files import ARRAY_SUFFIXES, PB_NAME, open_arrays, open_pb, pb_files
from bnscope.data.generators import open_loader, open_random
from bnscope.data.images import IMAGE_SUFFIXES, ImageOptions, open_images
from bnscope.data.spec import DataSource, InputSpec
from bnscope.errors import BnscopeError
from bnscope.onnxio.outputs import check_input_file

logger = logging.getLogger(__name__)


def open_source(
    spec: str | Path | None,
    inputs: list[InputSpec],
    *,
    random: bool = False,
    seed: int = 0,
    random_samples: int = 32,
    loader: str | None = None,
    image_options: ImageOptions | None = None,
) -> DataSource:
    """Opens calibration data for a model's inputs; exactly one of spec, random and loader.

    Args:
        spec: an .npz/.npy/.pb/image file, or a folder of .npy/.npz files, images, ONNX test data
            (``input_0.pb``...) or ``test_data_set_*`` folders.
        inputs: the model's inputs, from :func:`input_specs`.
        random: seeded standard-normal data instead of real data. Defaults to False.
        seed: the random seed. Defaults to 0.
        random_samples: how many random samples. Defaults to 32.
        loader: ``"file.py:func"``: imports file.py (runs its code) and iterates ``func()``.
            ``func`` defaults to ``load_data``.
        image_options: how to turn images into tensors. Defaults to ImageOptions().
    """
    if not inputs:
        raise BnscopeError("the model has no inputs to feed. Hint: bnscope needs a model with at least one input")
    chosen = [n for n, on in (("a data path", spec is not None), ("random", random), ("a loader", loader)) if on]
    if len(chosen) > 1:
        raise BnscopeError(f"got {' and '.join(chosen)} as calibration data. Hint: choose one")
    if random:
        source: DataSource = open_random(inputs, seed, random_samples)
    elif loader:
        source = open_loader(loader, inputs)
    elif spec is None:
        raise BnscopeError(
            "no calibration data given. Hint: pass --data FILE (.npz/.npy/.pb, or a folder of them or of images), "
            "--loader FILE.PY:FUNC, or --random (seeded random inputs, to try the pipeline)"
        )
    else:
        path = Path(spec)
        if not path.exists():
            raise BnscopeError(f"{path} does not exist. Hint: check the data path")
        if not path.is_dir():
            check_input_file(path, "data file", "pass a .npz/.npy/.pb/image file or a folder of them")
        source = _open_dir(path, inputs, image_options) if path.is_dir() else _open_file(path, inputs, image_options)
    if source.samples == 0:
        raise BnscopeError(f"{source.description} holds no samples. Hint: give at least one sample")
    logger.debug("calibration data: %s", source.description)
    return source


def _open_file(path: Path, inputs: list[InputSpec], image_options: ImageOptions | None) -> DataSource:
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        return open_arrays(path, [path], inputs)
    if suffix == ".pb":
        return open_pb(path, [[path]], inputs)
    if suffix in IMAGE_SUFFIXES:
        return open_images(path, [path], inputs, image_options or ImageOptions())
    raise BnscopeError(
        f"{path} is not a data file bnscope reads ({suffix or 'no suffix'}). "
        "Hint: use .npz, .npy, ONNX .pb, PNG/JPEG, or a folder of them"
    )


def _open_dir(folder: Path, inputs: list[InputSpec], image_options: ImageOptions | None) -> DataSource:
    children = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    files = [p for p in children if p.is_file()]
    kinds = {
        "test_data_set_* folders": [p for p in children if p.is_dir() and p.name.startswith("test_data_set_")],
        "input_*.pb files": [p for p in files if PB_NAME.fullmatch(p.name)],
        ".npy/.npz files": [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES],
        "images": [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
    }
    found = {kind: paths for kind, paths in kinds.items() if paths}
    if not found:
        raise BnscopeError(f"{folder} holds no .npy, .npz, .pb or image files. Hint: check the data folder")
    if len(found) > 1:
        raise BnscopeError(f"{folder} mixes {' and '.join(found)}. Hint: keep one kind of data per folder")
    kind, paths = found.popitem()
    if kind == "test_data_set_* folders":
        return open_pb(folder, [pb_files(p) for p in sorted(paths, key=_natural_key)], inputs)
    if kind == "input_*.pb files":
        return open_pb(folder, [pb_files(folder)], inputs)
    if kind == "images":
        return open_images(folder, paths, inputs, image_options or ImageOptions())
    return open_arrays(folder, paths, inputs)


def _natural_key(path: Path) -> tuple[int, str]:
    digits = re.search(r"(\d+)$", path.name)
    return (int(digits.group(1)) if digits else sys.maxsize, path.name)
