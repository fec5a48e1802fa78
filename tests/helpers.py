"""What the tests share besides graph builders (graphs.py): the sample files, the real models, the
in-process CLI and what every input error must look like, models saved with external data.

A plain module the tests import (``from helpers import RESNET, cli``); fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from bnscope.cli.main import app

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
RESNET = SAMPLES / "resnet_small.onnx"
CALIB = SAMPLES / "resnet_small_calib.npz"
SHIFTED = SAMPLES / "resnet_small_shifted.npz"
BROKEN = SAMPLES / "broken.onnx"
BROKEN_CALIB = SAMPLES / "broken_calib.npz"
RESNET_BN = ["stem_bn", "block1_bn1", "block1_bn2", "block2_bn1", "block2_bn2", "block2_proj_bn"]

REAL_MODELS = Path(
    os.environ.get("BNSCOPE_REAL_MODELS", Path(__file__).resolve().parents[2] / "shared" / "real-models")
)
"""Real exports (PyTorch, Keras, Paddle, ONNX's node tests) that are not in the repository: ``../shared/real-models``
beside the checkout, or the folder ``BNSCOPE_REAL_MODELS`` names."""
needs_real_models = pytest.mark.skipif(
    not REAL_MODELS.is_dir(),
    reason=f"needs the real exported models, not in the repository: {REAL_MODELS} is absent "
    "(set BNSCOPE_REAL_MODELS to a folder of them)",
)


def cli(*args, env: dict | None = None):
    """Runs ``bnscope ARGS`` in-process at a pinned terminal width (COLUMNS=120 unless ``env`` says)."""
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "120", **(env or {})})


def assert_input_error(result, *needles: str) -> str:
    """Exit 2, nothing on stdout, one line on stderr (containing every needle), no traceback."""
    assert result.exit_code == 2, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("error:")
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def json_out(result) -> dict:
    """stdout as JSON, which carries the schema version."""
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    return doc


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def save_external(model: onnx.ModelProto, folder: Path, location: str = "weights.bin", threshold: int = 0) -> Path:
    """Saves a copy as ``folder/model.onnx`` with every tensor of at least ``threshold`` bytes in
    ``folder/location`` (onnx.save_model converts the model it is given in place)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    onnx.save_model(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=threshold,
    )
    return path


def relocate_external(path: Path, location: str) -> None:
    """Points every external tensor of the saved model at ``location`` (no data is moved)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def moments64(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The oracle for statistics: float64 per-channel mean and population variance of an NC... tensor
    over N and every spatial axis, with numpy (never bnscope's own ``Moments``)."""
    axes = (0,) + tuple(range(2, h.ndim))
    h = h.astype(np.float64)
    return h.mean(axis=axes), h.var(axis=axes)
