"""What a fold check returns, the checks on the BN itself, and the weight checks every pattern shares.

A check returns a :class:`FoldPlan` (what :mod:`bnscope.fold.rewrite` rewrites) or a :class:`Refusal` in plain
words. :func:`check_bn` refuses a BN that is not a fixed per-channel affine map: training mode, used
optional outputs, parameters that are not constants, NaN/Inf, ``var + epsilon <= 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnscope.onnxio.bn import PARAMS, Refusal, bn_attributes, training_mode
from bnscope.onnxio.graph import Constant, GraphView

SHAPE_ONLY_OPS = ("Shape", "Size")  # read a tensor's shape, never its values


@dataclass(frozen=True)
class FoldOptions:
    """What the folder may do. Defaults to folding everything exact, overridable params too."""

    keep_overridable: bool = False
    into_next: bool = True
    only: frozenset[str] | None = None
    skip: frozenset[str] = frozenset()


@dataclass(frozen=True)
class BnParams:
    """The BN's constant parameters, float64, and the affine map they define."""

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float
    notes: tuple[str, ...] = ()

    @property
    def channels(self) -> int:
        return int(self.gamma.shape[0])


@dataclass(frozen=True)
class FoldPlan:
    """A fold the checks allowed. Node references are indices into the GraphView."""

    bn: int
    direction: str  # "into_previous" | "into_next"
    target: int  # the linear node (into_next: the first of ``targets``)
    weight_input: int  # which input of the target holds the weight
    bias_add: int | None = None  # an Add of a constant between linear op and BN
    reshape: int | None = None  # a Reshape/Flatten between linear op and BN
    block: int = 1  # output features per BN channel when each channel owns one contiguous block
    rank: int | None = None  # BN input rank when known
    notes: tuple[str, ...] = field(default=())
    layout: tuple[int, ...] = ()  # kept Identity/Transpose/Slice nodes between BN and target(s)
    targets: tuple[tuple[int, int], ...] = ()  # into_next: (node, weight input) of every reader
    # into_previous through a Reshape: the BN channel of each output feature (None: feature c = channel c)
    feature_channels: np.ndarray | None = field(default=None, compare=False, repr=False)
    trailing_axes: int | None = None  # into_previous: output axes after the linear op's feature axis
    target_rank: int | None = None  # into_next: rank of the tensor the targets read
    params: BnParams | None = field(default=None, compare=False, repr=False)  # set by plan_fold: what the rewrite uses

    @property
    def pattern(self) -> str:
        return self.direction


# -- the BN itself ------------------------------------------------------------------------------


def check_bn(view: GraphView, bn: int, options: FoldOptions) -> BnParams | Refusal:
    """Checks that do not depend on neighbours: mode, outputs, constant and sane parameters."""
    node = view.nodes[bn]
    attrs = bn_attributes(node, view.opset)
    training = training_mode(node, view.opset)
    if training:
        return Refusal(
            f"{training}: in training mode it normalises with batch statistics, not a fixed affine map "
            "(bnscope recalibrate makes it an inference BN, which folds)"
        )
    if attrs.spatial == 0:
        return Refusal("spatial=0 (per-activation statistics) is not a per-channel affine map")
    used_extra = [o for o in node.output[1:] if o and view.use_count(o)]
    if used_extra:
        return Refusal(f"its optional outputs ({', '.join(used_extra)}) are used")
    constants = [view.constant(name) for name in node.input[1:5]]
    refusal = _check_param_constants(view, node.input[1:5], constants, options)
    if refusal:
        return refusal
    gamma, beta, mean, var = (c.value.astype(np.float64).reshape(-1) for c in constants)
    if not (gamma.shape == beta.shape == mean.shape == var.shape):
        return Refusal("parameter shapes differ: " + ", ".join(str(c.value.shape) for c in constants))
    bad = np.flatnonzero(~np.isfinite(np.stack([gamma, beta, mean, var])).all(axis=0))
    if bad.size:
        return Refusal(f"non-finite parameters (NaN/Inf) in channels {_channels(bad)}")
    negative = np.flatnonzero(var + attrs.epsilon <= 0)
    if negative.size:  # zero too: scale = gamma / sqrt(0) is not a finite affine map
        return Refusal(f"var + epsilon is negative or zero in channels {_channels(negative)}")
    notes = ()
    if any(c.overridable for c in constants):
        notes = ("parameters are initializers also listed as graph inputs; treated as constants",)
    return BnParams(gamma, beta, mean, var, attrs.epsilon, notes)


def _check_param_constants(view, names, constants, options) -> Refusal | None:
    if len(names) < 4:
        return Refusal("fewer than 4 parameter inputs")
    graph_inputs = [p for p, n, c in zip(PARAMS, names, constants) if c is None and view.is_graph_input(n)]
    if graph_inputs:
        return Refusal(f"parameters are graph inputs ({', '.join(graph_inputs)}), not constants")
    computed = [p for p, c in zip(PARAMS, constants) if c is None]
    if computed:
        return Refusal(f"parameters are computed by the graph ({', '.join(computed)}), not constants")
    if options.keep_overridable and any(c.overridable for c in constants):
        return Refusal("parameters are overridable (initializers listed as graph inputs) and --keep-overridable is set")
    return None


def _channels(indices: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"


# -- weights of the linear op ------------------------------------------------------------------
def describe_node(view: GraphView, idx: int) -> str:
    """``Conv 'name'``, for refusals."""
    return f"{view.nodes[idx].op_type} '{view.node_name(idx)}'"


def constant_weight(view: GraphView, idx: int, position: int, options: FoldOptions) -> Constant | Refusal:
    """Input ``position`` of node ``idx`` as a float constant the fold may change, or why not."""
    node = view.nodes[idx]
    name = node.input[position] if len(node.input) > position else ""
    const = view.constant(name)
    if const is None:
        return Refusal(f"{describe_node(view, idx)} weight '{name}' is not a constant")
    if const.overridable and options.keep_overridable:
        return Refusal(
            f"{describe_node(view, idx)} weight is overridable (a graph input) and --keep-overridable is set"
        )
    if not np.issubdtype(const.value.dtype, np.floating):
        return Refusal(f"{describe_node(view, idx)} weight has non-float type {const.value.dtype}")
    return const


def optional_bias(view: GraphView, idx: int, position: int, options: FoldOptions) -> Refusal | None:
    """Why the bias at ``position`` (when present) cannot be changed, or None."""
    node = view.nodes[idx]
    if len(node.input) > position and node.input[position]:
        bias = constant_weight(view, idx, position, options)
        if isinstance(bias, Refusal):
            return Refusal(bias.reason.replace("weight", "bias"))
    return None


def following_bias_add(view: GraphView, matmul: int, rank: int | None) -> tuple[int, int] | None:
    """(Add, position of its constant) when a MatMul's only reader adds a per-feature constant
    ``(..., 1, F)`` that a new bias can merge into without changing the output shape."""
    out = view.nodes[matmul].output[0]
    readers = view.consumers_of(out)
    if len(readers) != 1 or view.is_graph_output(out) or view.nodes[readers[0]].op_type != "Add":
        return None
    add = view.nodes[readers[0]]
    pos = 1 if add.input[0] == out else 0
    const = view.constant(add.input[pos]) if add.input[1 - pos] == out else None
    if const is None or not np.issubdtype(const.value.dtype, np.floating):
        return None
    shape, features = const.value.shape, view.constant(view.nodes[matmul].input[1]).value.shape[1]
    if not shape or shape[-1] != features or any(d != 1 for d in shape[:-1]) or rank is None or len(shape) > rank:
        return None
    return readers[0], pos
