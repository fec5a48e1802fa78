"""Exact cross-layer equalisation: per channel, move weight range from one conv into the next.

For ``Conv1 -> f -> Conv2`` with ``f`` positively homogeneous per channel (``f(s x) = s f(x)`` for
``s > 0``: Relu, LeakyRelu, PRelu with per-channel or scalar slopes, Identity), and ``s_c > 0``::

    W1'[c] = W1[c] / s_c,  b1'[c] = b1[c] / s_c,  W2'[o, j] = W2[o, j] * s_{in(o, j)}

leaves Conv2's output unchanged, for any group count (depthwise included: input channel
``in(o, j) = (o // (O / g)) * (C / g) + j``) and any zero padding of Conv2 (a padded zero scaled
is still zero). Conv2's bias is never touched: bias absorption (moving ``beta``-like constants
into the next conv's bias) is *not* exact across zero padding, since border pixels do not carry
the constant, and is not done. ``s_c = sqrt(r1_c / r2_c)`` (``r1_c = max|W1[c]|``,
``r2_c = max|W2[., c]|``) gives both convs the range ``sqrt(r1_c r2_c)`` on channel ``c``
(Nagel et al. 2019, "Data-Free Quantization"). HardSwish, Clip with fixed bounds and Sigmoid are
not homogeneous, so no pair is equalised across them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.nodes import attribute_values

HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "Identity")


@dataclass(frozen=True)
class EqualizedPair:
    first: str
    second: str
    through: tuple[str, ...]
    depthwise: bool
    range_before: float  # max over channels of max(r1_c, r2_c) / min(r1_c, r2_c)


def equalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[EqualizedPair]]:
    """A copy of ``model`` with every exact Conv pair equalised (one pass, in graph order)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    inits = {t.name: t for t in work.graph.initializer}
    done = []
    view = GraphView(work)
    for idx, node in enumerate(view.nodes):
        pair = _pair(view, idx, inits)
        if pair is None:
            continue
        second, through = pair
        done.append(_apply(view, node, view.nodes[second], through, inits))
    return work, done


def _pair(view: GraphView, idx: int, inits: dict) -> tuple[int, tuple[str, ...]] | None:
    """The Conv that reads ``view.nodes[idx]``'s output through homogeneous ops only, if exact."""
    first = view.nodes[idx]
    if first.op_type != "Conv" or not _own_weights(view, first, inits):
        return None
    tensor, through = first.output[0], []
    while True:
        readers = view.consumers_of(tensor)
        if len(readers) != 1 or view.is_graph_output(tensor):
            return None
        node = view.nodes[readers[0]]
        if node.op_type == "Conv":
            ok = node.input[0] == tensor and _own_weights(view, node, inits)
            return (readers[0], tuple(through)) if ok else None
        if node.op_type not in HOMOGENEOUS or node.domain not in ("", "ai.onnx") or node.input[0] != tensor:
            return None
        if node.op_type == "PRelu" and not _per_channel_or_scalar(view, node.input[1]):
            return None
        through.append(node.op_type)
        tensor = node.output[0]


def _own_weights(view: GraphView, conv: onnx.NodeProto, inits: dict) -> bool:
    """Weight (and bias, when present) are initializers read by this conv only."""
    names = [n for n in conv.input[1:3] if n]
    if not names:
        return False
    return all(n in inits and len(view.consumers_of(n)) == 1 and not view.is_graph_input(n) for n in names)


def _per_channel_or_scalar(view: GraphView, slope: str) -> bool:
    const = view.constant(slope)
    return const is not None and (const.value.size == 1 or sum(d > 1 for d in const.value.shape) <= 1)


def _apply(view, first, second, through, inits) -> EqualizedPair:
    w1 = numpy_helper.to_array(inits[first.input[1]]).astype(np.float64)
    w2 = numpy_helper.to_array(inits[second.input[1]]).astype(np.float64)
    group = int(attribute_values(second).get("group", 1))
    channels = w1.shape[0]
    in_of = _input_channel_map(w2.shape, group, channels)
    r1 = np.abs(w1.reshape(channels, -1)).max(axis=1)
    r2 = np.zeros(channels)
    np.maximum.at(r2, in_of.ravel(), np.abs(w2.reshape(w2.shape[0], w2.shape[1], -1)).max(axis=2).ravel())
    usable = (r1 > 0) & (r2 > 0)
    s = np.where(usable, np.sqrt(np.where(usable, r1 / np.where(r2 > 0, r2, 1), 1.0)), 1.0)
    before = float(np.max(np.maximum(r1, r2)[usable] / np.minimum(r1, r2)[usable])) if usable.any() else 1.0
    _store(inits[first.input[1]], w1 / s.reshape(-1, *[1] * (w1.ndim - 1)))
    if len(first.input) > 2 and first.input[2]:
        _store(inits[first.input[2]], numpy_helper.to_array(inits[first.input[2]]).astype(np.float64) / s)
    scale2 = s[in_of].reshape(*in_of.shape, *[1] * (w2.ndim - 2))
    _store(inits[second.input[1]], w2 * scale2)
    return EqualizedPair(first.name, second.name, through, group > 1 and group == w2.shape[0], before)


def _input_channel_map(shape: tuple[int, ...], group: int, channels: int) -> np.ndarray:
    """``in(o, j)`` for a Conv weight ``(O, C / g, k...)``: which input channel each slice reads."""
    out_channels, per_group = shape[0], shape[1]
    o = np.arange(out_channels)[:, None]
    j = np.arange(per_group)[None, :]
    mapped = (o // (out_channels // group)) * per_group + j
    if per_group * group != channels:
        raise ValueError(f"conv reads {per_group * group} channels, its producer writes {channels}")
    return mapped


def _store(tensor: onnx.TensorProto, value: np.ndarray) -> None:
    """Rounds once to the tensor's own dtype and replaces its data in place."""
    dtype = numpy_helper.to_array(tensor).dtype
    tensor.CopyFrom(numpy_helper.from_array(value.astype(dtype), tensor.name))
