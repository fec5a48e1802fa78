"""The explicit map from an instrumented model's outputs to layers and statistics: :class:`Tap`
(one BN layer) and :class:`Pack` (one graph output holding many taps' statistics)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tap:
    """Where one BN layer's statistics come out of the instrumented model."""

    layer: str
    channels: int
    strategy: str
    # statistic -> tensor: "s1"/"s2" (input_sums: per-sample shifted sums) or "m1"/"m2"
    # (output_pool: per-sample means of y and y*y), each (N, C, ...) inside a Pack; "shape" (a
    # graph output of its own) only when ``spatial`` is not static.
    outputs: dict
    shift: np.ndarray  # the running mean c (input_sums shift by the batch's own first value instead)
    gain: np.ndarray | None = None  # a for output_pool
    offset: np.ndarray | None = None  # b for output_pool
    spatial: int | None = None  # values per sample and channel; None: read "shape" each batch
    flat: bool = False  # statistics are (N, C * spatial) values (summed on the host), not (N, C)

    @property
    def columns(self) -> int:
        """Columns of each statistic in its pack."""
        return self.channels * (self.spatial if self.flat else 1)


@dataclass(frozen=True)
class Pack:
    """One graph output: every tap's first statistic side by side, then every second statistic in
    the same order, each summed over the batch's samples, so each half is one contiguous block of
    columns; and ``samples``, the Shape of the (N, 2W, ...) concatenation they were summed from."""

    output: str
    samples: str
    layers: tuple[str, ...]  # the tap of each first (and its second), in column order
    firsts: tuple[str, ...]
    seconds: tuple[str, ...]
    widths: tuple[int, ...]  # columns of each first (and its second): channels, or channels x spatial if flat
    shifts: tuple[str, ...] = ()  # input_sums and flat taps: each one's shift t0, (1, columns), a third block
    direct: bool = False  # train mode: the halves are the batch's mean and variance, not sums

    @property
    def width(self) -> int:
        """Columns in each half."""
        return int(sum(self.widths))
