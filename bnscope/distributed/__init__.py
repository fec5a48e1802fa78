"""Statistics and recalibration on a Ray cluster (``--ray``; ``pip install "bnscope[ray]"``).

Ray Data runs the batches: ``map_batches`` over a dataset whose rows are units of work, with a
stateful actor per worker holding one instrumented onnxruntime session (a GPU each when the
provider is a GPU one). Each actor hands back every model batch's O(C) float64 count / mean / M2
(:class:`bnscope.stats.collect.BatchResult`); the driver merges them in batch order with the same
code as one process (:class:`bnscope.stats.collect.Collector`), so the moments, the report and the
recalibrated model are those of one process over the same batches. Why not Ray's ``AggregateFnV2``:
the results are already O(C) per batch, so a shuffle stage would cost more than the merge, and an
order-free tree merge would change the low bits of every mean.

This package imports without Ray; :mod:`bnscope.distributed.ray_runner` imports Ray, and only
:func:`open_on_cluster` imports it, when a workflow is given a :class:`ClusterOptions`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from bnscope.errors import BnscopeError

INSTALL = 'pip install "bnscope[ray]"'


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how wide to run.

    Attributes:
        address: ``"local"`` starts a Ray cluster inside this process; anything else is a Ray
            address (``"auto"``, ``"ray://head:10001"``, ...). A Ray session this process already
            started (``ray.init()``) is used as it is.
        workers: actors, one session each (Ray Data's ``concurrency``).
        cpus_per_worker: CPUs each actor asks Ray for; its session's threads.
        batches_per_task: model batches one task reads (local data); None: about four tasks per worker.
    """

    address: str = "local"
    workers: int = 2
    cpus_per_worker: int = 1
    batches_per_task: int | None = None

    def __post_init__(self) -> None:
        for name in ("workers", "cpus_per_worker"):
            if getattr(self, name) < 1:
                raise BnscopeError(f"{name} {getattr(self, name)} is too small. Hint: use a positive number")
        if self.batches_per_task is not None and self.batches_per_task < 1:
            raise BnscopeError("batches_per_task must be at least 1. Hint: leave it out for the default")


def require_ray() -> None:
    """Exit 2 with the install line when Ray Data is not installed (imports it: only with ``--ray``)."""
    try:
        importlib.import_module("ray.data")
    except ImportError as exc:
        raise BnscopeError(f"--ray needs Ray Data, which is not installed ({exc}). Hint: {INSTALL}") from exc


def open_on_cluster(cluster: ClusterOptions, data, inputs, **how):
    """The data as a DataSource for reports, and the runner that runs its batches on the cluster
    (see :func:`bnscope.distributed.ray_runner.open_on_cluster`)."""
    require_ray()
    from bnscope.distributed import ray_runner

    return ray_runner.open_on_cluster(cluster, data, inputs, **how)
