"""Graph surgery for the taps ``instrument`` chose: the nodes that reduce each BN input (or output)
to per-channel sums inside the graph, packed into few outputs.

Each tap first reduces one sample's spatial values (GlobalAveragePool keeps onnxruntime's blocked
NCHWc layout); the pack then sums those (N, 2W) per-sample statistics over the samples,
    pack = ReduceSum_n Concat(first_1 .. first_k, second_1 .. second_k)    shape (2W,)
so a batch hands the host O(C) float32 numbers per layer whatever its size, plus the pack's
Shape (the batch's sample count N; int64, no data read).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.nodes import bn_attributes

LOW_PRECISION = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


INPUT_SUMS = "input_sums"

# "flat" taps: a tensor with at most this many values per sample and channel, not made by a Conv
# (no NCHWc layout or activation fusion to keep), is flattened to (N, C * spatial) and summed over
# the samples as it is: onnxruntime sums the first axis of a matrix far faster than it pools tiny
# windows (8 BN on [256, 512, 2, 2]: 1.6x plain inference against 5.5x with GlobalAveragePool).
FLAT_MAX_SPATIAL = 64
CONV_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "FusedConv"})

OUTPUT_POOL = "output_pool"


@dataclass(frozen=True)
class Tap:
    """Where one BN layer's statistics come out of the instrumented model."""

    layer: str
    channels: int
    strategy: str
    # statistic -> tensor: "s1"/"s2" (input_sums: per-sample shifted sums) or "m1"/"m2"
    # (output_pool: per-sample means of y and y*y), each (N, C, ...) inside a Pack; "shape" (a
    # graph output of its own) only when ``spatial`` is not static.
    outputs: dict
    shift: np.ndarray  # c for input_sums (per channel, float64)
    gain: np.ndarray | None = None  # a for output_pool
    offset: np.ndarray | None = None  # b for output_pool
    spatial: int | None = None  # values per sample and channel; None: read "shape" each batch
    flat: bool = False  # statistics are (N, C * spatial) values (summed on the host), not (N, C)

    @property
    def columns(self) -> int:
        """Columns of each statistic in its pack."""
        return self.channels * (self.spatial if self.flat else 1)


@dataclass(frozen=True)
class Pack:
    """One graph output: every tap's first statistic side by side, then every second statistic in
    the same order, each summed over the batch's samples, so each half is one contiguous block of
    columns; and ``samples``, the Shape of the (N, 2W, ...) concatenation they were summed from."""

    output: str
    samples: str
    layers: tuple[str, ...]  # the tap of each first (and its second), in column order
    firsts: tuple[str, ...]
    seconds: tuple[str, ...]
    widths: tuple[int, ...]  # columns of each first (and its second): channels, or channels x spatial if flat

    @property
    def width(self) -> int:
        """Columns in each half."""
        return int(sum(self.widths))


def bn_params(view: GraphView, node: onnx.NodeProto):
    return [view.constant(n).value.astype(np.float64).reshape(-1) for n in node.input[1:5]]


