"""The closed sets of values the library's options take, as str enums, defined once.

Standard library only, so the CLI lists them in ``--help`` without importing onnx or onnxruntime
(the modules that act on them re-export them: ``bnscope.stats.instrument.Mode`` is this ``Mode``).
"""

from __future__ import annotations

from enum import Enum


class Mode(str, Enum):
    """How BN normalises while statistics are collected: eval (running statistics, as deployed) or
    train (batch statistics)."""

    eval = "eval"
    train = "train"


class Strategy(str, Enum):
    """How a BN input's moments are tapped in the graph (see ``bnscope.stats.instrument``)."""

    auto = "auto"
    input_sums = "input_sums"
    output_pool = "output_pool"


class Diagnose(str, Enum):
    """When ``stats`` runs the second pass, in the other mode, that the diagnosis compares with:
    auto (only when a layer is not ok), always, never (eval-only evidence)."""

    auto = "auto"
    always = "always"
    never = "never"


class Method(str, Enum):
    """sequential: exact, layer by layer (later layers see the recalibrated earlier ones);
    onepass: every layer from one pass in train mode (torch's update_bn)."""

    sequential = "sequential"
    onepass = "onepass"
