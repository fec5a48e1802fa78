"""Graph surgery for the taps ``instrument`` chose: the nodes that reduce each BN input (or output)
to per-channel sums inside the graph, packed into few outputs.

Each tap first reduces one sample's spatial values (GlobalAveragePool keeps onnxruntime's blocked
NCHWc layout); the pack then sums those (N, 2W) per-sample statistics over the samples,
    pack = ReduceSum_n Concat(first_1 .. first_k, second_1 .. second_k)    shape (2W,)
so a batch hands the host O(C) float32 numbers per layer whatever its size, plus the pack's
Shape (the batch's sample count N; int64, no data read).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnscope.choices import Strategy
from bnscope.onnxio.bn import bn_attributes
from bnscope.onnxio.graph import GraphView
from bnscope.stats.tap_map import Pack, Tap
from bnscope.stats.train_ops import LOW_PRECISION, TrainModeOps, bn_params

INPUT_SUMS = Strategy.input_sums.value

# "flat" taps: a tensor with at most this many values per sample and channel, not made by a Conv
# (no NCHWc layout or activation fusion to keep), is flattened to (N, C * spatial) and summed over
# the samples as it is: onnxruntime sums the first axis of a matrix far faster than it pools tiny
# windows (8 BN on [256, 512, 2, 2]: 1.6x plain inference against 5.5x with GlobalAveragePool).
FLAT_MAX_SPATIAL = 64
CONV_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "FusedConv"})

OUTPUT_POOL = Strategy.output_pool.value


class TapBuilder(TrainModeOps):
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
        self,
        layer: str,
        x: str,
        stats: tuple[str, ...],
        columns: int,
        elem: int,
        rank: int,
        flat: bool = False,
        direct: bool = False,
    ) -> None:
        """Queue a tap's (N, columns, ...) statistics (two; flat: three) for the output of their
        kind. Taps share an output only when their batch dimension is provably the same.
        ``direct`` statistics are the batch's (C,) mean and variance; x then counts the samples."""
        batch = self._batch_dim(x)
        alone = x if batch is None else None  # an unknown batch dimension: this tap's own output
        key = (rank, elem, batch, alone, flat, len(stats) > 2, direct)
        self.parts.setdefault(key, []).append((layer, *stats[:2], columns, stats[2:], x))

    def _is_flat(self, x: str, spatial: int | None) -> bool:
        """Whether x's statistics go out flat (see FLAT_MAX_SPATIAL)."""
        rank, producer = self.view.rank_of(x), self.view.producer_of(x)
        made_by_conv = producer is not None and self.view.nodes[producer].op_type in CONV_OPS
        return (
            rank is not None and rank >= 3 and spatial is not None and spatial <= FLAT_MAX_SPATIAL and not made_by_conv
        )

    def _flat_stats(self, after: int, t: str, base: str) -> tuple[str, str, str]:
        """(d, d^2, t0) with t0 = the batch's first sample of Flatten(t) and d = Flatten(t) - t0:
        every value of every channel, shifted by a value of the same batch so that float32 sums of
        d and d^2 lose nothing to cancellation, however far the data are from the running mean."""
        flat = self._node(after, "Flatten", [t], f"{base}flat", axis=1)
        first = self._node(after, "Gather", [flat, self._const("sample0", np.array([0], np.int64))], f"{base}0", axis=0)
        shifted = self._node(after, "Sub", [flat, first], f"{base}1")
        return shifted, self._node(after, "Mul", [shifted, shifted], f"{base}2"), first

    def _corner_shifted_sums(self, after: int, x: str, rank: int, channels: int) -> tuple[str, str, str]:
        """Per sample, sums over the spatial axes of d = x - x0 and d^2, with x0 per channel the
        mean of the batch's first sample (not one value of it: a single outlier, a saturated pixel,
        would cost float32 sums of d^2 their precision); and x0 as (1, C)."""
        first = self._node(after, "Gather", [x, self._const("sample0", np.array([0], np.int64))], "x0", axis=0)
        rows = self._node(after, "Reshape", [first, self._const("rows", np.array([1, channels, -1], np.int64))], "x0r")
        corner = self._reduce(after, "ReduceMean", rows, [2], "c0", keepdims=1)
        broadcast = np.array([1, channels] + [1] * (rank - 2), np.int64)
        shifted = self._node(
            after, "Sub", [x, self._node(after, "Reshape", [corner, self._const("b", broadcast)], "cb")], "d"
        )
        axes = list(range(2, rank))
        corner_row = self._node(
            after, "Reshape", [corner, self._const("row", np.array([1, channels], np.int64))], "c0r"
        )
        return (
            self._reduce(after, "ReduceSum", shifted, axes, "s1"),
            self._reduce(after, "ReduceSumSquare", shifted, axes, "s2"),
            corner_row,
        )

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
        rank = self.view.rank_of(x)
        spatial = (1 if rank == 2 else self._spatial(x)) if rank is not None else None
        counted = x
        if rank is None:  # (N, C, ...) -> (N, C, L) so the axes are known whatever the rank
            xc = counted = self._node(idx, "Reshape", [xc, self._const("shape3", np.array([0, 0, -1], np.int64))], "x3")
            rank = 3
        elem = helper.np_dtype_to_tensor_dtype(dtype)
        flat = rank == 2 or self._is_flat(x, spatial)
        # Shifted by a value of the same batch, not by c: float32 sums then lose nothing to
        # cancellation however far the data are from the running mean (see _flat_stats).
        stats = self._flat_stats(idx, xc, "s") if flat else self._corner_shifted_sums(idx, xc, rank, channels)
        tap = Tap(name, channels, INPUT_SUMS, {}, shift, spatial=spatial, flat=flat)
        self._pack(name, x, stats, tap.columns, elem, 2, flat)
        outputs = {"s1": stats[0], "s2": stats[1], **self._shape_tap(idx, counted, spatial, rank)}
        return replace(tap, outputs=outputs)

    def output_pool(self, idx: int, name: str, node: onnx.NodeProto, centre: bool = False) -> Tap:
        """Taps y; with ``centre``, y - beta (the mean y has on data that match the running
        statistics; flat taps: y minus the batch's first sample), so that float32 E[t^2] - E[t]^2
        keeps its precision where |beta| >> |gamma|."""
        gamma, beta, mean, var = bn_params(self.view, node)
        eps = bn_attributes(node, self.view.opset).epsilon
        gain = gamma / np.sqrt(var + np.float64(np.float32(eps)))
        y, dtype = self._compute_input(idx, node.output[0])
        x, rank, elem = node.input[0], self.view.rank_of(node.input[0]), helper.np_dtype_to_tensor_dtype(dtype)
        spatial = self._spatial(x)
        flat = self._is_flat(x, spatial)
        offset = beta - mean * gain
        if centre and not flat and rank is not None:
            rounded = beta.astype(dtype)
            y = self._node(idx, "Sub", [y, self._const("beta", rounded.reshape((-1,) + (1,) * (rank - 2)))], "yc")
            offset = offset - rounded.astype(np.float64)  # t = y - beta = a x + (b - beta)
        if flat and centre:  # per value, sums over the samples shifted by the batch's first sample
            stats = self._flat_stats(idx, y, "y")
        elif flat:  # per value, sums of y and y^2 over the samples: the host adds up each channel's
            flattened = self._node(idx, "Flatten", [y], "yflat", axis=1)
            stats = (flattened, self._node(idx, "Mul", [flattened, flattened], "y2"))
        else:  # per-sample means of y and y^2
            m1 = self._node(idx, "GlobalAveragePool", [y], "m1")
            stats = (m1, self._node(idx, "GlobalAveragePool", [self._node(idx, "Mul", [y, y], "y2")], "m2"))
        tap = Tap(name, gamma.shape[0], OUTPUT_POOL, {}, mean, gain, offset, spatial, flat)
        self._pack(name, x, stats, tap.columns, elem, 2 if flat else rank, flat)
        outputs = {"m1": stats[0], "m2": stats[1], **self._shape_tap(idx, node.output[0], spatial, rank)}
        return replace(tap, outputs=outputs)

    def _reduce(self, after: int, op: str, x: str, axes: list[int], base: str, keepdims: int = 0) -> str:
        axes_as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if axes_as_input:
            return self._node(after, op, [x, self._const("axes", np.array(axes, np.int64))], base, keepdims=keepdims)
        return self._node(after, op, [x], base, axes=axes, keepdims=keepdims)

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
        """One output per pack key, (2W,) or (3W,): the first statistics, then the second ones,
        each summed over the samples, then any shifts (input_sums and flat taps); and the Shape of
        a (N, ...) statistic (the batch size). Pooled taps are concatenated (axis 1) and then
        summed (one small ReduceSum); flat taps, too big to copy, are summed each."""
        packs, nodes, declared = [], [], []
        for (rank, elem, _, _, flat, _, direct), parts in self.parts.items():
            layers, firsts, seconds, widths = (tuple(p[i] for p in parts) for i in range(4))
            shifts = tuple(t for p in parts for t in p[4])
            output, samples = self._name("pack"), self._name("samples")
            if direct:  # (C,) each: one Concat to (2W,); x's Shape counts the samples
                nodes.append(helper.make_node("Concat", [*firsts, *seconds], [output], name=output, axis=0))
                nodes.append(helper.make_node("Shape", [parts[0][5]], [samples], name=samples))
                declared.append(helper.make_tensor_value_info(output, elem, [2 * sum(widths)]))
                declared.append(helper.make_tensor_value_info(samples, TensorProto.INT64, [None]))
                packs.append(Pack(output, samples, layers, firsts, seconds, widths, direct=True))
                continue
            if flat:
                ones = self._ones_per_sample(nodes, firsts[0], elem)
                summed = [self._sum_over_samples(nodes, t, ones=ones) for t in (*firsts, *seconds)]
                counted = firsts[0]
            else:
                counted = self._name("per_sample")
                nodes.append(helper.make_node("Concat", [*firsts, *seconds], [counted], name=counted, axis=1))
                if rank > 2:  # (N, 2W, 1, ...) -> (N, 2W): onnxruntime sums the first axis of a matrix fast
                    flattened = self._name("flat")
                    nodes.append(helper.make_node("Flatten", [counted], [flattened], name=flattened, axis=1))
                    counted = flattened
                summed = [self._sum_over_samples(nodes, counted, None if shifts else output)]
            if flat or shifts:
                summed += [self._sum_over_samples(nodes, t) for t in shifts]  # (1, K) -> (K,)
                nodes.append(helper.make_node("Concat", summed, [output], name=output, axis=0))
            nodes.append(helper.make_node("Shape", [counted], [samples], name=samples))
            declared.append(helper.make_tensor_value_info(output, elem, [(3 if shifts else 2) * sum(widths)]))
            declared.append(helper.make_tensor_value_info(samples, TensorProto.INT64, [2]))
            packs.append(Pack(output, samples, layers, firsts, seconds, widths, shifts))
        self.outputs[:0] = declared
        return packs, nodes

    def _ones_per_sample(self, nodes: list, matrix: str, elem: int) -> str | None:
        """A vector of N ones for an (N, K) matrix (N read from it each batch), or None where the
        opset has no Shape(end=...)."""
        if self.opset < 15:
            return None
        rows, ones = self._name("rows"), self._name("ones")
        nodes.append(helper.make_node("Shape", [matrix], [rows], name=rows, end=1))
        one = numpy_helper.from_array(np.ones(1, helper.tensor_dtype_to_np_dtype(elem)))
        nodes.append(helper.make_node("ConstantOfShape", [rows], [ones], name=ones, value=one))
        return ones

    def _sum_over_samples(self, nodes: list, matrix: str, output: str | None = None, ones: str | None = None) -> str:
        """The sum over axis 0 of an (N, K) matrix, appended to ``nodes``: ``ones`` @ matrix where
        given (onnxruntime's GEMV reads the matrix once, about 8% of a BN's time less than ReduceSum
        on the wide-BN benchmark's taps), else ReduceSum."""
        output = output or self._name("summed")
        if ones is not None:
            nodes.append(helper.make_node("MatMul", [ones, matrix], [output], name=output))
        elif self.opset >= 13:
            axes = self._const("pack_axes", np.array([0], np.int64))
            nodes.append(helper.make_node("ReduceSum", [matrix, axes], [output], name=output, keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceSum", [matrix], [output], name=output, axes=[0], keepdims=0))
        return output
