"""Which BatchNormalization nodes can be folded, into what, and exactly why not.

Each pattern is *match, then check*: the match finds the neighbouring linear op, the checks
return a :class:`~bnscope.fold.plan.Refusal` in plain words the moment one fails, else a
:class:`~bnscope.fold.plan.FoldPlan` that :mod:`bnscope.fold.rewrite` rewrites. ``bnscope inspect`` and
``bnscope fold`` call the same :func:`plan_fold`, so the report and the rewrite never disagree.

Patterns (BN channel axis 1): into_previous (:mod:`bnscope.fold.into_previous`) is tried first,
then into_next (:mod:`bnscope.fold.into_next`); each op they fold into is a small type with its own
checks and axes (:mod:`bnscope.fold.variants`); either plan is refused when the folded values
could overflow their dtype (:func:`check_representable`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from bnscope.fold.into_next import check_into_next
from bnscope.fold.into_previous import check_into_previous
from bnscope.fold.linear_op import abs_max
from bnscope.fold.plan import BnParams, FoldOptions, FoldPlan, Refusal, check_bn
from bnscope.fold.variants import BN_PAIR, linear_op
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.nodes import attribute_values


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
        return _with_params(previous, params)
    following = check_representable(view, check_into_next(view, bn, params, options), params)
    if isinstance(following, FoldPlan):
        return _with_params(following, params)
    return Refusal(f"{previous.reason}; {following.reason}")


def _with_params(result: FoldPlan | Refusal, params: BnParams) -> FoldPlan | Refusal:
    """The plan carries the BN's checked parameters (and their notes) to the rewrite."""
    if isinstance(result, FoldPlan):
        return replace(result, notes=result.notes + params.notes, params=params)
    return result


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
    variant = BN_PAIR if weight_input < 0 else linear_op(node)
    w = view.constant(node.input[weight_input if weight_input >= 0 else 1]).value
    b = variant.bias_bound(view, node)
    add = plan.bias_add
    if plan.direction == "into_next":
        add = variant.bias_add_after(view, target, weight_input, plan.target_rank)
    if add is not None:
        b = max(b, *(abs_max(view, name) for name in view.nodes[add].input[:2]))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scale = params.gamma / np.sqrt(params.var + params.epsilon)
        shift = np.abs(params.beta - params.mean * scale).max()
        scale = np.abs(scale).max()
        w_bound = float(np.abs(w).max(initial=0.0)) * scale
        if plan.direction == "into_previous":
            b_bound = b * scale + shift
        else:
            out_axis = variant.input_axes(node, weight_input)[1]
            per_output = np.abs(np.moveaxis(w, out_axis, 0)).reshape(w.shape[out_axis], -1).sum(axis=1).max()
            b_bound = b + abs(float(attribute_values(node).get("alpha", 1.0))) * float(per_output) * shift
    limit = float(np.finfo(w.dtype).max)
    for what, bound in (("weights", w_bound), ("bias", b_bound)):
        if not bound <= limit:
            return Refusal(f"the folded {what} could overflow {w.dtype} (bound {bound:.3g} > {limit:.3g})")
    return None


def bn_sites(view: GraphView) -> list[int]:
    """BN node indices in graph order."""
    return view.bn_indices()
