"""Sharded statistics: save a run's mergeable moments, merge shards into one report.

A moments file (``.npz``, no pickles) holds, per layer, count / mean / M2 (Chan-mergeable), the
per-batch-mean spread accumulator, and the running statistics the report compares with, plus a
JSON header with a fingerprint of the model file and of the options that change the numbers
(mode, batch size, max batches). ``merge_moments`` refuses files whose fingerprints differ or
whose shards overlap, and gives what one run over all the data gives (up to float64 rounding).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from bnscope import numerics
from bnscope.errors import BnscopeError
from bnscope.onnxio.outputs import temp_prefix
from bnscope.stats.collect import CollectedMoments, LayerMoments
from bnscope.stats.summary import LayerReference, StatsResult, Thresholds, summarize

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of the model file (streamed: fine for multi-GB models)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_moments(
    path: str | os.PathLike, collected: CollectedMoments, references: dict[str, LayerReference], header: dict
) -> Path:
    """Write one shard's moments atomically. ``header`` carries model, fingerprint, options, shard, data."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    layers = []
    for k, (name, lm) in enumerate(collected.layers.items()):
        layers.append(
            {
                "name": name,
                "strategy": lm.strategy,
                "count": lm.moments.count,
                "spread_count": lm.spread.moments.count,
                "reference": references[name].to_dict(),
            }
        )
        arrays[f"l{k}_mean"], arrays[f"l{k}_m2"] = lm.moments.mean, lm.moments.m2
        arrays[f"l{k}_spread_mean"], arrays[f"l{k}_spread_m2"] = lm.spread.moments.mean, lm.spread.moments.m2
    meta = {
        **header,
        "format_version": FORMAT_VERSION,
        "layers": layers,
        "samples": collected.samples,
        "batches": collected.batches,
        "nonfinite_values": collected.nonfinite_inputs,
        "skipped": collected.skipped,
    }
    arrays["header"] = np.array(json.dumps(meta))
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".npz", dir=path.parent or ".")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_moments(path: str | os.PathLike) -> tuple[CollectedMoments, dict[str, LayerReference], dict]:
    path = Path(path)
    if not path.is_file():
        raise BnscopeError(f"moments file not found: {path}. Hint: check the path")
    try:
        return _parse_moments(path)
    except BnscopeError:
        raise
    except Exception as exc:  # any malformed file is an input error, never a crash
        if "pickled" in str(exc):  # numpy's text suggests unpickling; bnscope never does
            raise BnscopeError(
                f"{path} is not a .npz written by bnscope stats --save-moments. "
                "Hint: pass the part_*.npz files that command wrote"
            ) from exc
        raise BnscopeError(
            f"{path} is not a readable bnscope moments file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else ''}). "
            "Hint: recreate it with bnscope stats --save-moments"
        ) from exc


def _parse_moments(path: Path) -> tuple[CollectedMoments, dict[str, LayerReference], dict]:
    with np.load(path, allow_pickle=False) as z:
        if "header" not in z.files:
            raise BnscopeError(f"{path} has no bnscope header. Hint: create it with bnscope stats --save-moments")
        meta = json.loads(str(z["header"]))
        arrays = {k: z[k] for k in z.files}
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise BnscopeError(
            f"{path} has moments format {found}, this bnscope reads {FORMAT_VERSION}. Hint: recreate it with this version"
        )
    _check_header(path, meta)
    layers, refs = {}, {}
    for k, info in enumerate(meta["layers"]):
        moments = numerics.Moments(info["count"], arrays[f"l{k}_mean"], arrays[f"l{k}_m2"])
        spread = numerics.BatchSpread(
            numerics.Moments(info["spread_count"], arrays[f"l{k}_spread_mean"], arrays[f"l{k}_spread_m2"])
        )
        layers[info["name"]] = LayerMoments(info["name"], moments, spread, info["strategy"])
        refs[info["name"]] = LayerReference.from_dict(info["reference"])
    collected = CollectedMoments(
        layers, meta["samples"], meta["batches"], meta["nonfinite_values"], dict(meta.get("skipped", {}))
    )
    return collected, refs, meta


