"""Fixtures shared by the tests; the graph builders they use are in graphs.py."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator, so every test draws the same values."""
    return np.random.default_rng(0)
