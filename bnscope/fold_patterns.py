"""Which BatchNormalization nodes can be folded, into what, and exactly why not.

Each pattern is *match, then check*: the match finds the neighbouring linear op, the checks
return a :class:`Refusal` in plain words the moment one fails, else a :class:`FoldPlan` that
:mod:`bnscope.fold` rewrites. ``bnscope inspect`` and ``bnscope fold`` call the same
:func:`plan_fold`, so the report and the rewrite never disagree.

Patterns (C = BN channels, BN channel axis 1):
- into_previous: Conv (weight axis 0), ConvTranspose (axis 1 within each group), Gemm (axis 1 of
  B, or 0 with transB), MatMul X@W (W axis 1, output features on the last axis) or W@X (W axis 0,
  features on axis -2); optionally through an Add of a constant, then a Reshape/Flatten, then a
  chain of layout-only ops (Identity, Transpose, Slice, Squeeze, Unsqueeze; kept in the graph).
  Without a Reshape the BN channel axis must trace back (:mod:`bnscope.fold_layout`) to the op's
  output-feature axis with one channel per feature; through a Reshape every channel that shares
  a feature must have the same (scale, shift), so the fold stays per feature. A BN whose channels
  all share one (scale, shift) is a scalar affine map and folds across any axis.
- into_next: BN output, maybe through a layout chain, feeds only ops that absorb it: Conv with
  zero padding, Gemm with transA=0, MatMul contracting over the channel axis with a constant 2-D
  weight (several of them, e.g. a transformer's q/k/v), and Shape/Size (they read no values).
  Padding is refused: the padded border would see 0 instead of BN's shift, so the fold is not
  exact there. ``y = (s*x + t) @ W = x @ (diag(s) W) + t @ W``; for a MatMul the new bias
  ``t @ W`` merges into the bias Add that follows it, or a new Add is inserted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from bnscope.fold_layout import LayoutRefusal, channel_of_feature, trace_back, trace_forward
from bnscope.graph import BN_OP, LINEAR_OPS, Constant, GraphView, attribute_values, bn_attributes
from bnscope.numerics import bn_scale_shift


SHAPE_ONLY_OPS = ("Shape", "Size")  # read a tensor's shape, never its values


@dataclass(frozen=True)
class FoldOptions:
    """What the folder may do. Defaults to folding everything exact, overridable params too."""

    keep_overridable: bool = False
    into_next: bool = True
    only: frozenset[str] | None = None
    skip: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Refusal:
    """Why a BN stays. ``reason`` is a plain-words sentence fragment."""

    reason: str


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

    @property
    def pattern(self) -> str:
        return self.direction


def plan_fold(view: GraphView, bn: int, options: FoldOptions = FoldOptions()) -> FoldPlan | Refusal:
    """Decide for one BN node: a plan to fold it, or the reason it stays."""
    name = view.node_name(bn)
    if options.only is not None and name not in options.only:
        return Refusal("not selected (--only)")
    if name in options.skip:
        return Refusal("skipped on request (--skip)")
    params = check_bn(view, bn, options)
    if isinstance(params, Refusal):
        return params
    previous = check_representable(view, check_into_previous(view, bn, params, options), params)
    if isinstance(previous, FoldPlan) or not options.into_next:
        return _with_notes(previous, params.notes)
    following = check_representable(view, check_into_next(view, bn, params, options), params)
    if isinstance(following, FoldPlan):
        return _with_notes(following, params.notes)
    return Refusal(f"{previous.reason}; {following.reason}")


def _with_notes(result: FoldPlan | Refusal, notes: tuple[str, ...]) -> FoldPlan | Refusal:
    if isinstance(result, FoldPlan) and notes:
        return replace(result, notes=result.notes + notes)
    return result


# -- the BN itself ------------------------------------------------------------------------------
_PARAM_NAMES = ("scale", "B", "mean", "var")


def check_bn(view: GraphView, bn: int, options: FoldOptions) -> BnParams | Refusal:
    """Checks that do not depend on neighbours: mode, outputs, constant and sane parameters."""
    node = view.nodes[bn]
    attrs = bn_attributes(node, view.opset)
    if attrs.training_mode:
        return Refusal("training_mode=1: it normalises with batch statistics, not a fixed affine map")
    if attrs.is_test == 0:
        return Refusal("opset-6 BatchNormalization with is_test=0 (training behaviour)")
    if attrs.spatial == 0:
        return Refusal("spatial=0 (per-activation statistics) is not a per-channel affine map")
    extra = [o for o in node.output[1:] if o]
    if extra and 7 <= view.opset < 14:  # before training_mode, the output count set the mode
        count = f"opset-{view.opset} BatchNormalization with {1 + len(extra)} outputs"
        return Refusal(f"{count} is in training mode (batch statistics)")
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
    graph_inputs = [p for p, n, c in zip(_PARAM_NAMES, names, constants) if c is None and view.is_graph_input(n)]
    if graph_inputs:
        return Refusal(f"parameters are graph inputs ({', '.join(graph_inputs)}), not constants")
    computed = [p for p, c in zip(_PARAM_NAMES, constants) if c is None]
    if computed:
        return Refusal(f"parameters are computed by the graph ({', '.join(computed)}), not constants")
    if options.keep_overridable and any(c.overridable for c in constants):
        return Refusal("parameters are overridable (initializers listed as graph inputs) and --keep-overridable is set")
    return None


def _channels(indices: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"


# -- into the previous linear op ----------------------------------------------------------------
def check_into_previous(view: GraphView, bn: int, params: BnParams, options: FoldOptions) -> FoldPlan | Refusal:
    x = view.nodes[bn].input[0]
    chain = trace_back(view, x, view.rank_of(x))
    if isinstance(chain, LayoutRefusal):
        return Refusal(chain.reason)
    behind = "".join(f" behind {_describe(view, i)}" for i in reversed(chain.nodes))
    idx = view.producer_of(view.nodes[chain.nodes[0]].input[0] if chain.nodes else x)
    if idx is None:
        return Refusal(f"input is a graph input{behind}, nothing before it to fold into")
    reshape, add = None, None
    if view.nodes[idx].op_type in ("Reshape", "Flatten"):
        reshape, idx = idx, view.producer_of(view.nodes[idx].input[0])
        behind = f" behind {_describe(view, reshape)}{behind}"
        if idx is None:
            return Refusal(f"Reshape input is a graph input{behind}")
    if view.nodes[idx].op_type == "Add":
        add, idx = idx, _add_data_producer(view, idx)
        if idx is None:
            return Refusal("producer Add has no constant operand or no producer for its other operand")
    node = view.nodes[idx]
    if node.op_type == BN_OP and reshape is None and add is None and not chain.nodes:
        return _check_previous_bn(view, bn, idx, params, options, chain.rank)
    if node.op_type not in LINEAR_OPS or node.domain not in ("", "ai.onnx"):
        return Refusal(f"{_describe(view, idx)}{behind} comes before it, not Conv/ConvTranspose/Gemm/MatMul")
    refusal = _check_single_use_chain(view, [i for i in (idx, add, reshape) if i is not None] + list(chain.nodes))
    if refusal:
        return refusal
    weight_input = _PREVIOUS_CHECKS[node.op_type](view, idx, options)
    if isinstance(weight_input, Refusal):
        return weight_input
    return _plan_previous(view, bn, idx, weight_input, params, chain, reshape, add)


def _plan_previous(view, bn, idx, weight_input, params, chain, reshape, add) -> FoldPlan | Refusal:
    """Checks where BN's channels land among the linear op's output features, and the bias Add."""
    out_rank = _linear_output_rank(view, idx, chain.rank if reshape is None else None)
    axis = _feature_axis(view.nodes[idx].op_type, weight_input, out_rank)
    if axis is None:
        return Refusal(f"{_describe(view, idx)} output rank is unknown: cannot tell which axis holds its outputs")
    if reshape is None:
        mapping = _check_same_axis(view, idx, weight_input, params, chain, out_rank, axis)
    else:
        mapping = _check_reshape_map(view, idx, weight_input, reshape, params, chain, axis)
    if isinstance(mapping, Refusal):
        return mapping
    trailing = None if out_rank is None else out_rank - 1 - axis
    if add is not None:
        refusal = _check_bias_add(view, add, _features(view, idx, weight_input), out_rank, trailing)
        if refusal:
            return refusal
    return FoldPlan(
        bn, "into_previous", idx, weight_input, bias_add=add, reshape=reshape, block=_block(mapping, params),
        rank=chain.bn_rank, layout=chain.nodes, feature_channels=mapping, trailing_axes=trailing,
    )


def _linear_output_rank(view: GraphView, idx: int, same_as: int | None) -> int | None:
    rank = view.rank_of(view.nodes[idx].output[0])
    return rank if rank is not None else same_as


def _feature_axis(op: str, weight_input: int, rank: int | None) -> int | None:
    """The output axis that holds the op's output channels/features."""
    if op != "MatMul":
        return 1
    if rank is None:
        return None
    return rank - 1 if weight_input == 1 else rank - 2


