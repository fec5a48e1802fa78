"""bnscope: inspect, measure, fold and recalibrate BatchNormalization in trained ONNX models.

The public API; the ``bnscope`` command is a thin layer over these calls.
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING

from bnscope.errors import BnscopeError, CheckFailed, ExitCode

if TYPE_CHECKING:  # what type checkers and editors see; at run time, __getattr__ below
    from bnscope.distributed import ClusterOptions
    from bnscope.fold.plan import FoldOptions
    from bnscope.fold.rewrite import FoldRecord, fold_batchnorm
    from bnscope.stats.collect import StatsOptions
    from bnscope.stats.summary import StatsResult, Thresholds
    from bnscope.workflows.fold import FoldResult, fold_model
    from bnscope.workflows.inspect import InspectResult, inspect_model
    from bnscope.workflows.options import DataChoice, FoldSettings
    from bnscope.workflows.run import RunResult, run_model
    from bnscope.workflows.stats import collect_stats

# The rest of the public API is imported on first use (PEP 562), so that the ``bnscope`` command
# imports only what its subcommand needs (``bnscope stats`` need not import the fold machinery).
_LAZY = {
    "ClusterOptions": "bnscope.distributed",
    "FoldOptions": "bnscope.fold.plan",
    "FoldRecord": "bnscope.fold.rewrite",
    "fold_batchnorm": "bnscope.fold.rewrite",
    "StatsOptions": "bnscope.stats.collect",
    "StatsResult": "bnscope.stats.summary",
    "Thresholds": "bnscope.stats.summary",
    "FoldResult": "bnscope.workflows.fold",
    "fold_model": "bnscope.workflows.fold",
    "InspectResult": "bnscope.workflows.inspect",
    "inspect_model": "bnscope.workflows.inspect",
    "DataChoice": "bnscope.workflows.options",
    "FoldSettings": "bnscope.workflows.options",
    "RunResult": "bnscope.workflows.run",
    "run_model": "bnscope.workflows.run",
    "collect_stats": "bnscope.workflows.stats",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'bnscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "BnscopeError",
    "CheckFailed",
    "ClusterOptions",
    "DataChoice",
    "ExitCode",
    "FoldOptions",
    "FoldRecord",
    "FoldResult",
    "FoldSettings",
    "InspectResult",
    "RunResult",
    "StatsOptions",
    "StatsResult",
    "Thresholds",
    "collect_stats",
    "fold_batchnorm",
    "fold_model",
    "inspect_model",
    "run_model",
]
