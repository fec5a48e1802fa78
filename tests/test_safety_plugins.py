"""Plugin libraries load only when the user names them (issue 19).

A real shared library whose constructor writes a marker file stands in for a hostile plugin: a
``pyproject.toml`` or ``bnscope.toml`` in the working directory (a cloned repository) that lists it
under ``ep_libraries`` must not make any command dlopen it. Naming it (``--ep-library``, or the
config file with ``--config``) is the user's choice, and then it loads.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from graphs import bn_inits, bn_node, make_model, vi

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow  # a C library built and fresh bnscope processes
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the library")
needs_plugin_api = pytest.mark.skipif(
    not hasattr(ort, "register_execution_provider_library"), reason="onnxruntime < 1.22 has no plugin EPs"
)

_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("BNSCOPE_TEST_MARKER"), "w");
    if (f) { fputs("loaded\n", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def evil_library(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("evil")
    (folder / "evil.c").write_text(_SOURCE)
    library = folder / "libevil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(folder / "evil.c")], check=True)
    return library


@pytest.fixture
def cloned_repo(tmp_path, evil_library, rng):
    """A working directory holding the library, a pyproject.toml and a bnscope.toml that list it, and a model."""
    shutil.copy(evil_library, tmp_path / "libevil.so")
    table = 'ep_libraries = { evil = "libevil.so" }\n'
    (tmp_path / "pyproject.toml").write_text("[tool.bnscope]\n" + table)
    (tmp_path / "bnscope.toml").write_text(table)
    model = make_model([bn_node("x", "y")], [vi("x", [2, 3, 4, 4])], [vi("y", [2, 3, 4, 4])], bn_inits(rng, 3))
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    np.save(tmp_path / "x.npy", rng.standard_normal((4, 3, 4, 4)).astype(np.float32))
    return tmp_path


def _bnscope(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "BNSCOPE_TEST_MARKER": str(folder / "MARKER"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "bnscope", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=120
    )


@needs_gcc
@needs_plugin_api
def test_library_is_loaded_when_named_so_the_marker_works(cloned_repo):
    result = _bnscope(cloned_repo, "providers", "--ep-library", "evil=./libevil.so")
    assert result.returncode == 0, result.stderr
    assert (cloned_repo / "MARKER").read_text() == "loaded\n"


@needs_gcc
@needs_plugin_api
@pytest.mark.parametrize("config", ["pyproject.toml", "bnscope.toml"])
def test_library_is_loaded_from_a_config_named_with_config(cloned_repo, config):
    result = _bnscope(cloned_repo, "providers", "--config", config)
    assert result.returncode == 0, result.stderr
    assert (cloned_repo / "MARKER").exists()


@needs_gcc
@pytest.mark.parametrize(
    "args",
    [
        ["providers"],
        ["providers", "--format", "json"],
        ["run", "m.onnx", "--random", "--runs", "1", "-p", "evil"],
        ["run", "m.onnx", "--random", "--runs", "1", "-p", "EvilExecutionProvider"],
        ["stats", "m.onnx", "--random", "-p", "evil"],
        ["fold", "m.onnx", "-o", "out.onnx", "-p", "evil"],
        ["check", "m.onnx", "--enable", "fold_verified", "-p", "evil"],
        ["check", "m.onnx"],
        ["recalibrate", "m.onnx", "--data", "x.npy", "-o", "re.onnx", "-p", "evil"],
    ],
)
def test_config_in_the_working_directory_loads_no_library(cloned_repo, args):
    result = _bnscope(cloned_repo, *args)
    assert not (cloned_repo / "MARKER").exists(), f"{args} loaded ./libevil.so: {result.stderr}"
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert result.returncode in (0, 1, 2)
    if "-p" in args:
        assert result.returncode == 2 and "evil" in result.stderr.lower()