def _features(view: GraphView, idx: int, weight_input: int) -> int:
    node = view.nodes[idx]
    shape = view.constant(node.input[weight_input]).value.shape
    if node.op_type == "Conv":
        return shape[0]
    if node.op_type == "ConvTranspose":
        return shape[1] * int(attribute_values(node).get("group", 1))
    if node.op_type == "Gemm":
        return shape[0] if int(attribute_values(node).get("transB", 0)) else shape[1]
    return shape[1] if weight_input == 1 else shape[0]


def _check_same_axis(view, idx, weight_input, params, chain, out_rank, axis) -> np.ndarray | None | Refusal:
    """No Reshape: BN's channel axis must come from the op's output axis, one channel per output,
    unless every channel has the same (scale, shift): then it is one scalar affine map."""
    op = view.nodes[idx].op_type
    features = _features(view, idx, weight_input)
    if chain.axis != axis:
        if _is_uniform(params):
            return np.zeros(features, np.int64)
        what = f"{op} output has rank {out_rank}: " if op == "MatMul" else ""
        return Refusal(f"{what}BN's channel axis comes from axis {chain.axis} of {_describe(view, idx)}, "
                       f"not from its output axis {axis}, and its channels differ in scale/shift")
    if features != params.channels:
        kind = "output channels" if op.startswith("Conv") else "output features"
        return Refusal(f"{op} has {features} {kind}, BN has {params.channels} channels")
    return None


