"""Graph surgery for statistics: a copy of the model that reduces every BN input per channel.

Only O(N*C) numbers per layer leave the runtime each batch; the host merges them in float64
(:class:`bnscope.numerics.Moments`). Two tap strategies, chosen per layer:

``input_sums`` (always exact): at the BN input x, with c per channel the mean of the batch's first
sample (flat taps: its value at each position),
    s1 = ReduceSum(x - c),  s2 = ReduceSumSquare(x - c)   per sample, over the spatial axes.
The shift keeps float32 sums accurate when |mean|/std is large, drifted data included.

``output_pool`` (eval mode, rank >= 3, faster): at the BN output y = a * x + b (a = gamma /
sqrt(var + eps), b = beta - mean * a), per sample and channel,
    m1 = GlobalAveragePool(y),  m2 = GlobalAveragePool(y * y)
then on the host x's moments are recovered exactly in float64: mean_x = (mean_y - b) / a,
M2_x = M2_y / a^2. Tapping y leaves onnxruntime's Conv+BN fusion and blocked (NCHWc) layout
intact (GlobalAveragePool and Mul of a tensor by itself stay in NCHWc), which is where the
time goes. ``auto`` uses it only where it is also accurate: every |a| well above zero, and the
map from x to y near zero at x = 0 (|b| <= 30 |a| sqrt(var), so float32 y still carries x's mean).
On data that match the running statistics y's mean is beta and its spread |gamma|; where
|beta| > 3 |gamma| the tap reads t = y - beta instead (offset b - beta), so float32
E[t^2] - E[t]^2 loses nothing. Asked for by name, it is used wherever it can work at all (rank
>= 3 known, every gain finite and non-zero), uncentred.

Where a BN tensor has few values per sample and channel (at most ``FLAT_MAX_SPATIAL``) and no
Conv made it (nothing for onnxruntime to fuse), either strategy taps it "flat": Flatten to
(N, C * spatial) and sum over the samples value by value (the host adds up each channel's values
in float64). onnxruntime sums the first axis of a matrix far faster than it pools tiny windows.
input_sums taps (and flat output_pool taps of an off-centre y) subtract a value of the batch itself
(its first sample) before summing, so float32 sums keep their precision however far the data are
from the running statistics; the host adds the shift back in float64.

``mode="train"`` replaces every BN by standard ops that normalise with the batch's own
statistics (onnxruntime cannot run BatchNormalization with training_mode=1) and taps inputs.
Every tap's statistic is per sample and channel, (N, C); the pack sums them over the batch in
float32 (the host computes each batch's mean and M2 from the sums in float64, and merges batches
by Chan's rule). The values per sample and channel (the spatial size) come from shape inference; only
where it is not static does a tap add Shape(x) (an extra consumer that costs speed).

Outputs are packed: statistics with the same layout, dtype and batch dimension are concatenated
along the channel axis and summed over the batch's samples into one graph output (:class:`Pack`).
One output instead of two per layer saves onnxruntime a layout reorder per statistic (NCHWc ->
NCHW), and the sum over samples leaves the host O(C) numbers a batch, whatever its size.
The instrumented model's outputs are the packs (and any Shape taps) alone, so the runtime prunes
everything after the last BN. :class:`Tap` and :class:`Pack` are the explicit map from outputs
to (layer, statistic, columns).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from bnscope.choices import Mode, Strategy
from bnscope.errors import BnscopeError
from bnscope.onnxio.bn import Refusal, bn_attributes, subgraph_bns
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.sort import all_node_inputs
from bnscope.stats.taps import INPUT_SUMS, OUTPUT_POOL, Pack, Tap, TapBuilder, bn_params

# output_pool accuracy guard: y = a x + b with |b| <= MAX_OFFSET * |a| * sqrt(var + eps); float32 y
# then carries x's mean to eps32 * MAX_OFFSET ~ 2e-6 of its std.
MAX_OFFSET = 30.0
# y is tapped as y - beta where |beta| > OFF_CENTRE * |gamma| (float32 E[y^2] - E[y]^2 would cancel).
OFF_CENTRE = 3.0


MIN_GAIN = 1e-3  # |a| relative to max |a|: below this the inversion loses the channel


@dataclass
class InstrumentedModel:
    model: onnx.ModelProto
    taps: list[Tap]
    mode: str
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it has no tap
    packs: list[Pack] = field(default_factory=list)

    @property
    def output_names(self) -> list[str]:
        shapes = [tap.outputs["shape"] for tap in self.taps if "shape" in tap.outputs]
        return [name for pack in self.packs for name in (pack.output, pack.samples)] + shapes


MODES = tuple(m.value for m in Mode)


STRATEGIES = tuple(s.value for s in Strategy)


def instrument(
    model: onnx.ModelProto, view: GraphView, *, mode: str = "eval", strategy: str = "auto", train_ops: str = "ops"
) -> InstrumentedModel:
    """Return a copy of ``model`` whose outputs are per-channel statistics of every BN input.

    Args:
        model: The model (not mutated).
        view: A GraphView of the same model.
        mode: "eval" (BN uses running stats, as deployed) or "train" (batch stats).
        strategy: "auto" (output_pool where accurate, else input_sums), "input_sums" or "output_pool"
            (where it can work, else input_sums). Train mode taps the batch statistics it normalises with.
        train_ops: How train mode is built: "bn" (each BN in training mode, where the opset and dtype
            allow) or "ops" (standard ops, any runtime); see :mod:`bnscope.stats.train_ops`.

    Raises:
        BnscopeError: an unknown mode or strategy.
    """
    if mode not in MODES or strategy not in STRATEGIES:
        raise BnscopeError(
            f"unknown mode {mode!r} or strategy {strategy!r}. "
            f"Hint: mode is one of {', '.join(MODES)}; strategy one of {', '.join(STRATEGIES)}"
        )
    work = onnx.ModelProto()
    work.CopyFrom(model)
    builder = TapBuilder(work, view)
    taps, skipped, dropped = [], {}, []
    for idx in view.bn_indices():
        name = view.node_name(idx)
        node = work.graph.node[idx]
        refusal = _cannot_tap(view, idx)
        if refusal:
            skipped[name] = refusal.reason
            continue
        if mode == "train":
            taps.append(builder.train_tap(idx, name, node, train_ops))
            continue
        if extra := _force_eval(node):
            dropped.append((node.output[0], extra))
        chosen, centre = (
            _choose(view, idx, accurate_only=strategy == "auto") if strategy != INPUT_SUMS else (INPUT_SUMS, False)
        )
        taps.append(
            builder.output_pool(idx, name, node, centre)
            if chosen == OUTPUT_POOL
            else builder.input_sums(idx, name, node)
        )
    for name, holder in subgraph_bns(model.graph).items():
        skipped.setdefault(name, f"inside the subgraph of {holder}: bnscope taps the main graph only")
    packs = builder.finish()
    _keep_read_outputs(work.graph, dropped)
    return InstrumentedModel(work, taps, mode, skipped, packs)


def _cannot_tap(view: GraphView, idx: int) -> Refusal | None:
    node = view.nodes[idx]
    if bn_attributes(node, view.opset).spatial == 0:
        return Refusal("spatial=0 BatchNormalization has no per-channel statistics")
    if any(view.constant(name) is None for name in node.input[1:5]):
        return Refusal("parameters are not constants (graph inputs), so there are no stored statistics to compare")
    return None


def _force_eval(node: onnx.NodeProto) -> list[tuple[str, str]]:
    """As deployed: running statistics, no optional training outputs. Returns the outputs dropped,
    each with the running statistic (mean or variance input) that can stand in for it."""
    for attr in list(node.attribute):
        if attr.name in ("training_mode", "is_test"):
            node.attribute.remove(attr)
    dropped = [(out, node.input[3 + (pos - 1) % 2]) for pos, out in enumerate(node.output[1:], 1) if out]
    del node.output[1:]
    return dropped


def _keep_read_outputs(graph: onnx.GraphProto, dropped: list[tuple[str, list[tuple[str, str]]]]) -> None:
    """A dropped optional output that something still reads (a node, a graph output, an If/Loop body)
    is given the BN's running statistic by an Identity right after the BN, so the graph stays valid."""
    if not dropped:
        return
    read = {o.name for o in graph.output} | {name for node in graph.node for name in all_node_inputs(node)}
    for bn_output, outputs in dropped:
        position = next(i for i, node in enumerate(graph.node) if node.output and node.output[0] == bn_output)
        for offset, (out, source) in enumerate((o, s) for o, s in outputs if o in read):
            graph.node.insert(position + 1 + offset, helper.make_node("Identity", [source], [out]))


def _choose(view: GraphView, idx: int, accurate_only: bool = True) -> tuple[str, bool]:
    """output_pool where it works (and, with ``accurate_only``, where float32 keeps it exact), and
    whether to centre y on beta."""
    node = view.nodes[idx]
    rank = view.rank_of(node.input[0])
    if rank is None or rank < 3:
        return INPUT_SUMS, False
    gamma, beta, mean, var = bn_params(view, node)
    eps = bn_attributes(node, view.opset).epsilon
    with np.errstate(all="ignore"):  # NaN and negative variances: input sums, below
        gain = gamma / np.sqrt(var + eps)
        offset = beta - mean * gain
        spread = np.abs(gain) * np.sqrt(var + eps)
    if not gain.size or not np.all(np.isfinite(gain)) or np.any(np.abs(gain) <= MIN_GAIN * np.max(np.abs(gain))):
        return INPUT_SUMS, False
    if not accurate_only:
        return OUTPUT_POOL, False
    if np.any(np.abs(offset) > MAX_OFFSET * spread):
        return INPUT_SUMS, False
    return OUTPUT_POOL, bool(np.any(np.abs(beta) > OFF_CENTRE * np.abs(gamma)))
