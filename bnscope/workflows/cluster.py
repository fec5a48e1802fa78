"""Where a workflow's batches run: in this process, or on a Ray cluster (``--ray``).

The one place ``stats`` and ``recalibrate`` open their calibration data: with no cluster, bnscope's
readers here and no runner; with one, :mod:`bnscope.distributed` (imported only then, and Ray only
by it) returns the data and the runner that computes each batch on the cluster.
"""

from __future__ import annotations

from bnscope.data.sources import open_source
from bnscope.data.spec import DataSource, InputSpec
from bnscope.distributed import ClusterOptions
from bnscope.errors import BnscopeError
from bnscope.stats.collect import Runner


def open_data(
    data, specs: list[InputSpec], cluster: ClusterOptions | None, shard=None, **how
) -> tuple[DataSource, Runner | None]:
    """The calibration data, and the runner of its batches (None: this process runs them).

    ``how`` is :func:`bnscope.data.sources.open_source`'s keyword arguments (random, loader, seed, ...).
    """
    if cluster is None:
        return open_source(data, specs, **how), None
    if shard is not None:
        raise BnscopeError("--shard splits the data between separate runs, --ray splits it itself. Hint: use one")
    from bnscope.distributed import open_on_cluster

    return open_on_cluster(cluster, data, specs, **how)
