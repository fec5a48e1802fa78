"""A layer, for quantisation: a linear op's output and the elementwise activation chain after it.

After folding, a Conv's output carries the BN's output distribution (per channel about
``beta +- k |gamma|``); onnxruntime's QDQ quantizer then puts a uint8 Q/DQ pair on that tensor and on
every elementwise tensor after it (Paddle's HardSwish is ``y * Clip(y + 3, 0, 6) / 6``: four more).
The chain is followed while each node is elementwise (``CHAIN_OPS``), its other inputs are constants
or tensors of the chain, and the tensor has no consumer outside the chain except at its end. It is
evaluated in numpy (:func:`run_chain`), so the same function gives the predicted damage (on samples
drawn from the BN statistics) and the measured one (on the real tensor).

A knee is where an activation bends inside a bounded interval of the linear op's output:
``Clip(a y + b, lo, hi)`` bends over ``[(lo - b) / a, (hi - b) / a]``, ``HardSigmoid(alpha, beta)`` over
``[-beta / alpha, (1 - beta) / alpha]``, ``HardSwish`` over ``[-3, 3]``. Relu, LeakyRelu and PRelu bend at
0 only: no interval, and scaling passes through them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.nodes import attribute_values

CHAIN_OPS = {"Add", "Sub", "Mul", "Div", "Clip", "Relu", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Sigmoid"}


@dataclass(frozen=True)
class Chain:
    """The linear op's output ``start``, the chain's nodes in order, its tensors, and its knee."""

    start: str
    nodes: tuple[onnx.NodeProto, ...]
    tensors: tuple[str, ...]  # start first, then every chain node's output
    activation: str  # e.g. "HardSwish (Add, Clip, Mul, Div)", "Relu", "none"
    knee: tuple[float, float] | None  # in units of ``start``

    @property
    def end(self) -> str:
        return self.tensors[-1]


def follow_chain(view: GraphView, start: str) -> Chain:
    """The elementwise chain after ``start`` (a Conv output): the nodes reached from it through
    ``CHAIN_OPS`` that read only chain tensors and constants, kept only when exactly one chain tensor
    is read outside the chain (or is a graph output)."""
    inside, chosen = {start}, set()
    grown = True
    while grown:
        grown = False
        for idx in sorted({i for t in inside for i in view.consumers_of(t)} - chosen):
            if _continues(view, view.nodes[idx], inside):
                chosen.add(idx)
                inside.add(view.nodes[idx].output[0])
                grown = True
    nodes = [view.nodes[i] for i in sorted(chosen)]
    exits = [t for t in inside if view.is_graph_output(t) or set(view.consumers_of(t)) - chosen]
    if len(exits) != 1 or (nodes and exits[0] != nodes[-1].output[0]):
        nodes = []
    tensors = (start, *(n.output[0] for n in nodes))
    return Chain(start, tuple(nodes), tensors, _describe(nodes), _knee(view, start, nodes))


def _continues(view: GraphView, node: onnx.NodeProto, inside: set[str]) -> bool:
    if node.op_type not in CHAIN_OPS or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return False
    return all(not i or i in inside or view.constant(i) is not None for i in node.input)


def _describe(nodes: list[onnx.NodeProto]) -> str:
    ops = [n.op_type for n in nodes]
    if not ops:
        return "none"
    if ops[:2] == ["Add", "Clip"] and "Mul" in ops:
        return "HardSwish (" + ", ".join(ops) + ")"
    if len(ops) == 1:
        return ops[0]
    return ", ".join(ops)


def _knee(view: GraphView, start: str, nodes: list[onnx.NodeProto]) -> tuple[float, float] | None:
    """The first bounded bend in units of ``start``, following a scalar affine map ``a y + b``."""
    a, b = 1.0, 0.0
    for node in nodes:
        op, attrs = node.op_type, attribute_values(node)
        if op == "HardSwish":
            return _interval(a, b, -3.0, 3.0)
        if op == "HardSigmoid":
            alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
            return _interval(a, b, -beta / alpha, (1 - beta) / alpha)
        if op == "Clip":
            lo, hi = _clip_bounds(view, node, attrs)
            return _interval(a, b, lo, hi)
        other = [i for i in node.input if i and view.constant(i) is not None]
        const = scalar_constant(view, other[0]) if len(other) == 1 and len(node.input) == 2 else None
        if op in ("Add", "Sub") and const is not None and node.input[0] != other[0]:
            b = b + const if op == "Add" else b - const
        elif op in ("Mul", "Div") and const is not None and const != 0 and node.input[0] != other[0]:
            a, b = (a * const, b * const) if op == "Mul" else (a / const, b / const)
        else:
            return None  # a tensor-dependent or per-channel step: no scalar knee to report
    return None


def _interval(a: float, b: float, lo: float, hi: float) -> tuple[float, float] | None:
    if a == 0 or not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    ends = sorted(((lo - b) / a, (hi - b) / a))
    return (float(ends[0]), float(ends[1]))


def _clip_bounds(view: GraphView, node: onnx.NodeProto, attrs: dict) -> tuple[float, float]:
    if "min" in attrs or "max" in attrs:
        return float(attrs.get("min", -np.inf)), float(attrs.get("max", np.inf))
    bounds = [(scalar_constant(view, node.input[i]) if len(node.input) > i and node.input[i] else None) for i in (1, 2)]
    lo, hi = (np.inf * s if v is None else v for v, s in zip(bounds, (-1, 1)))
    return float(lo), float(hi)


def scalar_constant(view: GraphView, tensor: str) -> float | None:
    """The value of a one-element constant ``tensor``, else None."""
    const = view.constant(tensor)
    if const is None or const.value.size != 1:
        return None
    return float(const.value.reshape(()))


def run_chain(view: GraphView, chain: Chain, start: np.ndarray, quantise=None) -> np.ndarray:
    """Evaluates the chain in float64 on ``start`` (N, C, ...). ``quantise(name, x)`` is applied to
    every chain tensor as onnxruntime's Q/DQ pairs would be (None: exact float)."""
    q = quantise or (lambda name, x: x)
    values = {chain.start: q(chain.start, np.asarray(start, dtype=np.float64))}
    for node in chain.nodes:
        args = [values[i] if i in values else _const(view, i) for i in node.input]
        values[node.output[0]] = q(node.output[0], _apply(node, args))
    return values[chain.end]


def _const(view: GraphView, name: str) -> np.ndarray | None:
    if not name:
        return None
    return np.asarray(view.constant(name).value, dtype=np.float64)


def _apply(node: onnx.NodeProto, args: list) -> np.ndarray:
    op, attrs = node.op_type, attribute_values(node)
    x = args[0]
    if op in ("Add", "Sub", "Mul", "Div"):
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](x, args[1])
    if op == "Clip":
        lo = attrs.get("min", args[1] if len(args) > 1 and args[1] is not None else -np.inf)
        hi = attrs.get("max", args[2] if len(args) > 2 and args[2] is not None else np.inf)
        return np.clip(x, lo, hi)
    if op == "Relu":
        return np.maximum(x, 0.0)
    if op == "LeakyRelu":
        return np.where(x >= 0, x, x * float(attrs.get("alpha", 0.01)))
    if op == "PRelu":
        return np.where(x >= 0, x, x * args[1])
    if op == "HardSigmoid":
        return np.clip(float(attrs.get("alpha", 0.2)) * x + float(attrs.get("beta", 0.5)), 0.0, 1.0)
    if op == "HardSwish":
        return x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)
    return 1.0 / (1.0 + np.exp(-x))  # Sigmoid
