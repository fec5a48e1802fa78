"""Runs a collector's batches on a Ray cluster with Ray Data (see :mod:`bnscope.distributed`).

Two kinds of work rows. Local data in bnscope's formats (``.npz``, folders of ``.npy``/``.npz``,
images, ``.pb``, ``--random``): rows are tasks, each a range of model batches that the actor reads
itself with bnscope's readers (lazily: a task reads only its batches), so the batches are exactly one
process's. A Ray Dataset of samples (:mod:`bnscope.distributed.ray_data`): rows are samples, cut into
blocks of ``batch_size`` rows, one model batch per call. Either way the output rows are per-batch
O(C) results in batch order (``preserve_order``), merged on the driver by the caller.

Fault tolerance is Ray's: Ray Data restarts a dead actor and retries its task (its defaults for
actor pools: ``max_restarts=-1``, ``max_task_retries=-1``); an input error is not retried. Batches are pure functions of the data, so a retried task gives the same
numbers. Ray's own progress bars are off: the driver reports merged batches to bnscope's bar.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import ray
import ray.data

from bnscope.data.sources import open_source
from bnscope.data.spec import DataSource, validate_batch
from bnscope.distributed import ClusterOptions
from bnscope.distributed.ray_data import DatasetSource, batched, dataset_source, feed_of
from bnscope.errors import BnscopeError
from bnscope.onnxio.model_io import LoadedModel
from bnscope.runtime.providers import canonical_provider
from bnscope.stats.accumulate import TapAccumulator
from bnscope.stats.collect import BatchResult, Collector, batch_result, session_for

log = logging.getLogger(__name__)

# providers whose sessions want one of the GPUs Ray schedules (its "GPU" resource)
GPU_PROVIDERS = {
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "NvTensorRTRTXExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
}
_RAISED = re.compile(r"^bnscope\.errors\.BnscopeError: (.+)$", re.MULTILINE)
TASKS_PER_WORKER = 4  # local data: about this many tasks per actor, so a slow or restarted one holds up little


def open_on_cluster(
    cluster: ClusterOptions,
    data,
    inputs,
    *,
    random: bool = False,
    loader: str | None = None,
    seed: int = 0,
    random_samples: int = 32,
) -> tuple[DataSource, RayRunner]:
    """Connects to the cluster; returns the data (for reports) and the runner of its batches."""
    connect(cluster)
    source = None if random else dataset_source(data, inputs)
    if source is not None:
        return source, RayRunner(cluster)
    if loader is not None:
        raise BnscopeError(
            "--ray cannot split a --loader script's batches between workers (they exist only by running it). "
            "Hint: save the data as a folder of .npy/.npz files, or pass a ray.data.Dataset to the Python API"
        )
    reopen = partial(open_source, data, inputs, random=random, seed=seed, random_samples=random_samples)
    return reopen(), RayRunner(cluster, reopen)


def connect(cluster: ClusterOptions) -> None:
    """``local``: a cluster inside this process (all its CPUs); else the given address. A Ray session
    this process already holds is used as it is."""
    # Ray Data's per-run INFO lines and its note that its bars are off (bnscope's bar counts batches)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    settings = {"include_dashboard": False, "logging_level": logging.WARNING}
    try:
        if cluster.address == "local":  # logical CPUs: the actors', plus one for Ray Data's own tasks
            cpus = max(os.cpu_count() or 1, cluster.workers * cluster.cpus_per_worker + 1)
            ray.init(num_cpus=cpus, **settings)
        else:
            ray.init(address=cluster.address, **settings)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise BnscopeError(
            f"cannot connect to the Ray cluster at {cluster.address!r} ({str(exc).splitlines()[0][:160]}). "
            "Hint: --ray local starts one here; otherwise give the head's address (ray status shows it) or auto"
        ) from exc


class RayRunner:
    """A :data:`bnscope.stats.collect.Runner`: each batch's result, computed on the cluster, in order."""

    def __init__(self, cluster: ClusterOptions, reopen=None):
        self.cluster, self.reopen = cluster, reopen

    def __call__(self, collector: Collector, source: DataSource, shard: tuple[int, int] | None = None):
        """``shard`` (i, n): only batches i, i + n, ... (the diagnosis's pass reads a few shards)."""
        cluster = self.cluster
        options = replace(collector.options, threads=cluster.cpus_per_worker)
        numbers = None
        if isinstance(source, DatasetSource):
            if shard is not None:
                raise BnscopeError("a Ray Dataset is read whole, not by shards. Hint: leave out the shard")
            work = batched(source.dataset, options.batch_size, options.max_batches)
            batch_size, reopen = options.batch_size, None
        else:
            index, count = shard or (0, 1)
            numbers = range(index, source.batch_count(options.batch_size, options.max_batches), count)
            size = len(numbers)
            per_task = cluster.batches_per_task or max(1, math.ceil(size / (TASKS_PER_WORKER * cluster.workers)))
            tasks = [
                {"start": numbers[j], "stop": numbers[min(j + per_task, size) - 1] + 1, "step": count}
                for j in range(0, size, per_task)
            ]
            work = ray.data.from_items(tasks, override_num_blocks=len(tasks))  # on the driver: no read tasks
            batch_size, reopen = 1, self.reopen
        _check_capacity(cluster, reads=isinstance(source, DatasetSource))
        payload = (collector.instrumented, options, str(collector.loaded.path), reopen, source.inputs)
        out = work.map_batches(
            BatchMoments,
            # nested in a list, the payload stays one object in the store that a restarted actor fetches
            fn_constructor_args=([ray.put(payload)],),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cluster.workers),
            num_cpus=cluster.cpus_per_worker,
            num_gpus=1 if _wants_gpu(options.provider) else 0,
        )
        out.context.execution_options.preserve_order = True
        out.context.enable_progress_bars = False  # bnscope's bar counts merged batches
        out.context.print_on_execution_start = False
        return _results(out, numbers)


