"""Graph surgery: fold BatchNormalization into neighbouring linear ops.

``fold_batchnorm(model)`` returns a new model and one :class:`FoldRecord` per BN; the input is
never mutated. A graph whose nodes are out of topological order (but acyclic) is sorted first. Each fold is planned by :func:`bnscope.fold.patterns.plan_fold` (pattern, then
checks with a reason), computed in float64 by :mod:`bnscope.numerics`, and rounded once to the
dtype of the tensor it replaces. Rewritten tensors keep their names when nothing else reads
them; shared or derived weights get a fresh initializer so other readers are untouched. The
node that now produces the BN's output takes over its output name, so graph outputs,
value_info and downstream names survive.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx

from bnscope import numerics
from bnscope.errors import BnscopeError
from bnscope.fold.patterns import plan_fold
from bnscope.fold.plan import FoldOptions, FoldPlan, Refusal
from bnscope.fold.variants import BN_PAIR, linear_op
from bnscope.onnxio.bn import is_batchnorm
from bnscope.onnxio.edit import GraphEditor, remove_dead
from bnscope.onnxio.external_data import TensorStore
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.sort import sort_graph_nodes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldRecord:
    """What happened to one BN node."""

    name: str
    folded: bool
    direction: str | None = None
    target: str | None = None
    target_op: str | None = None
    reason: str | None = None
    notes: tuple[str, ...] = ()
    weight_range_growth: float | None = None
    channel_range_imbalance: float | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "folded": self.folded,
            "direction": self.direction,
            "target": self.target,
            "target_op": self.target_op,
            "reason": self.reason,
            "notes": list(self.notes),
            "weight_range_growth": self.weight_range_growth,
            "channel_range_imbalance": self.channel_range_imbalance,
        }


def fold_batchnorm(
    model: onnx.ModelProto, options: FoldOptions = FoldOptions(), store: TensorStore | None = None
) -> tuple[onnx.ModelProto, list[FoldRecord]]:
    """Fold every BN the checks allow. Returns (new model, records in graph order)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    generated = _name_unnamed_nodes(work)
    _sort_topologically(work)
    order = [n.name for n in work.graph.node if is_batchnorm(n)]
    _check_names(options, order)
    decided: dict[str, FoldRecord] = {}
    shapes = None
    changed = True
    while changed:
        changed, shapes = _fold_pass(work, options, store, decided, shapes)
    remove_dead(work)
    for node in work.graph.node:
        # generated names, and the inserted nodes named after them, leave no name behind; ClearField,
        # not name = "", which would serialise an empty name the input did not have
        if node.name in generated or node.name.partition("_folded")[0] in generated:
            node.ClearField("name")
    return work, [decided[name] for name in order]


def _check_names(options: FoldOptions, bn_names: list[str]) -> None:
    """A typo in --only/--skip would silently fold everything (or nothing): refuse it."""
    both = sorted(set(options.only or ()) & set(options.skip))
    if both:
        raise BnscopeError(
            f"{', '.join(map(repr, both))} given to both --only and --skip, so nothing would be folded. "
            "Hint: name each layer in one of them"
        )
    unknown = sorted((set(options.only or ()) | set(options.skip)) - set(bn_names))
    if unknown:
        shown = ", ".join(bn_names[:12]) + (", ..." if len(bn_names) > 12 else "")
        raise BnscopeError(
            f"no BatchNormalization in the model is named {', '.join(map(repr, unknown))} "
            "(from --only/--skip). "
            f"Hint: the BN layers are {shown or 'none'} (bnscope inspect lists them)"
        )


def _fold_pass(work, options, store, decided, shapes):
    """Plan BNs in graph order, rewriting each foldable one; True when anything changed.

    One view and one editor serve the whole pass: each fold updates the view's index for the nodes
    it touched (:meth:`GraphView.relink`) and the editor applies every node removal and insertion
    at the end, so a pass costs the graph's size once, not once per BN."""
    changed = False
    view = GraphView(work, store, value_infos=shapes)
    editor = GraphEditor(work, view)
    for bn in view.bn_indices():
        name = view.node_name(bn)
        if name in decided and decided[name].folded:
            continue
        plan = plan_fold(view, bn, options)
        if isinstance(plan, Refusal):
            decided[name] = FoldRecord(name, False, reason=plan.reason)
            continue
        decided[name] = _apply(editor, view, plan)
        changed = True
        shapes = view.value_infos
    editor.commit()
    return changed, shapes


