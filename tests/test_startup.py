"""Start-up: ``--help`` loads neither onnx nor onnxruntime, and ``import bnscope`` has no side effects.

onnx imports ml_dtypes, whose 0.7.0 extension alone takes over a second to import (issue 20), and
onnxruntime's import writes log lines on fd 2 with an unwritable HOME: the help of every command
must not pay for either. Checked in a fresh interpreter with ``python -X importtime``, which lists
every module the process imported. Times are measured in benchmarks/bench_startup.py, not here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import SAMPLES

from bnscope.cli.main import COMMANDS

pytestmark = pytest.mark.slow  # fresh interpreters

HEAVY = ("onnx", "onnxruntime", "ml_dtypes", "numpy")  # numpy: the renderers import it on use only


def _imported(*args: str) -> set[str]:
    """Every module ``python -X importtime *args`` imported, by name."""
    run = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


@pytest.mark.parametrize("command", ["", *sorted(c.__name__ for c in COMMANDS)])
def test_help_imports_neither_onnx_nor_onnxruntime(command):
    modules = _imported("-m", "bnscope", *command.split(), "--help")
    assert "bnscope.cli.main" in modules  # the check saw the CLI's imports
    assert _heavy(modules) == [], f"bnscope {command} --help imported {_heavy(modules)[:5]}"


def test_import_bnscope_imports_no_runtime_and_keeps_fd_2():
    """The library's import neither imports onnxruntime (with fd 2 redirected) nor anything heavy;
    the public API loads on first use."""
    assert _heavy(_imported("-c", "import bnscope")) == []
    modules = _imported("-c", "import bnscope; bnscope.inspect_model")
    assert "onnx" in modules and "bnscope.runtime.quiet" not in modules


def test_inspect_reads_the_graph_without_onnxruntime():
    """inspect never runs a model: it pays for onnx, not for onnxruntime's import (0.09 s here)."""
    modules = _imported("-m", "bnscope", "inspect", str(SAMPLES / "resnet_small.onnx"))
    assert "bnscope.workflows.inspect" in modules and "onnx" in modules
    assert "onnxruntime" not in modules