def _check_capacity(cluster: ClusterOptions, reads: bool) -> None:
    """Ray Data waits, without a word, for CPUs a cluster does not have: the actors hold theirs for
    the whole run, and a Ray Dataset's reads and repartition need one more. Say so."""
    needed = cluster.workers * cluster.cpus_per_worker + (1 if reads else 0)
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < needed:
        log.warning(
            "the Ray cluster has %g CPUs; %d workers of %d CPUs%s need %d: the run waits until the cluster "
            "grows (use fewer --workers otherwise)",
            cpus,
            cluster.workers,
            cluster.cpus_per_worker,
            " and the dataset's reads" if reads else "",
            needed,
        )


def _results(out, numbers: range | None):
    """The rows as BatchResults; ``numbers``: the batch numbers due, in order (None: a dataset's)."""
    due = iter(numbers) if numbers is not None else None
    try:
        for row in out.iter_rows():
            expected = next(due, None) if due is not None else None
            if due is not None and int(row["index"]) != expected:
                raise RuntimeError(f"Ray returned batch {int(row['index'])} where batch {expected} was due")
            finite = bool(row["finite"])
            nonfinite = {} if finite else json.loads(str(row["nonfinite"]))
            yield BatchResult(row["count"], row["mean"], row["m2"], int(row["samples"]), finite, nonfinite)
    except Exception as exc:
        cause = _bnscope_cause(exc)
        if cause is not None:
            raise cause from None
        raise


def _bnscope_cause(exc: BaseException) -> BnscopeError | None:
    """The input error (BnscopeError) an actor raised, or None. Ray Data wraps it in a
    UserCodeException whose cause does not survive pickling; the RayTaskError's text (the actor's
    traceback) still names it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BnscopeError):
            return exc
        found = _RAISED.findall(str(exc)) if isinstance(exc, ray.exceptions.RayError) else []
        if found:
            return BnscopeError(found[-1].strip())
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return None


def _wants_gpu(provider: str) -> bool:
    name = canonical_provider(provider.split(":", 1)[0])  # "cuda:1": Ray picks the device (CUDA_VISIBLE_DEVICES)
    if name == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return name in GPU_PROVIDERS


class BatchMoments:
    """The Ray Data actor: one instrumented session, built once; a call turns its rows into per-batch
    results (count / mean / M2 of every channel, samples, finiteness)."""

    def __init__(self, payload: list):
        import bnscope.runtime.quiet  # noqa: F401  (onnxruntime's start-up lines off stderr, as in the CLI)

        instrumented, options, path, reopen, inputs = ray.get(payload[0])
        loaded = LoadedModel(instrumented.model, Path(path))
        self.session = session_for(loaded, instrumented.model, options)
        self.names = instrumented.output_names
        self.accumulator = TapAccumulator(instrumented)
        self.options, self.reopen, self.inputs = options, reopen, inputs
        self.source = None

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.reopen is None:  # a block of samples: one model batch
            feed = validate_batch(feed_of(rows, self.inputs), self.inputs)
            return _rows([(-1, self._result(feed))])
        self.source = self.source or self.reopen()
        results = []
        for start, stop, step in zip(rows["start"].tolist(), rows["stop"].tolist(), rows["step"].tolist()):
            batches = self.source.batch_range(self.options.batch_size, start, stop, step)
            results.extend((k, self._result(feed)) for k, feed in zip(range(start, stop, step), batches))
        return _rows(results)

    def _result(self, feed) -> BatchResult:
        return batch_result(self.accumulator, dict(zip(self.names, self.session.run(feed, self.names))), feed)


def _rows(results: list[tuple[int, BatchResult]]) -> dict[str, np.ndarray]:
    return {
        "index": np.array([k for k, _ in results], dtype=np.int64),
        "count": np.stack([r.count for _, r in results]),
        "mean": np.stack([r.mean for _, r in results]),
        "m2": np.stack([r.m2 for _, r in results]),
        "samples": np.array([r.samples for _, r in results], dtype=np.int64),
        "finite": np.array([r.finite for _, r in results]),
        "nonfinite": np.array([json.dumps(r.nonfinite) for _, r in results]),
    }
