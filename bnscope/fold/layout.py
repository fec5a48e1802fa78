"""Where a BN's channel axis lives on the far side of layout-only ops and Reshapes.

Layout chains. Identity, Transpose, Slice (on axes other than the channel axis) and
Squeeze/Unsqueeze (of other axes) move or select elements but never mix channels, so a per-channel affine map commutes with them:
``BN(chain(x)) = chain(BN'(x))`` where BN' acts on the axis the channel axis comes from. Walking
back from the BN (channel axis 1), ``Transpose(perm)`` maps output axis ``a`` to input axis
``perm[a]``; forward it maps input axis ``a`` to ``perm.index(a)``; Identity and Slice keep it;
Squeeze/Unsqueeze shift it past the removed/inserted axes.
The chain stays in the graph; only the BN goes.

Reshape/Flatten. A Reshape keeps the row-major order of all elements. Element ``i`` of the linear
op's output belongs to feature ``f(i) = (i // a) % A`` (``A`` features on an axis with ``a``
elements after it: ``a = H*W`` for a Conv, 1 for a MatMul's last axis); element ``i`` of the BN
input belongs to channel ``c(i) = (i // b) % B``. Folding into the linear op needs one
(scale, shift) per feature, so it is exact iff every channel that shares a feature has the same
(scale, shift). Both maps repeat with period ``lcm(a*A, b*B)``, so one period decides; the result
is ``channel_of_feature`` (length ``A``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bnscope.onnxio.bn import Refusal
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.nodes import attribute_values

LAYOUT_OPS = ("Identity", "Transpose", "Slice", "Squeeze", "Unsqueeze")
MAX_PERIOD = 1 << 22  # elements checked for a Reshape's feature -> channel map


@dataclass(frozen=True)
class LayoutChain:
    """Layout-only nodes next to a BN, in data-flow order, and the channel axis beyond them."""

    nodes: tuple[int, ...]
    axis: int  # the channel axis at the far end
    rank: int | None  # rank at the far end
    bn_rank: int | None  # rank at the BN


def trace_back(view: GraphView, tensor: str, rank: int | None) -> LayoutChain | Refusal:
    """Follows layout ops from the BN input back to the first other producer."""
    chain: list[int] = []
    idx = view.producer_of(tensor)
    while idx is not None and _is_layout(view, idx):
        chain.append(idx)
        idx = view.producer_of(view.nodes[idx].input[0])
    return _map_axis(view, chain, rank, backwards=True)


def trace_forward(view: GraphView, tensor: str, rank: int | None) -> LayoutChain | Refusal:
    """Follows layout ops from the BN output while each tensor has exactly one consumer."""
    chain: list[int] = []
    while not view.is_graph_output(tensor) and len(view.consumers_of(tensor)) == 1:
        idx = view.consumers_of(tensor)[0]
        if not _is_layout(view, idx) or view.nodes[idx].input[0] != tensor:
            break
        chain.append(idx)
        tensor = view.nodes[idx].output[0]
    return _map_axis(view, chain, rank, backwards=False)


def _is_layout(view: GraphView, idx: int) -> bool:
    node = view.nodes[idx]
    return node.op_type in LAYOUT_OPS and node.domain in ("", "ai.onnx")


def _map_axis(view, chain: list[int], rank: int | None, backwards: bool) -> LayoutChain | Refusal:
    """The channel axis (and rank) at the far end of ``chain`` (nodes in walking order), from
    axis 1 at the BN."""
    axis, bn_rank = 1, rank
    for idx in chain:
        node = view.nodes[idx]
        rank = rank if rank is not None else _rank_hint(view, idx, node.output[0] if backwards else node.input[0])
        bn_rank = rank if idx == chain[0] else bn_rank
        moved = _axis_through(view, idx, axis, rank, backwards)
        if isinstance(moved, Refusal):
            return moved
        axis, rank = moved
    ordered = tuple(reversed(chain)) if backwards else tuple(chain)
    return LayoutChain(ordered, axis, rank, bn_rank)


def _rank_hint(view: GraphView, idx: int, tensor: str) -> int | None:
    rank = view.rank_of(tensor)
    if rank is None and view.nodes[idx].op_type == "Transpose":
        perm = _perm(view, idx)
        rank = None if perm is None else len(perm)
    return rank


def _perm(view: GraphView, idx: int) -> list[int] | None:
    perm = attribute_values(view.nodes[idx]).get("perm")
    return None if perm is None else [int(p) for p in perm]


def _axis_through(view, idx, axis, rank, backwards) -> tuple[int, int | None] | Refusal:
    """(axis, rank) on the other side of one layout node; ``rank`` is on the near side."""
    node, name = view.nodes[idx], f"{view.nodes[idx].op_type} '{view.node_name(idx)}'"
    if node.op_type == "Transpose":
        perm = _perm(view, idx) or (list(range(rank))[::-1] if rank is not None else None)
        if perm is None or (rank is not None and len(perm) != rank):
            return Refusal(f"{name} permutation is unknown")
        return (perm[axis] if backwards else perm.index(axis)), len(perm)
    if node.op_type == "Slice":
        sliced = _sliced_axes(view, idx, rank)
        if isinstance(sliced, Refusal):
            return sliced
        if axis in sliced:
            return Refusal(f"{name} slices the channel axis {axis}")
    if node.op_type in ("Squeeze", "Unsqueeze"):
        return _axis_through_squeeze(view, idx, axis, rank, backwards)
    return axis, rank


def _axis_through_squeeze(view, idx, axis, rank, backwards) -> tuple[int, int] | Refusal:
    """Squeeze drops size-1 axes, Unsqueeze inserts them; ``axes`` index the larger side."""
    node, name = view.nodes[idx], f"{view.nodes[idx].op_type} '{view.node_name(idx)}'"
    axes = _squeeze_axes(view, idx)
    if axes is None or rank is None:
        return Refusal(f"{name} axes or rank are not known")
    grows = (node.op_type == "Unsqueeze") != backwards  # walking from the smaller to the larger side
    large = rank + len(axes) if grows else rank
    axes = sorted({a % large for a in axes})
    if grows:
        kept = [a for a in range(large) if a not in axes]
        return kept[axis], large
    if axis in axes:
        return Refusal(f"{name} removes the channel axis {axis}")
    return axis - sum(a < axis for a in axes), large - len(axes)


def _squeeze_axes(view: GraphView, idx: int) -> list[int] | None:
    node = view.nodes[idx]
    if view.opset < 13:
        axes = attribute_values(node).get("axes")
    else:
        const = view.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        axes = None if const is None else const.value.reshape(-1)
    return None if axes is None else [int(a) for a in axes]


def _sliced_axes(view: GraphView, idx: int, rank: int | None) -> set[int] | Refusal:
    """Axes the Slice really cuts: an axis sliced from 0 to "the end" (INT_MAX) by step 1 is kept whole."""
    node = view.nodes[idx]
    if view.opset < 10:
        attrs = attribute_values(node)
        starts, ends, axes, steps = attrs.get("starts", []), attrs.get("ends", []), attrs.get("axes"), None
    else:
        names = list(node.input[1:5]) + [""] * 4
        values = [view.constant(n) if n else None for n in names[:4]]
        if any(v is None for v, n in zip(values, names[:4]) if n) or not names[0] or not names[1]:
            return Refusal(f"Slice '{view.node_name(idx)}' starts/ends/axes/steps are not constant")
        starts, ends, axes, steps = (None if v is None else v.value.reshape(-1) for v in values)
    axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
    steps = [1] * len(axes) if steps is None else [int(s) for s in steps]
    if any(a < 0 for a in axes) and rank is None:
        return Refusal(f"Slice '{view.node_name(idx)}' has negative axes and the rank is unknown")
    whole = [int(s) == 0 and int(e) >= _TO_THE_END and k == 1 for s, e, k in zip(starts, ends, steps)]
    return {a % rank if rank else a for a, kept in zip(axes, whole) if not kept}


_TO_THE_END = 2**31 - 1  # exporters write INT32_MAX or INT64_MAX for "to the end"


def channel_of_feature(
    linear_shape, feature_axis: int, bn_shape, channel_axis: int, scale: np.ndarray, shift: np.ndarray
) -> np.ndarray | str:
    """The BN channel of each linear-op feature across a Reshape, or why there is none.

    Args:
        linear_shape: Static shape of the Reshape input (dims before ``feature_axis`` may be symbolic).
        feature_axis: The linear op's output-feature axis in ``linear_shape``.
        bn_shape: Static shape of the BN side of the Reshape.
        channel_axis: The BN channel axis in ``bn_shape``.
        scale: BN scale per channel (float64).
        shift: BN shift per channel (float64).
    """
    a_dims, b_dims = linear_shape[feature_axis:], bn_shape[channel_axis:]
    if not all(isinstance(d, int) and d > 0 for d in (*a_dims, *b_dims)):
        return "shapes around it are not known statically"
    features, a = a_dims[0], math.prod(a_dims[1:])
    channels, b = b_dims[0], math.prod(b_dims[1:])
    if channels != scale.shape[0]:
        return f"its output has {channels} on the BN channel axis, BN has {scale.shape[0]} channels"
    period = math.lcm(a * features, b * channels)
    if period > MAX_PERIOD:
        return f"its feature -> channel map repeats only every {period} elements (too long to check)"
    i = np.arange(period)
    f, c = (i // a) % features, (i // b) % channels
    owner = np.empty(features, np.int64)
    owner[f[::-1]] = c[::-1]  # the first channel seen for each feature
    clash = np.flatnonzero((scale[owner[f]] != scale[c]) | (shift[owner[f]] != shift[c]))
    if clash.size:
        k = clash[0]
        return (
            f"feature {f[k]} of the op before it feeds BN channels {owner[f[k]]} and {c[k]}, "
            "whose scale/shift differ (the fold would not be per feature)"
        )
    return owner