def _check_reshape_map(view, idx, weight_input, reshape, params, chain, axis) -> np.ndarray | None | Refusal:
    """Reshape/Flatten: the BN channel of each output feature, when the fold stays per feature."""
    linear_shape = view.shape_of(view.nodes[idx].output[0]) or view.shape_of(view.nodes[reshape].input[0])
    bn_shape = view.shape_of(view.nodes[reshape].output[0])
    if linear_shape is None or bn_shape is None:
        return Refusal(f"{_describe(view, reshape)} shapes around it are not known statically")
    scale, shift = bn_scale_shift(params.gamma, params.beta, params.mean, params.var, params.epsilon)
    owner = channel_of_feature(linear_shape, axis, bn_shape, chain.axis, scale, shift)
    if isinstance(owner, str):
        return Refusal(f"{_describe(view, reshape)} after {_describe(view, idx)}: {owner}")
    if owner.shape[0] != _features(view, idx, weight_input):
        return Refusal(f"{_describe(view, reshape)} input does not have {_describe(view, idx)}'s features on axis {axis}")
    return None if np.array_equal(owner, np.arange(params.channels)) else owner


def _is_uniform(params: BnParams) -> bool:
    scale, shift = bn_scale_shift(params.gamma, params.beta, params.mean, params.var, params.epsilon)
    return bool(np.all(scale == scale[0]) and np.all(shift == shift[0]))


