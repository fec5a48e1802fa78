"""Which BatchNormalization nodes can be folded, into what, and exactly why not.

Each pattern is *match, then check*: the match finds the neighbouring linear op, the checks
return a :class:`Refusal` in plain words the moment one fails, else a :class:`FoldPlan` that
:mod:`bnscope.fold` rewrites. ``bnscope inspect`` and ``bnscope fold`` call the same
:func:`plan_fold`, so the report and the rewrite never disagree.

Patterns (C = BN channels, BN channel axis 1):
- into_previous: Conv (weight axis 0), ConvTranspose (axis 1 within each group), Gemm (axis 1 of
  B, or 0 with transB), MatMul X@W with 2-D output (W axis 1) or W@X with 3-D output (W axis 0);
  optionally through an Add of a constant bias, or through a Reshape/Flatten of a 2-D
  Gemm/MatMul output when channel c owns the contiguous features [c*k, (c+1)*k).
- into_next: BN output feeds only a Conv with zero padding, a Gemm with transA=0, or a MatMul
  whose other operand is a constant 2-D weight. Padding is refused: the padded border would see
  0 instead of BN's shift, so the fold is not exact there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnscope.graph import BN_OP, LINEAR_OPS, Constant, GraphView, attribute_values, bn_attributes


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
    target: int  # the linear node
    weight_input: int  # which input of the target holds the weight
    bias_add: int | None = None  # an Add of a constant between linear op and BN
    reshape: int | None = None  # a Reshape/Flatten between linear op and BN
    block: int = 1  # output features per BN channel (Reshape case)
    rank: int | None = None  # BN input rank when known
    notes: tuple[str, ...] = field(default=())

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
        return FoldPlan(**{**result.__dict__, "notes": result.notes + notes})
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
    rank = view.rank_of(x)
    idx = view.producer_of(x)
    if idx is None:
        return Refusal("input is a graph input, nothing before it to fold into")
    reshape, add = None, None
    if view.nodes[idx].op_type in ("Reshape", "Flatten"):
        reshape, idx = idx, view.producer_of(view.nodes[idx].input[0])
        if idx is None:
            return Refusal("Reshape input is a graph input")
    if view.nodes[idx].op_type == "Add":
        add, idx = idx, _add_data_producer(view, idx)
        if idx is None:
            return Refusal("producer Add has no constant operand or no producer for its other operand")
    node = view.nodes[idx]
    if node.op_type == BN_OP and reshape is None and add is None:
        return _check_previous_bn(view, bn, idx, params, options, rank)
    if node.op_type not in LINEAR_OPS or node.domain not in ("", "ai.onnx"):
        between = f" behind {view.nodes[reshape].op_type}" if reshape is not None else ""
        return Refusal(f"{_describe(view, idx)}{between} comes before it, not Conv/ConvTranspose/Gemm/MatMul")
    chain = [i for i in (idx, add, reshape) if i is not None]
    refusal = _check_single_use_chain(view, chain)
    if refusal:
        return refusal
    check = _PREVIOUS_CHECKS[node.op_type]
    result = check(view, idx, params, options, rank)
    if isinstance(result, Refusal):
        return result
    weight_input, block = result, 1
    if reshape is not None:
        block = _reshape_block(view, reshape, idx, weight_input, params.channels)
        if isinstance(block, Refusal):
            return block
    if add is not None:
        refusal = _check_bias_add(view, add, params.channels, rank if reshape is None else 2, block)
        if refusal:
            return refusal
    return FoldPlan(bn, "into_previous", idx, weight_input, bias_add=add, reshape=reshape, block=block, rank=rank)


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
    for i in chain:
        out = view.nodes[i].output[0]
        if view.is_graph_output(out):
            return Refusal(f"{_describe(view, i)} output is also a graph output")
        n = len(view.consumers_of(out))
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


def _check_conv(view, idx, params, options, rank) -> int | Refusal:
    w = _weight(view, idx, 1, options)
    if isinstance(w, Refusal):
        return w
    if w.value.shape[0] != params.channels:
        return Refusal(f"Conv has {w.value.shape[0]} output channels, BN has {params.channels}")
    return _optional_bias(view, idx, 2, options) or 1


def _check_conv_transpose(view, idx, params, options, rank) -> int | Refusal:
    w = _weight(view, idx, 1, options)
    if isinstance(w, Refusal):
        return w
    group = int(attribute_values(view.nodes[idx]).get("group", 1))
    if w.value.ndim < 3 or w.value.shape[1] * group != params.channels:
        return Refusal(f"ConvTranspose weight {w.value.shape} (group {group}) does not give {params.channels} channels")
    return _optional_bias(view, idx, 2, options) or 1


def _check_gemm(view, idx, params, options, rank) -> int | Refusal:
    w = _weight(view, idx, 1, options)
    if isinstance(w, Refusal):
        return w
    trans_b = int(attribute_values(view.nodes[idx]).get("transB", 0))
    if w.value.ndim != 2:
        return Refusal(f"Gemm weight has rank {w.value.ndim}")
    features = w.value.shape[0] if trans_b else w.value.shape[1]
    if features != params.channels and not _reshaped(view, idx):
        return Refusal(f"Gemm has {features} output features, BN has {params.channels} channels")
    return _optional_bias(view, idx, 2, options) or 1


def _check_matmul(view, idx, params, options, rank) -> int | Refusal:
    node = view.nodes[idx]
    right, left = view.constant(node.input[1]), view.constant(node.input[0])
    reshaped = _reshaped(view, idx)
    if right is not None and left is None:
        w = _weight(view, idx, 1, options)
        if isinstance(w, Refusal):
            return w
        out_rank = view.rank_of(node.output[0]) or (None if reshaped else rank)
        if w.value.ndim != 2 or out_rank != 2:
            return Refusal(f"MatMul output has rank {out_rank}: BN's channel axis 1 is not the weight's output axis")
        if w.value.shape[1] != params.channels and not reshaped:
            return Refusal(f"MatMul has {w.value.shape[1]} output features, BN has {params.channels} channels")
        return 1
    if left is not None and right is None and not reshaped:
        w = _weight(view, idx, 0, options)
        if isinstance(w, Refusal):
            return w
        if w.value.ndim != 2 or rank != 3 or w.value.shape[0] != params.channels:
            return Refusal("constant-left MatMul does not map BN channels to weight rows")
        return 0
    return Refusal(f"{_describe(view, idx)} has no constant weight operand")


def _reshaped(view: GraphView, idx: int) -> bool:
    """True when the linear op's output goes (maybe through an Add) into a Reshape/Flatten."""
    consumers = view.consumers_of(view.nodes[idx].output[0])
    while len(consumers) == 1 and view.nodes[consumers[0]].op_type == "Add":
        consumers = view.consumers_of(view.nodes[consumers[0]].output[0])
    return len(consumers) == 1 and view.nodes[consumers[0]].op_type in ("Reshape", "Flatten")


