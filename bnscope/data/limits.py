"""Sizes checked before memory is allocated: what data claims to hold, and what a batch would take.

A forged ``.npy`` header can claim 10^9 samples, and a model can fix its batch size to 10^9; numpy
would try to allocate terabytes (or grow until the system kills the process). Declared array sizes
are compared with the bytes a file really holds (:mod:`bnscope.data.files`), and generated batches
with :data:`MAX_BATCH_BYTES`, before anything is allocated.
"""

from __future__ import annotations

import math

import numpy as np

from bnscope.errors import BnscopeError

MAX_BATCH_BYTES = 4 << 30
"""The largest batch of generated (random) data bnscope allocates: 4 GiB."""


def format_bytes(count: int) -> str:
    """``1.5 GiB`` for messages."""
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def check_generated_batch(name: str, rows: int, sample_shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse a generated batch of ``rows`` samples of ``sample_shape`` over :data:`MAX_BATCH_BYTES`."""
    needed = rows * math.prod(sample_shape) * np.dtype(dtype).itemsize
    if needed > MAX_BATCH_BYTES:
        raise BnscopeError(
            f"a random batch of {rows} samples for input '{name}' would take {format_bytes(needed)} "
            f"(more than {format_bytes(MAX_BATCH_BYTES)}). Hint: use a smaller --batch-size; a model that fixes "
            "a batch this large needs re-exporting with a dynamic or smaller batch"
        )
