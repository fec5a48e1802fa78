"""Host-side merging of every tap's per-batch statistics in one vectorised float64 step.

All layers' channels are laid end to end, so a batch costs a handful of numpy calls per packed
output (:class:`bnscope.stats.instrument.Pack`) on O(C) numbers, whatever the number of BN layers
and the batch size (the graph has already summed over the samples).

Both tap strategies deliver, per channel, the sums over the batch's N samples of a first and a
second per-sample statistic of the tapped tensor t over the sample's ``spatial`` values: input_sums
of the sums of t = x - c and t^2, output_pool of the means of t = y and y^2. With ``divisor`` =
N * spatial (sums) or N (means) they become the batch's mean u and mean square v of t; t = gain * x
+ offset gives x's batch mean (u - offset) / gain and M2 = max(v - u^2, 0) * N * spatial / gain^2
(input_sums: gain 1, offset -c). Batches merge by :meth:`bnscope.numerics.Moments.merge` (Chan et
al.) in float64. A statistic that is not finite marks the batch (:attr:`TapAccumulator.finite`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnscope import numerics
from bnscope.stats.instrument import OUTPUT_POOL, InstrumentedModel

# output_pool reads t = gain * x + offset and forms float32 E[t^2] - E[t]^2, which loses about
# 3 eps32 E[t]^2 of the variance: past this many spreads (sqrt(var + 1e-5), in x units) from zero,
# more than 2e-5 of var + eps. Data far from the running statistics put t there.
FAR_OFF_CENTRE = 10.0


@dataclass(frozen=True)
class _Columns:
    """One packed output: the first statistics fill columns [0, width), the second ones
    [width, 2 width), a flat pack's shifts [2 width, 3 width); ``channels`` are the columns'
    positions in the end-to-end channel layout, ``positions`` each channel once."""

    output: str
    samples: str  # the Shape output whose first value is the batch's sample count
    width: int
    channels: np.ndarray  # the channel of each column (flat taps: each channel's values in a row)
    positions: np.ndarray
    flat: bool  # one column per value (flat taps), else per channel
    shifted: bool  # a third block holds each column's shift t0
    in_order: bool  # one column per channel, channels 0, 1, 2, ...: results need no scatter
    direct: bool = False  # train mode: the batch's mean and variance per channel


class TapAccumulator:
    """Float64 count / mean / M2 per channel for all taps, plus the spread of batch means."""

    def __init__(self, instrumented: InstrumentedModel):
        self.taps = taps = instrumented.taps
        self.channels = np.array([t.channels for t in taps], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.channels)[:-1]]).astype(np.int64)

        def per_channel(f):
            return (
                np.concatenate([np.broadcast_to(np.asarray(f(t), np.float64), (t.channels,)) for t in taps])
                if taps
                else np.zeros(0)
            )

        self.gain = per_channel(lambda t: t.gain if t.strategy == OUTPUT_POOL else 1.0)
        self.offset = per_channel(lambda t: t.offset if t.strategy == OUTPUT_POOL else 0.0)
        self.is_sum = per_channel(lambda t: float(t.strategy != OUTPUT_POOL or t.flat)) > 0
        self.spatial = per_channel(lambda t: t.spatial if t.spatial is not None else np.nan)
        self.dynamic = [(t, int(s)) for t, s in zip(taps, self.starts) if t.spatial is None]
        self.columns = _columns(instrumented, self.starts)
        size = int(self.channels.sum())
        self.count, self.mean, self.m2 = np.zeros(size), np.zeros(size), np.zeros(size)
        self.batches = 0
        self.finite = True  # the last batch's statistics were all finite
        self.spread_mean, self.spread_m2 = np.zeros(size), np.zeros(size)

    def add_batch(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        """Merge one batch's count, mean and M2 (from :meth:`batch`, here or in another process)."""
        self._merge(count, mean, m2)
        self.batches += 1
        with np.errstate(invalid="ignore", over="ignore"):  # Inf in a batch: NaN, reported broken
            delta = mean - self.spread_mean  # Welford over batch means, each batch counted once
            self.spread_mean += delta / self.batches
            self.spread_m2 += delta * (mean - self.spread_mean)

    def batch(self, outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This batch's float64 count, mean and M2 per channel, all layers end to end; sets
        :attr:`finite`."""
        spatial = self._spatial(outputs)
        self.finite = all(np.isfinite(outputs[cols.output]).all() for cols in self.columns)
        only = self.columns[0] if len(self.columns) == 1 else None
        if only is not None and only.in_order and not (only.shifted or only.flat):  # the usual case
            return self._moments(only, outputs, spatial)
        count, mean, m2 = (np.zeros_like(spatial) for _ in range(3))
        for cols in self.columns:
            pos = cols.positions
            per_value = cols.shifted or cols.flat
            moments = (
                self._shifted_moments(cols, outputs, spatial) if per_value else self._moments(cols, outputs, spatial)
            )
            count[pos], mean[pos], m2[pos] = moments
        return count, mean, m2

    def _moments(self, cols: _Columns, outputs, spatial: np.ndarray):
        return (self._direct_moments if cols.direct else self._pack_moments)(cols, outputs, spatial)

    def _direct_moments(self, cols: _Columns, outputs, spatial: np.ndarray):
        """Train mode: the batch's mean and (population) variance per channel, as BN normalised."""
        stats = outputs[cols.output].astype(np.float64)
        pos = slice(None) if cols.in_order else cols.positions
        count = int(outputs[cols.samples][0]) * spatial[pos]
        with np.errstate(invalid="ignore"):
            return count, stats[: cols.width], np.maximum(stats[cols.width :], 0.0) * count

    def _pack_moments(self, cols: _Columns, outputs, spatial: np.ndarray):
        """Pooled taps: per channel, sums over the samples of per-sample statistics."""
        sums = outputs[cols.output].astype(np.float64)
        samples = int(outputs[cols.samples][0])
        pos = slice(None) if cols.in_order else cols.positions
        first, second = sums[: cols.width], sums[cols.width :]
        return _batch_moments(first, second, samples, spatial[pos], self.is_sum[pos], self.gain[pos], self.offset[pos])

    def _shifted_moments(self, cols: _Columns, outputs, spatial: np.ndarray):
        """Shifted and flat taps: per column, sums over the batch of d = t - t0 and d^2 (k = N values
        a column if flat, else N * spatial), and t0 (0 for unshifted flat taps). Each column's mean and M2 in float64, then each
        channel's by Chan's rule over its columns (equal counts)."""
        sums = outputs[cols.output].astype(np.float64)
        n, width, size = int(outputs[cols.samples][0]), cols.width, spatial.size
        s1, s2 = sums[:width], sums[width : 2 * width]
        t0 = sums[2 * width :] if cols.shifted else 0.0  # unshifted flat taps: t itself
        k = n * (1.0 if cols.flat else spatial[cols.channels])
        columns = np.bincount(cols.channels, minlength=size).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # NaN/Inf: reported broken
            column_mean = t0 + s1 / k
            column_m2 = np.maximum(s2 - s1 * s1 / k, 0.0)
            mean_t = np.bincount(cols.channels, column_mean, minlength=size) / columns
            spread = column_mean - mean_t[cols.channels]
            m2_t = np.bincount(cols.channels, column_m2 + k * spread * spread, minlength=size)
            count = np.bincount(cols.channels, np.broadcast_to(k, column_mean.shape), minlength=size)
            pos = cols.positions
            gain = self.gain[pos]
            return count[pos], (mean_t[pos] - self.offset[pos]) / gain, m2_t[pos] / (gain * gain)

    def _spatial(self, outputs) -> np.ndarray:
        """Values per sample and channel: static, or read from a tap's Shape output."""
        if not self.dynamic:
            return self.spatial
        spatial = self.spatial.copy()
        for tap, start in self.dynamic:
            spatial[start : start + tap.channels] = float(np.prod(np.asarray(outputs[tap.outputs["shape"]])[2:]))
        return spatial

    def _merge(self, count, mean, m2) -> None:
        total = self.count + count
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = mean - self.mean
            share = np.where(total > 0, count / np.where(total > 0, total, 1), 0.0)
            self.mean = self.mean + delta * share
            self.m2 = self.m2 + m2 + delta * delta * self.count * share
        self.count = total

    def far_off_centre(self) -> list[str]:
        """output_pool layers whose tapped t sat more than FAR_OFF_CENTRE spreads from zero, where
        its float32 moments lost precision (see FAR_OFF_CENTRE)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            var = self.m2 / np.where(self.count > 0, self.count, 1)
            far = np.abs(self.gain * self.mean + self.offset) > FAR_OFF_CENTRE * np.abs(self.gain) * np.sqrt(var + 1e-5)
        return [
            tap.layer
            for tap, start in zip(self.taps, self.starts)
            if tap.strategy == OUTPUT_POOL and far[start : start + tap.channels].any()
        ]

    def layer_moments(self) -> dict[str, tuple[numerics.Moments, numerics.BatchSpread]]:
        """Per layer: the moments over all data and the accumulator of batch means."""
        spread = self.by_layer(np.full_like(self.count, self.batches), self.spread_mean, self.spread_m2)
        return {
            layer: (moments, numerics.BatchSpread(spread[layer]))
            for layer, moments in self.by_layer(self.count, self.mean, self.m2).items()
        }

    def batch_moments(self, outputs: dict[str, np.ndarray]) -> dict[str, numerics.Moments]:
        """One batch's float64 moments of every tap's BN input, by layer (nothing is merged)."""
        return self.by_layer(*self.batch(outputs))

    def by_layer(self, count, mean, m2) -> dict[str, numerics.Moments]:
        """Channels laid end to end (count, mean, M2 from :meth:`batch`) -> moments by layer."""
        out = {}
        for tap, start in zip(self.taps, self.starts):
            sl = slice(int(start), int(start) + tap.channels)
            out[tap.layer] = numerics.Moments(int(count[sl][0]) if tap.channels else 0, mean[sl].copy(), m2[sl].copy())
        return out


def batch_moments(instrumented: InstrumentedModel, outputs: dict[str, np.ndarray]) -> dict[str, numerics.Moments]:
    """One batch's float64 moments of every tap's BN input (the accumulator's maths), by layer."""
    return TapAccumulator(instrumented).batch_moments(outputs)


def _batch_moments(first, second, samples, spatial, is_sum, gain, offset):
    """Count, mean and M2 of a batch from per-channel sums over its samples of per-sample statistics.

    With u, v the batch's mean and mean square of the tapped tensor t = gain * x + offset,
    mean_x = (u - offset) / gain and M2_x = count * max(v - u^2, 0) / gain^2, count = N * spatial.
    """
    count = samples * spatial
    with np.errstate(invalid="ignore", divide="ignore"):
        inverse = np.where(count > 0, 1.0 / np.where(is_sum, count, samples), 0.0)
        u, v = first * inverse, second * inverse
        mean = (u - offset) / gain
        m2 = np.maximum(v - u * u, 0.0) * count / (gain * gain)
    return count, mean, m2


def _columns(instrumented: InstrumentedModel, starts: np.ndarray) -> list[_Columns]:
    """For each packed output, the channel positions of its columns."""
    start_of = {tap.layer: (tap, int(s)) for tap, s in zip(instrumented.taps, starts)}
    columns = []
    for pack in instrumented.packs:
        taps = [start_of[layer] for layer in pack.layers]
        channels = np.concatenate(
            [np.repeat(s + np.arange(t.channels), t.columns // max(t.channels, 1)) for t, s in taps]
        )
        channels = channels.astype(np.int64)
        size = int(sum(t.channels for t in instrumented.taps))
        positions = np.concatenate([s + np.arange(t.channels) for t, s in taps]).astype(np.int64)
        flat = any(t.flat for t, _ in taps)
        in_order = bool(np.array_equal(channels, np.arange(size)))
        columns.append(
            _Columns(
                pack.output,
                pack.samples,
                pack.width,
                channels,
                positions,
                flat,
                bool(pack.shifts),
                in_order,
                pack.direct,
            )
        )
    return columns
