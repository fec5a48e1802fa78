"""Fixtures shared by the tests; the graph builders are in graphs.py, the other helpers in helpers.py.

Tests marked ``slow`` (rebuilding the sample models, fresh ``bnscope`` processes, the real exported
models) are left out of a plain ``python -m pytest``, which stays quick; ``--runslow`` runs them too
(CI does), and ``-m slow``, a test file or a test's node id selects them as usual.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import REAL_MODELS


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="Also run the tests marked slow (CI does).")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    named = any(Path(arg.split("::")[0]).is_file() for arg in config.args)  # a file or a test named: run it all
    if config.getoption("--runslow") or config.option.markexpr or named:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    if not (config.getoption("--runslow") or config.option.markexpr):
        lines.append("slow tests (rebuilds, fresh processes, real models) left out: --runslow runs them too")
    if not REAL_MODELS.is_dir():
        lines.append(f"real exported models absent ({REAL_MODELS}): the tests that need them skip")
    return lines


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator, so every test draws the same values."""
    return np.random.default_rng(0)