class TapBuilder:
    """Adds tap nodes to the working copy; names are unique and prefixed ``bnscope/``."""

    def __init__(self, model: onnx.ModelProto, view: GraphView):
        self.model, self.view, self.graph = model, view, model.graph
        self.opset = view.opset
        self.new_nodes: list[tuple[int, onnx.NodeProto]] = []  # (insert after node idx, node)
        self.outputs: list[onnx.ValueInfoProto] = []  # graph outputs, typed and shaped for onnx.checker
        self.parts: dict[tuple, list[tuple[str, str, str, int]]] = {}  # key -> [(layer, first, second, channels)]
        self.k = 0

    def _name(self, base: str) -> str:
        self.k += 1
        return f"bnscope/{self.k}/{base}"

    def _const(self, base: str, value: np.ndarray) -> str:
        name = self._name(base)
        self._initializer(numpy_helper.from_array(value, name))
        return name

    def _initializer(self, tensor: onnx.TensorProto) -> None:
        self.graph.initializer.append(tensor)
        if self.model.ir_version < 4:  # IR 3: every initializer must also be a graph input
            self.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))

    def _declare(self, name: str, elem: int, shape) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def _batch_dim(self, x: str):
        shape = self.view.shape_of(x)
        return shape[0] if shape and isinstance(shape[0], (int, str)) else None

    def _spatial(self, x: str) -> int | None:
        """Values per sample and channel when shape inference knows them all, else None."""
        shape = self.view.shape_of(x)
        if not shape or any(not isinstance(d, int) or d < 0 for d in shape[2:]):
            return None
        return int(np.prod(shape[2:], dtype=np.int64))

    def _pack(
        self, layer: str, x: str, first: str, second: str, columns: int, elem: int, rank: int, flat: bool = False
    ) -> None:
        """Queue a tap's two (N, columns, ...) statistics for the output of their kind. Taps share
        an output only when their batch dimension is provably the same (Concat needs it)."""
        batch = self._batch_dim(x)
        alone = x if batch is None else None  # an unknown batch dimension: this tap's own output
        self.parts.setdefault((rank, elem, batch, alone, flat), []).append((layer, first, second, columns, flat))

    def _is_flat(self, x: str, spatial: int | None) -> bool:
        """Whether x's statistics go out flat (see FLAT_MAX_SPATIAL)."""
        rank, producer = self.view.rank_of(x), self.view.producer_of(x)
        made_by_conv = producer is not None and self.view.nodes[producer].op_type in CONV_OPS
        return (
            rank is not None and rank >= 3 and spatial is not None and spatial <= FLAT_MAX_SPATIAL and not made_by_conv
        )

    def _flat_pair(self, after: int, t: str, base: str) -> tuple[str, str]:
        """(Flatten(t), its square): per sample, every value of every channel."""
        flat = self._node(after, "Flatten", [t], f"{base}1", axis=1)
        return flat, self._node(after, "Mul", [flat, flat], f"{base}2")

    def _shape_tap(self, after: int, x: str, spatial: int | None, rank: int | None) -> dict:
        if spatial is not None:
            return {}
        return {"shape": self._declare(self._node(after, "Shape", [x], "shape"), TensorProto.INT64, [rank])}

    def _node(self, after: int, op: str, inputs, base: str, **attrs) -> str:
        out = self._name(base)
        self.new_nodes.append((after, helper.make_node(op, list(inputs), [out], name=out, **attrs)))
        return out

    def _compute_input(self, after: int, x: str) -> tuple[str, np.dtype]:
        """x in a dtype fit for summing: float16/bfloat16 are cast to float32."""
        elem = self.view.elem_type_of(x) or TensorProto.FLOAT
        if elem in LOW_PRECISION:
            return self._node(after, "Cast", [x], "x32", to=TensorProto.FLOAT), np.dtype(np.float32)
        return x, helper.tensor_dtype_to_np_dtype(elem)

    def input_sums(self, idx: int, name: str, node: onnx.NodeProto) -> Tap:
        x = node.input[0]
        shift = self.view.constant(node.input[3]).value.astype(np.float64).reshape(-1)
        channels = shift.shape[0]
        xc, dtype = self._compute_input(idx, x)
        shift = shift.astype(dtype).astype(np.float64)  # the c the graph subtracts, rounded alike
        rank = self.view.rank_of(x)
        spatial = (1 if rank == 2 else self._spatial(x)) if rank is not None else None
        counted = x
        if rank is None:  # (N, C, ...) -> (N, C, L) so the axes are known whatever the rank
            xc = counted = self._node(idx, "Reshape", [xc, self._const("shape3", np.array([0, 0, -1], np.int64))], "x3")
            rank = 3
        c = self._const("shift", shift.astype(dtype).reshape((-1,) + (1,) * (rank - 2)))
        centred = self._node(idx, "Sub", [xc, c], "centred")
        elem = helper.np_dtype_to_tensor_dtype(dtype)
        flat = rank > 2 and self._is_flat(x, spatial)
        if rank == 2:  # one value per sample: s1 is the centred value and s2 its square
            s1, s2 = centred, self._node(idx, "Mul", [centred, centred], "s2")
        elif flat:
            s1, s2 = self._flat_pair(idx, centred, "s")
        else:
            axes = list(range(2, rank))
            s1 = self._reduce(idx, "ReduceSum", centred, axes, "s1")
            s2 = self._reduce(idx, "ReduceSumSquare", centred, axes, "s2")
        tap = Tap(name, channels, INPUT_SUMS, {}, shift, spatial=spatial, flat=flat)
        self._pack(name, x, s1, s2, tap.columns, elem, 2, flat)
        outputs = {"s1": s1, "s2": s2, **self._shape_tap(idx, counted, spatial, rank)}
        return replace(tap, outputs=outputs)

    def output_pool(self, idx: int, name: str, node: onnx.NodeProto) -> Tap:
        gamma, beta, mean, var = bn_params(self.view, node)
        eps = bn_attributes(node, self.view.opset).epsilon
        gain = gamma / np.sqrt(var + np.float64(np.float32(eps)))
        y, dtype = self._compute_input(idx, node.output[0])
        x, rank, elem = node.input[0], self.view.rank_of(node.input[0]), helper.np_dtype_to_tensor_dtype(dtype)
        spatial = self._spatial(x)
        flat = self._is_flat(x, spatial)
        if flat:  # sums over the samples of y and y^2, per value: the host adds a channel's values
            m1, m2 = self._flat_pair(idx, y, "y")
        else:  # per-sample means of y and y^2
            m1 = self._node(idx, "GlobalAveragePool", [y], "m1")
            m2 = self._node(idx, "GlobalAveragePool", [self._node(idx, "Mul", [y, y], "y2")], "m2")
        tap = Tap(name, gamma.shape[0], OUTPUT_POOL, {}, mean, gain, beta - mean * gain, spatial, flat)
        self._pack(name, x, m1, m2, tap.columns, elem, 2 if flat else rank, flat)
        outputs = {"m1": m1, "m2": m2, **self._shape_tap(idx, node.output[0], spatial, rank)}
        return replace(tap, outputs=outputs)

    def _reduce(self, after: int, op: str, x: str, axes: list[int], base: str) -> str:
        axes_as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if axes_as_input:
            return self._node(after, op, [x, self._const("axes", np.array(axes, np.int64))], base, keepdims=0)
        return self._node(after, op, [x], base, axes=axes, keepdims=0)

    def replace_with_batch_norm_ops(self, idx: int, node: onnx.NodeProto) -> None:
        """Train mode: y = (x - mean_b) / sqrt(var_b + eps) * gamma + beta with batch moments."""
        x, y = node.input[0], node.output[0]
        gamma, beta, _, _ = bn_params(self.view, node)
        eps = bn_attributes(node, self.view.opset).epsilon
        xc, dtype = self._compute_input(idx, x)
        rank = self.view.rank_of(x)
        flat = rank is None  # normalise (N, C, L) and reshape back to x's shape
        if flat:
            xc = self._node(idx, "Reshape", [xc, self._const("shape3", np.array([0, 0, -1], np.int64))], "x3")
            rank = 3
        axes = [0] + list(range(2, rank))
        per_channel = (-1,) + (1,) * (rank - 2)
        mean = self._reduce_mean(idx, xc, axes)
        centred = self._node(idx, "Sub", [xc, mean], "bc")
        var = self._reduce_mean(idx, self._node(idx, "Mul", [centred, centred], "bc2"), axes)
        std = self._node(
            idx, "Sqrt", [self._node(idx, "Add", [var, self._const("eps", np.array(eps, dtype))], "ve")], "std"
        )
        normed = self._node(idx, "Div", [centred, std], "norm")
        scaled = self._node(idx, "Mul", [normed, self._const("gamma", gamma.astype(dtype).reshape(per_channel))], "g")
        out_dtype = self.view.elem_type_of(x) or TensorProto.FLOAT
        offset = self._const("beta", beta.astype(dtype).reshape(per_channel))
        shifted = self._node(idx, "Add", [scaled, offset], "train_bn")
        if flat:
            shifted = self._node(idx, "Reshape", [shifted, self._node(idx, "Shape", [x], "xshape")], "unflat")
        if out_dtype in LOW_PRECISION:
            shifted = self._node(idx, "Cast", [shifted], "cast", to=out_dtype)
        self.new_nodes[-1][1].output[0] = y  # the last node made writes the BN's output
        node.op_type = "Identity"  # placeholder removed in finish(); keeps indices stable
        del node.input[1:]
        del node.output[:]

    def _reduce_mean(self, after: int, x: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self._node(
                after, "ReduceMean", [x, self._const("axes", np.array(axes, np.int64))], "mean", keepdims=1
            )
        return self._node(after, "ReduceMean", [x], "mean", axes=axes, keepdims=1)

    def finish(self) -> list[Pack]:
        """Insert the new nodes after their anchors, pack the statistics, and make the packs (and
        any Shape taps) the only outputs."""
        nodes = list(self.graph.node)
        by_anchor: dict[int, list[onnx.NodeProto]] = {}
        for after, node in self.new_nodes:
            by_anchor.setdefault(after, []).append(node)
        ordered = []
        for i, node in enumerate(nodes):
            if not (node.op_type == "Identity" and not node.output):
                ordered.append(node)
            ordered.extend(by_anchor.get(i, []))
        packs, concats = self._packs()
        copies = []
        for node in ordered + concats:
            c = onnx.NodeProto()
            c.CopyFrom(node)
            copies.append(c)
        del self.graph.node[:]
        self.graph.node.extend(copies)
        del self.graph.output[:]
        self.graph.output.extend(self.outputs)
        return packs

    def _packs(self) -> tuple[list[Pack], list[onnx.NodeProto]]:
        """One output per pack key, (2W,): the first statistics, then the second ones, each summed
        over the samples; and the Shape of a (N, ...) statistic (the batch size). Pooled taps are
        concatenated (axis 1) and then summed (one small ReduceSum); flat taps, too big to copy,
        are summed each and then concatenated."""
        packs, nodes, declared = [], [], []
        for (rank, elem, *_), parts in self.parts.items():
            layers, firsts, seconds, widths = (tuple(p[i] for p in parts) for i in range(4))
            output, samples = self._name("pack"), self._name("samples")
            flat = any(p[4] for p in parts)
            if flat:
                summed = [self._sum_over_samples(nodes, t) for t in (*firsts, *seconds)]
                nodes.append(helper.make_node("Concat", summed, [output], name=output, axis=0))
                counted = firsts[0]
            else:
                counted = self._name("per_sample")
                nodes.append(helper.make_node("Concat", [*firsts, *seconds], [counted], name=counted, axis=1))
                if rank > 2:  # (N, 2W, 1, ...) -> (N, 2W): onnxruntime sums the first axis of a matrix fast
                    flattened = self._name("flat")
                    nodes.append(helper.make_node("Flatten", [counted], [flattened], name=flattened, axis=1))
                    counted = flattened
                self._sum_over_samples(nodes, counted, output)
            nodes.append(helper.make_node("Shape", [counted], [samples], name=samples))
            declared.append(helper.make_tensor_value_info(output, elem, [2 * sum(widths)]))
            declared.append(helper.make_tensor_value_info(samples, TensorProto.INT64, [2]))
            packs.append(Pack(output, samples, layers, firsts, seconds, widths))
        self.outputs[:0] = declared
        return packs, nodes

    def _sum_over_samples(self, nodes: list, matrix: str, output: str | None = None) -> str:
        """ReduceSum over axis 0 of an (N, K) matrix, appended to ``nodes``."""
        output = output or self._name("summed")
        if self.opset >= 13:
            axes = self._const("pack_axes", np.array([0], np.int64))
            nodes.append(helper.make_node("ReduceSum", [matrix, axes], [output], name=output, keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceSum", [matrix], [output], name=output, axes=[0], keepdims=0))
        return output