_PREVIOUS_CHECKS = {
    "Conv": _check_conv,
    "ConvTranspose": _check_conv_transpose,
    "Gemm": _check_gemm,
    "MatMul": _check_matmul,
}


def _reshape_block(view: GraphView, reshape: int, linear: int, weight_input: int, channels: int) -> int | Refusal:
    """Features per BN channel when a Reshape/Flatten maps channel c to a contiguous block."""
    node = view.nodes[linear]
    if node.op_type not in ("Gemm", "MatMul") or weight_input != 1:
        return Refusal(f"{_describe(view, reshape)} after {node.op_type}: only Gemm/MatMul outputs are mapped")
    w = view.constant(node.input[1]).value
    trans_b = node.op_type == "Gemm" and int(attribute_values(node).get("transB", 0))
    features = w.shape[0] if trans_b else w.shape[1]
    out_shape = view.shape_of(view.nodes[reshape].output[0])
    if out_shape is None or len(out_shape) < 2 or any(not isinstance(d, int) for d in out_shape[1:]):
        return Refusal(f"{_describe(view, reshape)} output shape is not known statically")
    per_sample = int(np.prod(out_shape[1:]))
    if out_shape[1] != channels or per_sample != features:
        return Refusal(f"{_describe(view, reshape)} to {list(out_shape)} does not map {features} features to {channels} channel blocks")
    return features // channels


def _check_bias_add(view: GraphView, add: int, channels: int, rank: int | None, block: int) -> Refusal | None:
    node = view.nodes[add]
    const = view.constant(node.input[1]) or view.constant(node.input[0])
    shape = const.value.shape
    if rank is None:
        return Refusal("rank of the BN input is unknown, cannot check the bias Add's broadcast")
    target = (1, channels * block) + (1,) * (rank - 2) if rank >= 2 else (channels,)
    try:
        merged = np.broadcast_shapes(shape, target)
    except ValueError:
        return Refusal(f"bias Add constant of shape {shape} does not broadcast per channel")
    if len(merged) > rank or (len(merged) == rank and merged[0] != 1):
        return Refusal(f"bias Add constant of shape {shape} would change the output shape")
    return None