def _sort_topologically(model: onnx.ModelProto) -> None:
    """Puts the nodes of an unsorted DAG (keras2onnx writes some) in topological order, in place.

    ONNX requires that order and the folded model is checked against it; onnxruntime sorts for
    itself, so the original runs and the sorted result computes the same. A graph with a cycle is
    left as it is.
    """
    if sort_graph_nodes(model.graph):
        log.warning("the graph's nodes were not in topological order; the folded model lists them sorted")


def _name_unnamed_nodes(model: onnx.ModelProto) -> set[str]:
    """Give unnamed nodes their stable generated names for the duration of the fold."""
    view = GraphView(model)
    generated = set()
    for idx, node in enumerate(model.graph.node):
        if node.name != view.node_name(idx):
            node.name = view.node_name(idx)
            generated.add(node.name)
    return generated


# -- applying one plan --------------------------------------------------------------------------
def _apply(editor: GraphEditor, view: GraphView, plan: FoldPlan) -> FoldRecord:
    params = plan.params
    target = view.nodes[plan.target]
    before = {idx: view.links(idx) for idx in _touched(view, plan)}
    added = len(editor.inserted)
    scale, shift = numerics.bn_scale_shift(params.gamma, params.beta, params.mean, params.var, params.epsilon)
    if plan.direction == "into_previous":
        growth = _fold_into_previous(editor, view, plan, target, scale, shift)
    else:
        growth = _fold_into_next(editor, view, plan, scale, shift)
    editor.remove_node(view.nodes[plan.bn])
    view.relink(before, removed=(plan.bn,), added=[new for _, new in editor.inserted[added:]])
    return FoldRecord(
        name=view.node_name(plan.bn),
        folded=True,
        direction=plan.direction,
        target=view.node_name(plan.target),
        target_op=target.op_type,
        notes=plan.notes,
        weight_range_growth=growth[0],
        channel_range_imbalance=growth[1],
    )


def _touched(view: GraphView, plan: FoldPlan) -> set[int]:
    """Every node a fold may change: the plan's nodes and the readers of their outputs (renamed or
    rewired to the BN's input or output)."""
    nodes = {plan.bn, plan.target, *(t for t, _ in plan.targets), *plan.layout}
    nodes |= {i for i in (plan.bias_add, plan.reshape) if i is not None}
    readers = {r for i in nodes for out in view.nodes[i].output if out for r in view.consumers_of(out)}
    return nodes | readers


def _fold_into_previous(editor, view, plan, target, scale, shift) -> tuple[float, float | None]:
    """The op before the BN (or the BN before it) absorbs it: its type knows how."""
    if plan.feature_channels is not None:  # through a Reshape: one (scale, shift) per output feature
        scale, shift = scale[plan.feature_channels], shift[plan.feature_channels]
    variant = BN_PAIR if plan.weight_input < 0 else linear_op(target)
    return variant.fold_into_previous(editor, view, plan, target, scale, shift)


def _fold_into_next(editor, view, plan, scale, shift) -> tuple[float, float | None]:
    """Every reader absorbs the BN; the BN's readers (layout chain or targets) then read its input."""
    growths = [
        linear_op(view.nodes[idx]).fold_into_next(editor, view, plan, idx, weight, scale, shift)
        for idx, weight in plan.targets or ((plan.target, plan.weight_input),)
    ]
    bn = view.nodes[plan.bn]
    for idx in view.consumers_of(bn.output[0]):
        node = view.nodes[idx]
        for pos, name in enumerate(node.input):
            if name == bn.output[0]:
                node.input[pos] = bn.input[0]
    return max(g[0] for g in growths), growths[0][1]
