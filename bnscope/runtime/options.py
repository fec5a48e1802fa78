"""onnxruntime session settings as a small value type: optimisation level, threads, spinning, logging."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnxruntime as ort

from bnscope.errors import BnscopeError

logger = logging.getLogger(__name__)


OPT_LEVELS = ("disable", "basic", "extended", "layout", "all")


ORT_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",  # onnxruntime >= 1.22
    "all": "ORT_ENABLE_ALL",
}


_QUIET = 4  # onnxruntime log severity (0 verbose .. 4 fatal): a failure raises and bnscope says it in one line


# ---------------------------------------------------------------- session options
@dataclass(frozen=True)
class SessionOptionsSpec:
    """The onnxruntime session settings bnscope controls.

    Attributes:
        opt_level: ``"disable"``, ``"basic"``, ``"extended"``, ``"layout"`` or ``"all"``.
            Defaults to "all". Use "disable" for a baseline: every other level folds Conv+BN.
        threads: Intra-op threads. Defaults to None (onnxruntime's choice).
        log_severity: onnxruntime's session log level. Defaults to 4 (fatal only: errors raise, and
            bnscope reports them in one line; at 3 onnxruntime prints its own coloured copy first).
        spin: Let idle intra-op threads busy-wait for the next parallel section. Defaults to True
            (onnxruntime's default). Turning it off helps only a caller that computes for long
            between runs: the statistics merge (0.3 ms a batch) is faster with spinning workers
            (benchmarks/RESULTS.md, issue 20).
        external_data_dir: Where a model given as bytes finds its external data files (so an
            edited copy of a model never has to be written beside it). Defaults to None.
    """

    opt_level: str = "all"
    threads: int | None = None
    log_severity: int = _QUIET
    spin: bool = True
    external_data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.opt_level not in OPT_LEVELS:
            raise BnscopeError(
                f"unknown optimisation level '{self.opt_level}'. Hint: use one of {', '.join(OPT_LEVELS)}"
            )
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise BnscopeError(
                f"threads must be a positive integer, got {self.threads!r}. "
                "Hint: leave it unset for onnxruntime's default"
            )

    def to_ort(self) -> ort.SessionOptions:
        """Build the ``onnxruntime.SessionOptions``."""
        options = ort.SessionOptions()
        level = getattr(ort.GraphOptimizationLevel, ORT_OPT_LEVELS[self.opt_level], None)
        if level is None:
            raise BnscopeError(
                f"optimisation level '{self.opt_level}' needs a newer onnxruntime "
                f"than {ort.__version__}. Hint: use 'extended' or 'all'"
            )
        options.graph_optimization_level = level
        options.log_severity_level = self.log_severity
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.external_data_dir is not None:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", self.external_data_dir
            )
        return options