# -- into the next linear op --------------------------------------------------------------------
def check_into_next(view: GraphView, bn: int, params: BnParams, options: FoldOptions) -> FoldPlan | Refusal:
    y = view.nodes[bn].output[0]
    if view.is_graph_output(y):
        return Refusal("its output is a graph output")
    consumers = view.consumers_of(y)
    if len(consumers) != 1:
        return Refusal(f"its output has {len(consumers)} consumers")
    idx = consumers[0]
    node = view.nodes[idx]
    if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
        return Refusal(f"{_describe(view, idx)} comes after it, not Conv/Gemm/MatMul")
    rank = view.rank_of(view.nodes[bn].input[0])
    check = {"Conv": _next_conv, "Gemm": _next_gemm, "MatMul": _next_matmul}[node.op_type]
    result = check(view, idx, y, params, options, rank)
    if isinstance(result, Refusal):
        return result
    return FoldPlan(bn, "into_next", idx, result, rank=rank)


def _next_conv(view, idx, y, params, options, rank) -> int | Refusal:
    node = view.nodes[idx]
    if node.input[0] != y:
        return Refusal(f"{_describe(view, idx)} uses it as weight, not as data")
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


def _next_gemm(view, idx, y, params, options, rank) -> int | Refusal:
    node = view.nodes[idx]
    attrs = attribute_values(node)
    if node.input[0] != y or int(attrs.get("transA", 0)):
        return Refusal(f"{_describe(view, idx)} does not take it as its untransposed A input")
    w = _weight(view, idx, 1, options)
    if isinstance(w, Refusal):
        return w
    k = w.value.shape[1] if int(attrs.get("transB", 0)) else w.value.shape[0]
    if k != params.channels:
        return Refusal(f"{_describe(view, idx)} takes {k} inputs, BN has {params.channels} channels")
    return _optional_bias(view, idx, 2, options) or 1


def _next_matmul(view, idx, y, params, options, rank) -> int | Refusal:
    node = view.nodes[idx]
    if node.input[0] == y and rank == 2:
        w = _weight(view, idx, 1, options)
        if isinstance(w, Refusal):
            return w
        if w.value.ndim == 2 and w.value.shape[0] == params.channels:
            return 1
    if node.input[1] == y and rank == 3:
        w = _weight(view, idx, 0, options)
        if isinstance(w, Refusal):
            return w
        if w.value.ndim == 2 and w.value.shape[1] == params.channels:
            return 0
    return Refusal(f"{_describe(view, idx)} after it does not contract over BN's channel axis with a constant weight")


# -- the folded values must fit the dtype --------------------------------------------------------
def check_representable(view: GraphView, plan: FoldPlan | Refusal, params: BnParams) -> FoldPlan | Refusal:
    """Refuses a plan whose folded tensors could overflow their dtype (float16 stops at 65504).

    Bounds, not the folded tensors: ``|W'| <= max|W| * max|scale|``; the new bias is at most
    ``max|b| * max|scale| + max|shift|`` after the op, ``max|b| + alpha * max_o sum|W[o]| * max|shift|``
    before it (b: the bias, beta * C, or the bias Add's constant; BN after BN: W = gamma, b = beta).
    """
    if isinstance(plan, Refusal):
        return plan
    node = view.nodes[plan.target]
    attrs = attribute_values(node)
    w = view.constant(node.input[plan.weight_input if plan.weight_input >= 0 else 1]).value
    b = _abs_max(view, node.input[2]) if len(node.input) > 2 and node.op_type != "MatMul" else 0.0
    b *= abs(float(attrs.get("beta", 1.0))) if node.op_type == "Gemm" else 1.0
    if plan.bias_add is not None:
        b = max(b, *(_abs_max(view, name) for name in view.nodes[plan.bias_add].input[:2]))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scale = params.gamma / np.sqrt(params.var + params.epsilon)
        shift = np.abs(params.beta - params.mean * scale).max()
        scale = np.abs(scale).max()
        w_bound = float(np.abs(w).max(initial=0.0)) * scale
        if plan.direction == "into_previous":
            b_bound = b * scale + shift
        else:
            out_axis = {"Conv": 0, "Gemm": 0 if attrs.get("transB", 0) else 1}.get(node.op_type, plan.weight_input)
            per_output = np.abs(np.moveaxis(w, out_axis, 0)).reshape(w.shape[out_axis], -1).sum(axis=1).max()
            b_bound = b + abs(float(attrs.get("alpha", 1.0))) * float(per_output) * shift
    limit = float(np.finfo(w.dtype).max)
    for what, bound in (("weights", w_bound), ("bias", b_bound)):
        if not bound <= limit:
            return Refusal(f"the folded {what} could overflow {w.dtype} (bound {bound:.3g} > {limit:.3g})")
    return plan


def _abs_max(view: GraphView, name: str) -> float:
    const = view.constant(name)
    return float(np.abs(const.value).max(initial=0.0)) if const is not None and const.value.size else 0.0


def bn_sites(view: GraphView) -> list[int]:
    """BN node indices in graph order."""
    return [i for i in view.bn_indices() if view.nodes[i].op_type == BN_OP]
