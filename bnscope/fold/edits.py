"""The graph edits a fold is made of: fold a bias or an Add's constant, insert an Add, merge two
BNs, hand the BN's output name over. Every value is computed in float64 and cast once. Which of
them a fold uses is up to the op it folds into (:mod:`bnscope.fold.variants`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from bnscope import numerics
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.nodes import attribute_values


def take_bn_output(editor, view, last, bn):
    """``last`` now computes the BN's output: it takes that name, and its other (Shape/Size)
    readers follow it, since the two tensors have the same shape."""
    old = last.output[0]
    editor.rename_output(last, bn.output[0])
    for idx in view.consumers_of(old):
        node = view.nodes[idx]
        if node is not bn:
            for pos, name in enumerate(node.input):
                if name == old:
                    node.input[pos] = bn.output[0]


def range_growth(w, new_w, axis: int | None) -> tuple[float, float | None]:
    """(max|W'| / max|W|, the channel imbalance of W' along ``axis``; None without an axis)."""
    growth = numerics.weight_range_growth(w, new_w)
    imbalance = numerics.channel_range_imbalance(new_w, axis) if axis is not None else None
    return growth, imbalance


def merge_bn_pair(editor, view, plan, scale2, shift2):
    """BN1 -> BN2 becomes BN1 with gamma1*s2 and beta1*s2 + t2 (exact: BN2 is affine)."""
    first = view.nodes[plan.target]
    gamma, beta = (view.constant(first.input[i]).value for i in (1, 2))
    editor.set_input(first, 1, gamma.astype(np.float64) * scale2, dtype=gamma.dtype)
    editor.set_input(first, 2, beta.astype(np.float64) * scale2 + shift2, dtype=beta.dtype)
    editor.rename_output(first, view.nodes[plan.bn].output[0])
    return 1.0, None


def fold_gemm_bias(editor, view, gemm, transform, w_dtype):
    """Gemm: y = alpha*A*B + beta*C; the new C is transform(beta*C) and beta becomes 1."""
    attrs = attribute_values(gemm)
    beta = float(attrs.get("beta", 1.0))
    c = input_value(view, gemm, 2)
    scaled = np.zeros(1) if c is None or beta == 0.0 else beta * c.astype(np.float64)
    editor.set_input(gemm, 2, transform(scaled), dtype=dtype_of(view, gemm, 2, w_dtype))
    editor.set_attribute(gemm, "beta", 1.0)


def fold_bias_add(editor, view, plan, scale, shift):
    """Add(k) before the BN: k becomes k * scale + shift per output feature."""
    add = view.nodes[plan.bias_add]
    pos = 1 if view.constant(add.input[1]) is not None else 0
    const = view.constant(add.input[pos]).value
    s, t = (feature_shape(v, plan.trailing_axes) for v in (scale, shift))
    editor.set_input(add, pos, const.astype(np.float64) * s + t, dtype=const.dtype)


def insert_bias_add(editor, view, matmul, bias, plan, dtype) -> onnx.NodeProto:
    """MatMul has no bias: Add(MatMul output, bias) now produces the MatMul's output name."""
    out = matmul.output[0]
    mm_out = editor.fresh(out + "_mm")
    bias_name = editor.add_initializer(view.node_name(plan.bn) + "_folded_bias", bias, dtype)
    editor.rename_output(matmul, mm_out)
    add = helper.make_node("Add", [mm_out, bias_name], [out], name=editor.fresh(view.node_name(plan.bn) + "_folded"))
    editor.insert_after(matmul, add)
    return add


def feature_shape(v: np.ndarray, trailing_axes: int | None) -> np.ndarray:
    """Per-feature vector shaped to broadcast on the axis that has ``trailing_axes`` axes after it."""
    return v.reshape((-1,) + (1,) * (trailing_axes or 0))


def input_value(view: GraphView, node: onnx.NodeProto, pos: int) -> np.ndarray | None:
    if len(node.input) > pos and node.input[pos]:
        return view.constant(node.input[pos]).value
    return None


def dtype_of(view: GraphView, node: onnx.NodeProto, pos: int, default) -> np.dtype:
    value = input_value(view, node, pos)
    return value.dtype if value is not None else np.dtype(default)
