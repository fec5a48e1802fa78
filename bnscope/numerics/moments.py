"""Moments (per channel, over all values that share a channel). ``Moments`` holds the count
``n``, the mean and ``M2 = sum((x - mean)^2)``; population variance is ``M2 / n``. Two sets
merge with Chan et al.'s parallel formula, which adds only non-negative terms:
    delta = mean_b - mean_a;  n = n_a + n_b
    mean = mean_a + delta * n_b / n;  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n
Sums taken by a runtime in float32 are shifted first: with ``c`` near the mean (the stored
running mean), ``s1 = sum(x - c)``, ``s2 = sum((x - c)^2)`` give, in float64,
``mean = c + s1 / n`` and ``M2 = max(s2 - s1^2 / n, 0)``. Without the shift, float32
``E[x^2] - E[x]^2`` loses everything once ``|mean| / std`` reaches about 1e3.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

F64 = np.float64


def as_vector(x) -> np.ndarray:
    """Returns ``x`` as a 1-D float64 array (a scalar becomes shape (1,))."""
    return np.atleast_1d(np.asarray(x, dtype=F64)).reshape(-1)


@dataclass
class Moments:
    """Count, mean and sum of squared deviations (M2) per channel, mergeable.

    Attributes:
        count: Number of values reduced per channel (the same for every channel).
        mean: Per-channel mean, float64, shape (C,).
        m2: Per-channel ``sum((x - mean)^2)``, float64, shape (C,).
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def __post_init__(self) -> None:
        self.count = int(self.count)
        self.mean, self.m2 = as_vector(self.mean), as_vector(self.m2)
        if self.count < 0 or self.mean.shape != self.m2.shape:
            raise ValueError(f"bad moments: count {self.count}, mean {self.mean.shape}, m2 {self.m2.shape}")

    @property
    def channels(self) -> int:
        """Number of channels."""
        return self.mean.shape[0]

    def variance(self, ddof: int = 0) -> np.ndarray:
        """Per-channel variance ``M2 / (count - ddof)``; NaN when ``count <= ddof``.

        Args:
            ddof: Delta degrees of freedom. Defaults to 0 (population, what BN uses);
                1 gives the unbiased estimate.
        """
        if self.count <= ddof:
            return np.full(self.channels, np.nan)
        return self.m2 / (self.count - ddof)

    def merge(self, other: Moments) -> Moments:
        """Combines two disjoint sets of values with Chan et al.'s parallel formula."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {self.channels} and {other.channels} channels")
        if other.count == 0 or self.count == 0:
            src = self if other.count == 0 else other
            return Moments(src.count, src.mean.copy(), src.m2.copy())
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @classmethod
    def empty(cls, channels: int) -> Moments:
        """Returns the identity of ``merge``: count 0, zero mean and M2."""
        return cls(0, np.zeros(channels), np.zeros(channels))

    @classmethod
    def from_shifted_sums(cls, count: int, s1, s2, shift) -> Moments:
        """Builds moments from shifted sums, typically float32 reductions from the runtime.

        Args:
            count: Values summed per channel.
            s1: Per-channel ``sum(x - shift)``.
            s2: Per-channel ``sum((x - shift)^2)``.
            shift: Per-channel (or scalar) shift ``c``; the closer to the mean, the more exact.
        """
        s1, s2 = as_vector(s1), as_vector(s2)
        if count == 0:
            return cls.empty(s1.shape[0])
        shift = np.broadcast_to(np.asarray(shift, dtype=F64), s1.shape)
        m2 = np.maximum(s2 - s1 * s1 / count, 0.0)
        return cls(count, shift + s1 / count, m2)

    @classmethod
    def from_array(cls, x, channel_axis: int = 1) -> Moments:
        """Exact two-pass float64 moments of ``x`` per channel (a reference for small data).

        Args:
            x: Array holding the channels on ``channel_axis``.
            channel_axis: Axis of the channels. Defaults to 1 (NCHW).
        """
        flat = np.moveaxis(np.asarray(x, dtype=F64), channel_axis, 0)
        flat = flat.reshape(flat.shape[0], -1)
        if flat.shape[1] == 0:
            return cls.empty(flat.shape[0])
        mean = flat.mean(axis=1)
        return cls(flat.shape[1], mean, ((flat - mean[:, None]) ** 2).sum(axis=1))

    def to_dict(self) -> dict:
        """Returns ``{"count", "mean", "m2"}`` with plain lists, for JSON."""
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> Moments:
        """Inverse of ``to_dict``."""
        return cls(data["count"], data["mean"], data["m2"])


def merge_all(moments: Iterable[Moments], channels: int | None = None) -> Moments:
    """Merges many moments by pairwise tree reduction (error grows with log of their number).

    Args:
        moments: Moments over disjoint data, all with the same channels.
        channels: Channels of the result when ``moments`` is empty. Defaults to None
            (an empty input then raises ValueError).
    """
    items = list(moments)
    if not items:
        if channels is None:
            raise ValueError("merge_all of nothing needs channels")
        return Moments.empty(channels)
    while len(items) > 1:
        pairs = [items[i].merge(items[i + 1]) for i in range(0, len(items) - 1, 2)]
        items = pairs + ([items[-1]] if len(items) % 2 else [])
    return items[0]


@dataclass
class BatchSpread:
    """Streaming Welford accumulator over per-batch means: how noisy BN batch statistics are.

    Each batch counts once, whatever its size. Memory is O(C).

    Attributes:
        moments: Moments over batch means (``count`` is the number of batches).
    """

    moments: Moments

    @classmethod
    def empty(cls, channels: int) -> BatchSpread:
        """Returns an accumulator that has seen no batch."""
        return cls(Moments.empty(channels))

    def update(self, batch_mean) -> None:
        """Adds one batch's per-channel mean (Welford's step, Chan's formula with n_b = 1)."""
        one = Moments(1, batch_mean, np.zeros_like(as_vector(batch_mean)))
        self.moments = self.moments.merge(one)

    def merge(self, other: BatchSpread) -> BatchSpread:
        """Combines two accumulators over disjoint sets of batches."""
        return BatchSpread(self.moments.merge(other.moments))

    @property
    def batches(self) -> int:
        """Number of batches seen."""
        return self.moments.count

    def std(self, ddof: int = 1) -> np.ndarray:
        """Per-channel standard deviation of batch means; NaN with ``batches <= ddof``.

        Args:
            ddof: Delta degrees of freedom. Defaults to 1 (unbiased variance).
        """
        return np.sqrt(self.moments.variance(ddof))
