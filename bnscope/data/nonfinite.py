"""NaN/Inf in input data: the one count and the one message every command uses (``fold`` and ``run``
refuse them, ``stats`` refuses them unless ``--allow-nonfinite``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from bnscope.errors import BnscopeError

if TYPE_CHECKING:
    from bnscope.data.spec import DataSource


def nonfinite_count(batch: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Returns the number of NaN/Inf values per array (0 for integer and bool arrays)."""
    counts = {}
    for name, value in batch.items():
        array = np.asarray(value)
        counts[name] = int(array.size - np.count_nonzero(np.isfinite(array))) if array.dtype.kind in "fc" else 0
    return counts


def nonfinite_error(
    source: DataSource, counts: Mapping[str, int], number: int, why: str, hint: str
) -> BnscopeError | None:
    """The one NaN/Inf message on input data: the error naming the batch and each input holding NaN/Inf
    (``counts``, from :func:`nonfinite_count`), or None when there is none.

    Args:
        source: Where the batch came from (its ``description`` opens the message). number: the batch's
            number, from 1. why: what NaN/Inf would do there. hint: what to do.
    """
    where = ", ".join(f"{count} in '{name}'" for name, count in counts.items() if count)
    if not where:
        return None
    return BnscopeError(f"{source.description}: batch {number} holds NaN/Inf values ({where}); {why}. Hint: {hint}")


def refuse_nonfinite(batch: Mapping[str, np.ndarray], source: DataSource, number: int, why: str, hint: str) -> None:
    """Raises :func:`nonfinite_error` when ``batch`` holds NaN/Inf."""
    error = nonfinite_error(source, nonfinite_count(batch), number, why, hint)
    if error is not None:
        raise error
