"""bnscope: inspect, measure, fold and recalibrate BatchNormalization in trained ONNX models.

The public API; the ``bnscope`` command is a thin layer over these calls.
"""

__version__ = "0.1.0"

# First: onnxruntime is imported with its start-up log lines (telemetry with an unwritable HOME)
# kept off stderr; see bnscope.runtime.quiet.
import bnscope.runtime.quiet  # noqa: F401

# isort: split
from bnscope.errors import BnscopeError, CheckFailed, ExitCode
from bnscope.fold.plan import FoldOptions
from bnscope.fold.rewrite import FoldRecord, fold_batchnorm
from bnscope.stats.collect import StatsOptions
from bnscope.stats.summary import StatsResult, Thresholds
from bnscope.workflows.fold import FoldResult, fold_model
from bnscope.workflows.inspect import InspectResult, inspect_model
from bnscope.workflows.options import DataChoice, FoldSettings
from bnscope.workflows.run import RunResult, run_model
from bnscope.workflows.stats import collect_stats

__all__ = [
    "__version__",
    "BnscopeError",
    "CheckFailed",
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
