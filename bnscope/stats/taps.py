"""Graph surgery for the taps ``instrument`` chose: the nodes that reduce each BN input (or output)
to per-channel sums inside the graph, packed into few outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.nodes import bn_attributes

LOW_PRECISION = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


INPUT_SUMS = "input_sums"

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


@dataclass(frozen=True)
class Pack:
    """One graph output: every tap's first statistic side by side along axis 1, then every second
    statistic in the same order, so each half is one contiguous block of columns (rank-2 taps,
    whose one tensor is both statistics, appear in both halves)."""

    output: str
    layers: tuple[str, ...]  # the tap of each first (and its second), in column order
    firsts: tuple[str, ...]
    seconds: tuple[str, ...]
    widths: tuple[int, ...]  # channels of each first (and its second)

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

    def _pack(self, layer: str, x: str, first: str, second: str, channels: int, elem: int, rank: int) -> None:
        """Queue a tap's two (N, C, ...) statistics for the output of their kind. Taps share an
        output only when their batch dimension is provably the same (Concat needs it)."""
        batch = self._batch_dim(x)
        alone = x if batch is None else None  # an unknown batch dimension: this tap's own output
        self.parts.setdefault((rank, elem, batch, alone), []).append((layer, first, second, channels))

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
        if rank == 2:  # one value per sample: s1 is the centred value and s2 = s1^2, exact on the host
            s1 = s2 = centred
        else:
            axes = list(range(2, rank))
            s1 = self._reduce(idx, "ReduceSum", centred, axes, "s1")
            s2 = self._reduce(idx, "ReduceSumSquare", centred, axes, "s2")
        self._pack(name, x, s1, s2, channels, elem, 2)
        outputs = {"s1": s1, "s2": s2, **self._shape_tap(idx, counted, spatial, rank)}
        return Tap(name, channels, INPUT_SUMS, outputs, shift, spatial=spatial)

    def output_pool(self, idx: int, name: str, node: onnx.NodeProto) -> Tap:
        gamma, beta, mean, var = bn_params(self.view, node)
        eps = bn_attributes(node, self.view.opset).epsilon
        gain = gamma / np.sqrt(var + np.float64(np.float32(eps)))
        y, dtype = self._compute_input(idx, node.output[0])
        x, rank, elem = node.input[0], self.view.rank_of(node.input[0]), helper.np_dtype_to_tensor_dtype(dtype)
        spatial = self._spatial(x)
        m1 = self._node(idx, "GlobalAveragePool", [y], "m1")
        m2 = self._node(idx, "GlobalAveragePool", [self._node(idx, "Mul", [y, y], "y2")], "m2")
        self._pack(name, x, m1, m2, gamma.shape[0], elem, rank)
        outputs = {"m1": m1, "m2": m2, **self._shape_tap(idx, node.output[0], spatial, rank)}
        return Tap(
            name, gamma.shape[0], OUTPUT_POOL, outputs, mean, gain=gain, offset=beta - mean * gain, spatial=spatial
        )

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
        """One output per pack key: Concat (axis 1) of all first statistics, then all second ones."""
        packs, concats, declared = [], [], []
        for (rank, elem, batch, _), parts in self.parts.items():
            layers, firsts, seconds, widths = (tuple(p[i] for p in parts) for i in range(4))
            output = self._name("pack")
            concats.append(helper.make_node("Concat", [*firsts, *seconds], [output], name=output, axis=1))
            declared.append(helper.make_tensor_value_info(output, elem, [batch, 2 * sum(widths)] + [1] * (rank - 2)))
            packs.append(Pack(output, layers, firsts, seconds, widths))
        self.outputs[:0] = declared
        return packs, concats
