"""The diagnosis's second pass, in the other mode, on as many batches as decide it.

The diagnosis needs, for every layer that drifts as deployed, whether it also drifts in train mode
(:mod:`bnscope.stats.diagnosis`), not every sample a second time. So the second pass reads the data
in ``n`` interleaved shards (batch k in shard k mod n, ``n`` a power of two with at least
``MIN_SHARD_BATCHES`` batches per shard), in bit-reversed order (0, n/2, n/4, 3n/4, ...), so that
each prefix of shards is spread evenly over the data, and after 1, 2, 4, ... shards asks the
diagnosis. It stops at the first look where every layer that drifts as deployed has a train-mode
verdict other than ``unsure``; else it reads everything. Each of those verdicts already clears its
threshold by two standard errors (:mod:`bnscope.stats.verdict`), widened by Student's t for the
few batch means a look has (:mod:`bnscope.numerics.confidence`: 1.6x at the 4 batches of a
shard), so a decided look is evidence enough: ``benchmarks/check_diagnosis_stop.py`` found the
diagnosis of the whole pass in all 127 cases it compares (42 with a second pass: the shipped samples
at batch 2 to 64 and repeated eight times, ResNet-18 exports, the wide-BN benchmark). An earlier rule
also waited for a second look to agree, which doubled the pass for no change.
The session is built once; on large data the pass reads a small part of it. Data from a loader
script (samples unknown) are read in one pass, as a shard would run the script whole.
"""

from __future__ import annotations

from dataclasses import replace

from bnscope.stats.collect import CollectedMoments, Collector, Progress, StatsOptions
from bnscope.stats.summary import StatsResult, summarize

MIN_SHARD_BATCHES = 4  # the batch-mean spread needs this many batches (numerics.confidence.MIN_BATCHES)


def companion_moments(
    collector: Collector,
    source,
    eval_batches: int,
    collected: CollectedMoments,
    summary: dict,
    progress: Progress | None = None,
) -> tuple[CollectedMoments, StatsResult]:
    """Collect in the collector's mode until the diagnosis is decided; returns the moments and the
    result with them as companion. ``summary`` holds summarize's other arguments."""
    # A loader's batches are made as they are read: every shard would run it whole again.
    count = shard_count(eval_batches) if source.samples is not None else 1
    merged = None
    for k, index in enumerate(bit_reversed(count), 1):
        part = collector.collect(source, _offset(progress, merged), (index, count) if count > 1 else None)
        merged = part if merged is None else merged.merge(part)
        if k == count or k & (k - 1):  # only after 1, 2, 4, ... shards
            continue
        result = summarize(companion=merged, collected=collected, **summary)
        if decided(result):
            return merged, result
    return merged, summarize(companion=merged, collected=collected, **summary)


def other_mode(options: StatsOptions) -> StatsOptions:
    return replace(options, mode="train" if options.mode == "eval" else "eval")


def shard_count(batches: int) -> int:
    """The largest power of two that leaves every shard ``MIN_SHARD_BATCHES`` batches."""
    count = 1
    while batches // (2 * count) >= MIN_SHARD_BATCHES:
        count *= 2
    return count


def bit_reversed(count: int) -> list[int]:
    """0 .. count - 1 (a power of two) in bit-reversed order: every prefix of a power-of-two length
    is evenly spaced."""
    bits = count.bit_length() - 1
    return [int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(count)]


def decided(result: StatsResult) -> bool:
    """Every layer that drifts as deployed has a verdict in the other mode that is not ``unsure``."""
    for layer in result.layers:
        other = result.companion_of(layer.name)
        if layer.verdict in ("drift", "stale", "inherited") and (other is None or other.verdict == "unsure"):
            return False
    return True


def _offset(progress: Progress | None, done: CollectedMoments | None) -> Progress | None:
    """Progress of one shard as batches of the whole pass (its total is not known in advance)."""
    if progress is None:
        return None
    before = done.batches if done is not None else 0
    return lambda batches, _total: progress(before + batches, None)