def _check_header(path: Path, meta: dict) -> None:
    """The header's counts are non-negative integers and its shard is [I, N] with 0 <= I < N: a file
    edited by hand (``"samples": "lots"``, ``"shard": [1, "2"]``) is refused here, not deep in the merge."""

    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    bad = [k for k in ("samples", "batches", "nonfinite_values") if not count(meta.get(k))]
    shard = meta.get("shard")
    if shard is not None and not (
        isinstance(shard, list) and len(shard) == 2 and all(map(count, shard)) and shard[0] < shard[1]
    ):
        bad.append("shard")
    if not isinstance(meta.get("layers"), list) or not all(isinstance(x, dict) for x in meta["layers"]):
        bad.append("layers")
    if not isinstance(meta.get("data"), dict) or not isinstance(meta.get("skipped", {}), dict):
        bad.append("data" if not isinstance(meta.get("data"), dict) else "skipped")
    bad += [k for k in ("model", "mode") if not isinstance(meta.get(k), str)]
    if bad:
        shown = ", ".join(f"{k} = {json.dumps(meta.get(k))[:40]}" for k in bad)
        raise BnscopeError(f"{path}: its header has {shown}. Hint: recreate it with bnscope stats --save-moments")


def merge_moments(
    paths: list[str | os.PathLike], thresholds: Thresholds = Thresholds(), allow_partial: bool = False
) -> StatsResult:
    """Merge shard files into the report one run over all the data would give.

    An incomplete set of shards (2 of 3) is an input error unless ``allow_partial``: a report over part
    of the data would otherwise gate a model on data it never saw. Defaults to False.
    """
    if not paths:
        raise BnscopeError("no moments files given. Hint: bnscope merge part_*.npz")
    loaded = [load_moments(p) for p in paths]
    _check_compatible(paths, [meta for _, _, meta in loaded], allow_partial)
    collected, refs, meta = loaded[0]
    for other, _, _ in loaded[1:]:
        collected = _merge_collected(collected, other)
    shards = sorted(m["shard"][0] + 1 for _, _, m in loaded if m.get("shard"))  # 1-based, as --shard I/N
    data = {**meta["data"], "shards": len(paths), "shard_indices": shards}
    return summarize(meta["model"], collected, refs, data, meta["mode"], thresholds)


def _check_compatible(paths, metas: list[dict], allow_partial: bool) -> None:
    first = metas[0]
    for path, meta in zip(paths, metas):
        for key in ("fingerprint", "mode", "batch_size", "max_batches"):
            if meta.get(key) != first.get(key):
                raise BnscopeError(
                    f"{path}: {key} {meta.get(key)!r} differs from {paths[0]}'s {first.get(key)!r}. "
                    "Hint: merge only shards of the same model, data and options"
                )
    whole = [path for path, meta in zip(paths, metas) if not meta.get("shard")]
    if whole and len(paths) > 1:
        raise BnscopeError(
            f"{whole[0]} holds a whole run (saved without --shard): merged with other files its data would be "
            "counted twice. Hint: merge only the part files of one --shard I/N run"
        )
    shards = [tuple(m["shard"]) for m in metas if m.get("shard")]
    if len(set(shards)) != len(shards):
        raise BnscopeError("the same shard appears twice. Hint: pass each part_I.npz once")
    counts = {m["shard"][1] for m in metas if m.get("shard")}
    if len(counts) > 1:
        raise BnscopeError(
            f"shards of different splits (N = {sorted(counts)}). Hint: merge shards of one --shard I/N run"
        )
    if counts and len(shards) < next(iter(counts)):
        _refuse_partial(len(shards), next(iter(counts)), {s[0] + 1 for s in shards}, allow_partial)


def _refuse_partial(present: int, total: int, indices: set[int], allow_partial: bool) -> None:
    missing = sorted(set(range(1, total + 1)) - indices)
    what = f"{present} of {total} shards given: shard(s) {', '.join(map(str, missing))} missing"
    if not allow_partial:
        raise BnscopeError(f"{what}. Hint: pass every part, or --allow-partial for a report over part of the data")
    log.warning("%s, the report covers part of the data (--allow-partial)", what)


def _merge_collected(a: CollectedMoments, b: CollectedMoments) -> CollectedMoments:
    if set(a.layers) != set(b.layers):
        raise BnscopeError("the moments files hold different layers. Hint: merge shards of the same model")
    return a.merge(b)