def _block(mapping: np.ndarray | None, params: BnParams) -> int:
    """Features per BN channel when each channel owns one contiguous block, else 1."""
    if mapping is None or mapping.shape[0] % params.channels:
        return 1
    k = mapping.shape[0] // params.channels
    return k if np.array_equal(mapping, np.arange(mapping.shape[0]) // k) else 1


def _check_previous_bn(view, bn, idx, params, options, rank) -> FoldPlan | Refusal:
    """BN after BN: the second is an affine map, so it merges into the first's gamma/beta."""
    first = check_bn(view, idx, options)
    if isinstance(first, Refusal):
        return Refusal(f"the BatchNormalization before it cannot absorb it ({first.reason})")
    if first.channels != params.channels:
        return Refusal("the BatchNormalization before it has a different channel count")
    refusal = _check_single_use_chain(view, [idx])
    return refusal or FoldPlan(bn, "into_previous", idx, weight_input=-1, rank=rank)


def _add_data_producer(view: GraphView, add: int) -> int | None:
    a, b = view.nodes[add].input[:2]
    if view.constant(b) is not None and view.constant(a) is None:
        return view.producer_of(a)
    if view.constant(a) is not None and view.constant(b) is None:
        return view.producer_of(b)
    return None


def _check_single_use_chain(view: GraphView, chain: list[int]) -> Refusal | None:
    """Each tensor between linear op and BN has one reader whose values change, plus any Shape/Size
    (they read the shape, which the fold keeps)."""
    for i in chain:
        out = view.nodes[i].output[0]
        if view.is_graph_output(out):
            return Refusal(f"{_describe(view, i)} output is also a graph output")
        n = sum(view.nodes[c].op_type not in SHAPE_ONLY_OPS for c in view.consumers_of(out))
        if n != 1:
            return Refusal(f"{_describe(view, i)} output has {n} consumers (folding would change the others)")
    return None


def _describe(view: GraphView, idx: int) -> str:
    return f"{view.nodes[idx].op_type} '{view.node_name(idx)}'"


def _weight(view: GraphView, idx: int, position: int, options: FoldOptions) -> Constant | Refusal:
    node = view.nodes[idx]
    name = node.input[position] if len(node.input) > position else ""
    const = view.constant(name)
    if const is None:
        return Refusal(f"{_describe(view, idx)} weight '{name}' is not a constant")
    if const.overridable and options.keep_overridable:
        return Refusal(f"{_describe(view, idx)} weight is overridable (a graph input) and --keep-overridable is set")
    if not np.issubdtype(const.value.dtype, np.floating):
        return Refusal(f"{_describe(view, idx)} weight has non-float type {const.value.dtype}")
    return const


def _optional_bias(view: GraphView, idx: int, position: int, options: FoldOptions) -> Refusal | None:
    node = view.nodes[idx]
    if len(node.input) > position and node.input[position]:
        bias = _weight(view, idx, position, options)
        if isinstance(bias, Refusal):
            return Refusal(bias.reason.replace("weight", "bias"))
    return None


def _check_conv(view, idx, options) -> int | Refusal:
    w = _weight(view, idx, 1, options)
    if isinstance(w, Refusal):
        return w
    return _optional_bias(view, idx, 2, options) or 1


def _check_conv_transpose(view, idx, options) -> int | Refusal:
    w = _weight(view, idx, 1, options)
    if isinstance(w, Refusal):
        return w
    if w.value.ndim < 3:
        return Refusal(f"ConvTranspose weight has rank {w.value.ndim}")
    return _optional_bias(view, idx, 2, options) or 1


def _check_gemm(view, idx, options) -> int | Refusal:
    w = _weight(view, idx, 1, options)
    if isinstance(w, Refusal):
        return w
    if w.value.ndim != 2:
        return Refusal(f"Gemm weight has rank {w.value.ndim}")
    return _optional_bias(view, idx, 2, options) or 1


def _check_matmul(view, idx, options) -> int | Refusal:
    """X @ W scales W's columns (weight input 1); W @ X scales its rows (weight input 0)."""
    node = view.nodes[idx]
    right, left = view.constant(node.input[1]), view.constant(node.input[0])
    if (right is None) == (left is None):
        return Refusal(f"{_describe(view, idx)} has no constant weight operand")
    position = 1 if right is not None else 0
    w = _weight(view, idx, position, options)
    if isinstance(w, Refusal):
        return w
    if w.value.ndim != 2:
        return Refusal(f"{_describe(view, idx)} weight has rank {w.value.ndim}, not 2")
    return position


_PREVIOUS_CHECKS = {
    "Conv": _check_conv,
    "ConvTranspose": _check_conv_transpose,
    "Gemm": _check_gemm,
    "MatMul": _check_matmul,
}


def _check_bias_add(view: GraphView, add: int, features: int, out_rank: int | None, trailing: int | None) -> Refusal | None:
    """The Add's constant k becomes ``k * scale + shift`` per output feature: it may vary along any
    axis but must not grow the output shape (no batch axis, no extra rank)."""
    node = view.nodes[add]
    const = view.constant(node.input[1]) or view.constant(node.input[0])
    shape = const.value.shape
    if out_rank is None or trailing is None:
        return Refusal("rank of the BN input is unknown, cannot check the bias Add's broadcast")
    try:
        merged = np.broadcast_shapes(shape, (features,) + (1,) * trailing)
    except ValueError:
        return Refusal(f"bias Add constant of shape {shape} does not broadcast per channel")
    if len(merged) > out_rank or (len(merged) == out_rank and merged[0] != 1):
        return Refusal(f"bias Add constant of shape {shape} would change the output shape")
    return None


# -- into the next linear op --------------------------------------------------------------------
def check_into_next(view: GraphView, bn: int, params: BnParams, options: FoldOptions) -> FoldPlan | Refusal:
    """BN output feeds (maybe through a layout chain) only ops that absorb it: Conv/Gemm/MatMul
    contracting over the channel axis, or Shape (which reads no values)."""
    y = view.nodes[bn].output[0]
    if view.is_graph_output(y):
        return Refusal("its output is a graph output")
    chain = trace_forward(view, y, view.rank_of(view.nodes[bn].input[0]))
    if isinstance(chain, LayoutRefusal):
        return Refusal(chain.reason)
    end = view.nodes[chain.nodes[-1]].output[0] if chain.nodes else y
    behind = "".join(f" behind {_describe(view, i)}" for i in chain.nodes)
    if view.is_graph_output(end):
        return Refusal(f"its output{behind} is a graph output")
    consumers = view.consumers_of(end)
    targets = []
    for idx in consumers:
        if view.nodes[idx].op_type in SHAPE_ONLY_OPS:
            continue
        result = _next_target(view, idx, end, chain, params, options)
        if isinstance(result, Refusal):
            many = f"its output{behind} has {len(consumers)} consumers and " if len(consumers) > 1 else ""
            return Refusal(f"{many}{result.reason}")
        targets.append((idx, result))
    if not targets:
        return Refusal(f"nothing after it{behind} reads its values")
    (first, weight), *others = targets
    notes = (f"also folded into {', '.join(_describe(view, i) for i, _ in others)}",) if others else ()
    return FoldPlan(bn, "into_next", first, weight, rank=chain.bn_rank, layout=chain.nodes,
                    targets=tuple(targets), target_rank=chain.rank, notes=notes)


def _next_target(view, idx, y, chain, params, options) -> int | Refusal:
    node = view.nodes[idx]
    if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
        return Refusal(f"{_describe(view, idx)} comes after it, not Conv/Gemm/MatMul")
    if list(node.input).count(y) != 1:
        return Refusal(f"{_describe(view, idx)} reads it more than once")
    check = {"Conv": _next_conv, "Gemm": _next_gemm, "MatMul": _next_matmul}[node.op_type]
    return check(view, idx, y, params, options, chain)


def _next_conv(view, idx, y, params, options, chain) -> int | Refusal:
    node = view.nodes[idx]
    if node.input[0] != y or chain.axis != 1:
        return Refusal(f"{_describe(view, idx)} does not take BN's channels as its input channels")
    attrs = attribute_values(node)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = attrs.get("pads", [])
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") or any(pads):
        shown = list(pads) if pads else auto_pad
        return Refusal(f"{_describe(view, idx)} after it has padding {shown} (the shift is not exact at the borders)")
    w = _weight(view, idx, 1, options)
    if isinstance(w, Refusal):
        return w
    group = int(attrs.get("group", 1))
    if w.value.shape[1] * group != params.channels:
        return Refusal(f"{_describe(view, idx)} takes {w.value.shape[1] * group} input channels, BN has {params.channels}")
    return _optional_bias(view, idx, 2, options) or 1


def _next_gemm(view, idx, y, params, options, chain) -> int | Refusal:
    node = view.nodes[idx]
    attrs = attribute_values(node)
    if node.input[0] != y or int(attrs.get("transA", 0)) or chain.axis != 1:
        return Refusal(f"{_describe(view, idx)} does not take it as its untransposed A input")
    w = _weight(view, idx, 1, options)
    if isinstance(w, Refusal):
        return w
    k = w.value.shape[1] if int(attrs.get("transB", 0)) else w.value.shape[0]
    if k != params.channels:
        return Refusal(f"{_describe(view, idx)} takes {k} inputs, BN has {params.channels} channels")
    return _optional_bias(view, idx, 2, options) or 1


def _next_matmul(view, idx, y, params, options, chain) -> int | Refusal:
    """y @ W contracts y's last axis with W's rows; W @ y contracts y's axis -2 with W's columns."""
    node = view.nodes[idx]
    rank = chain.rank
    for data, weight, contracted, w_axis in ((0, 1, -1, 0), (1, 0, -2, 1)):
        if node.input[data] != y or rank is None or chain.axis != rank + contracted:
            continue
        w = _weight(view, idx, weight, options)
        if isinstance(w, Refusal):
            return w
        if w.value.ndim == 2 and w.value.shape[w_axis] == params.channels:
            return weight
    return Refusal(f"{_describe(view, idx)} after it does not contract over BN's channel axis with a constant weight")


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


# -- the folded values must fit the dtype --------------------------------------------------------
def check_representable(view: GraphView, plan: FoldPlan | Refusal, params: BnParams) -> FoldPlan | Refusal:
    """Refuses a plan whose folded tensors could overflow their dtype (float16 stops at 65504).

    Bounds, not the folded tensors: ``|W'| <= max|W| * max|scale|``; the new bias is at most
    ``max|b| * max|scale| + max|shift|`` after the op, ``max|b| + alpha * max_o sum|W[o]| * max|shift|``
    before it (b: the bias, beta * C, or the bias Add's constant; BN after BN: W = gamma, b = beta).
    """
    if isinstance(plan, Refusal):
        return plan
    for target, weight_input in plan.targets or ((plan.target, plan.weight_input),):
        refusal = _check_bounds(view, plan, target, weight_input, params)
        if refusal:
            return refusal
    return plan


def _check_bounds(view, plan, target, weight_input, params) -> Refusal | None:
    node = view.nodes[target]
    attrs = attribute_values(node)
    w = view.constant(node.input[weight_input if weight_input >= 0 else 1]).value
    b = _abs_max(view, node.input[2]) if len(node.input) > 2 and node.op_type != "MatMul" else 0.0
    b *= abs(float(attrs.get("beta", 1.0))) if node.op_type == "Gemm" else 1.0
    add = plan.bias_add
    if plan.direction == "into_next" and node.op_type == "MatMul" and weight_input == 1:
        add = (following_bias_add(view, target, plan.target_rank) or (None,))[0]
    if add is not None:
        b = max(b, *(_abs_max(view, name) for name in view.nodes[add].input[:2]))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scale = params.gamma / np.sqrt(params.var + params.epsilon)
        shift = np.abs(params.beta - params.mean * scale).max()
        scale = np.abs(scale).max()
        w_bound = float(np.abs(w).max(initial=0.0)) * scale
        if plan.direction == "into_previous":
            b_bound = b * scale + shift
        else:
            out_axis = {"Conv": 0, "Gemm": 0 if attrs.get("transB", 0) else 1}.get(node.op_type, weight_input)
            per_output = np.abs(np.moveaxis(w, out_axis, 0)).reshape(w.shape[out_axis], -1).sum(axis=1).max()
            b_bound = b + abs(float(attrs.get("alpha", 1.0))) * float(per_output) * shift
    limit = float(np.finfo(w.dtype).max)
    for what, bound in (("weights", w_bound), ("bias", b_bound)):
        if not bound <= limit:
            return Refusal(f"the folded {what} could overflow {w.dtype} (bound {bound:.3g} > {limit:.3g})")
    return None


def _abs_max(view: GraphView, name: str) -> float:
    const = view.constant(name)
    return float(np.abs(const.value).max(initial=0.0)) if const is not None and const.value.size else 0.0


def bn_sites(view: GraphView) -> list[int]:
    """BN node indices in graph order."""
    return [i for i in view.bn_indices() if view.nodes[i].op_type == BN_OP]
