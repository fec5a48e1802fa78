"""Host-side merging of every tap's per-batch statistics in one vectorised float64 step.

All layers' channels are laid end to end, so a batch costs a handful of numpy calls whatever the
number of BN layers (per-layer Python work made the host, not the runtime, the bottleneck on
small, deep models). The merge is :meth:`bnscope.numerics.Moments.merge` (Chan et al.) with a
per-channel count; :func:`batch_moments` gives one tap's moments of one batch with the same code.
"""

from __future__ import annotations

import numpy as np

from bnscope import numerics
from bnscope.instrument import OUTPUT_POOL, Tap


class TapAccumulator:
    """Float64 count / mean / M2 per channel for all taps, plus the spread of batch means."""

    def __init__(self, taps: list[Tap]):
        self.taps = taps
        self.sums = [t for t in taps if t.strategy != OUTPUT_POOL]
        self.pools = [t for t in taps if t.strategy == OUTPUT_POOL]
        ordered = self.sums + self.pools
        self.channels = np.array([t.channels for t in ordered])
        self.shift = _cat([t.shift for t in self.sums])
        self.gain = _cat([t.gain for t in self.pools])
        self.offset = _cat([t.offset for t in self.pools])
        size = int(self.channels.sum())
        self.count = np.zeros(size)
        self.mean = np.zeros(size)
        self.m2 = np.zeros(size)
        self.batches = 0
        self.spread_mean = np.zeros(size)
        self.spread_m2 = np.zeros(size)
        self._order = [t.layer for t in ordered]

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        """Merge one batch (the instrumented model's outputs by name)."""
        count, mean, m2 = self._batch(outputs)
        self._merge(count, mean, m2)
        self.batches += 1
        delta = mean - self.spread_mean  # Welford over batch means, each batch counted once
        self.spread_mean += delta / self.batches
        self.spread_m2 += delta * (mean - self.spread_mean)

    def _batch(self, outputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This batch's float64 count, mean and M2 per channel, all layers end to end."""
        parts = [p for p in (self._sums_batch(outputs), self._pools_batch(outputs)) if p is not None]
        return tuple(np.concatenate(x) for x in zip(*parts))

    def _sums_batch(self, outputs):
        if not self.sums:
            return None
        s1 = np.concatenate([outputs[t.outputs["s1"]].reshape(-1) for t in self.sums]).astype(np.float64)
        s2 = np.concatenate([outputs[t.outputs["s2"]].reshape(-1) for t in self.sums]).astype(np.float64)
        counts = np.repeat([_per_channel_count(outputs[t.outputs["shape"]], t.channels) for t in self.sums],
                           [t.channels for t in self.sums]).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.shift + s1 / counts
            m2 = np.maximum(s2 - s1 * s1 / counts, 0.0)
        return counts, mean, m2

    def _pools_batch(self, outputs):
        if not self.pools:
            return None
        shapes = [[int(d) for d in outputs[t.outputs["shape"]]] for t in self.pools]
        n = shapes[0][0]
        m1 = np.concatenate([outputs[t.outputs["m1"]].reshape(n, t.channels) for t in self.pools], axis=1)
        sq = np.concatenate([outputs[t.outputs["m2"]].reshape(n, t.channels) for t in self.pools], axis=1)
        per_sample = np.repeat([int(np.prod(s[2:])) for s in shapes], [t.channels for t in self.pools]).astype(np.float64)
        m1, sq = m1.astype(np.float64), sq.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            m2_y = np.maximum(sq - m1 * m1, 0.0) * per_sample
            mean_x = (m1 - self.offset) / self.gain
            m2_x = m2_y / (self.gain * self.gain)
            mean = mean_x.mean(axis=0)
            m2 = m2_x.sum(axis=0) + per_sample * ((mean_x - mean) ** 2).sum(axis=0)
        return n * per_sample, mean, m2

    def _merge(self, count, mean, m2) -> None:
        total = self.count + count
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = mean - self.mean
            share = np.where(total > 0, count / np.where(total > 0, total, 1), 0.0)
            self.mean = self.mean + delta * share
            self.m2 = self.m2 + m2 + delta * delta * self.count * share
        self.count = total

    def layer_moments(self) -> dict[str, tuple[numerics.Moments, numerics.BatchSpread]]:
        """Per layer: the moments over all data and the accumulator of batch means."""
        out = {}
        start = 0
        for name, c in zip(self._order, self.channels):
            sl = slice(start, start + int(c))
            count = int(self.count[sl][0]) if c else 0
            moments = numerics.Moments(count, self.mean[sl].copy(), self.m2[sl].copy())
            spread = numerics.BatchSpread(numerics.Moments(self.batches, self.spread_mean[sl].copy(),
                                                           self.spread_m2[sl].copy()))
            out[name] = (moments, spread)
            start += int(c)
        return out


def batch_moments(tap: Tap, outputs: dict[str, np.ndarray]) -> numerics.Moments:
    """One batch's float64 moments of one tap's BN input (the accumulator's maths, one layer)."""
    count, mean, m2 = TapAccumulator([tap])._batch(outputs)
    return numerics.Moments(int(count[0]) if count.size else 0, mean, m2)


def _cat(arrays) -> np.ndarray:
    arrays = [np.asarray(a, np.float64).reshape(-1) for a in arrays if a is not None]
    return np.concatenate(arrays) if arrays else np.zeros(0)


def _per_channel_count(shape: np.ndarray, channels: int) -> int:
    return int(np.prod([int(d) for d in shape])) // max(channels, 1)
