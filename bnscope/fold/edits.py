"""The graph edits of one fold: scale the weights of the op before or after the BN, fold or insert
its bias, remove the BN and rewire its output. Every value is computed in float64 and cast once.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from bnscope import numerics
from bnscope.fold.into_next import following_bias_add
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.nodes import attribute_values


def fold_previous(editor, view, plan, target, scale, shift):
    bn = view.nodes[plan.bn]
    if plan.feature_channels is not None:  # through a Reshape: one (scale, shift) per output feature
        scale, shift = scale[plan.feature_channels], shift[plan.feature_channels]
    bias_shift = np.zeros_like(shift) if plan.bias_add is not None else shift
    op = target.op_type
    if op == "BatchNormalization":
        return merge_bn_pair(editor, view, plan, scale, shift)
    w_name = target.input[plan.weight_input]
    w = view.constant(w_name).value
    last = view.nodes[view.producer_of(bn.input[0])]  # what feeds the BN now takes its output name
    if op in ("Conv", "ConvTranspose"):
        b = input_value(view, target, 2)
        if op == "Conv":
            new_w, new_b = numerics.fold_into_weight(w, b, scale, bias_shift, axis=0)
        else:
            group = int(attribute_values(target).get("group", 1))
            new_w, new_b = numerics.fold_into_weight_grouped_transpose(w, b, scale, bias_shift, group)
        axis = 0 if op == "Conv" else 1
        editor.set_input(target, 2, new_b, dtype=dtype_of(view, target, 2, w.dtype))
    elif op == "Gemm":
        axis = 0 if int(attribute_values(target).get("transB", 0)) else 1
        new_w = numerics.scaled_along(w, scale, axis)
        fold_gemm_bias(editor, view, target, lambda c: c * scale + bias_shift, w.dtype)
    else:  # MatMul: X @ W scales W's columns, W @ X scales its rows
        axis = 1 if plan.weight_input == 1 else 0
        new_w = numerics.scaled_along(w, scale, axis)
        if plan.bias_add is None:
            added = insert_bias_add(editor, view, target, feature_shape(shift, plan.trailing_axes), plan, w.dtype)
            last = added if last is target else last
    editor.set_input(target, plan.weight_input, new_w, dtype=w.dtype)
    if plan.bias_add is not None:
        fold_bias_add(editor, view, plan, scale, shift)
    take_bn_output(editor, view, last, bn)
    if op == "ConvTranspose" and int(attribute_values(target).get("group", 1)) > 1:
        return growth(w, new_w, None, op, target)  # channels spread over groups
    return numerics.scaled_range_metrics(w, scale, axis)  # from W: no pass over the float64 W'


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


def growth(w, new_w, axis, op, target):
    if op == "ConvTranspose" and int(attribute_values(target).get("group", 1)) > 1:
        axis = None  # channels are spread over groups; report range growth only
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


def fold_next(editor, view, plan, target, scale, shift):
    """Every reader absorbs the BN; the BN's readers (layout chain or targets) then read its input."""
    growths = [
        fold_next_target(editor, view, plan, idx, weight, scale, shift)
        for idx, weight in plan.targets or ((plan.target, plan.weight_input),)
    ]
    bn = view.nodes[plan.bn]
    for idx in view.consumers_of(bn.output[0]):
        node = view.nodes[idx]
        for pos, name in enumerate(node.input):
            if name == bn.output[0]:
                node.input[pos] = bn.input[0]
    return max(g[0] for g in growths), growths[0][1]


def fold_next_target(editor, view, plan, idx, weight_input, scale, shift):
    target = view.nodes[idx]
    op = target.op_type
    w = view.constant(target.input[weight_input]).value
    attrs = attribute_values(target)
    if op == "Conv":
        b = input_value(view, target, 2)
        group = int(attrs.get("group", 1))
        new_w, new_b = numerics.fold_before_linear(w, b, scale, shift, in_axis=1, out_axis=0, group=group)
        editor.set_input(target, 2, new_b, dtype=dtype_of(view, target, 2, w.dtype))
        out_axis = 0
    elif op == "Gemm":
        trans_b = int(attrs.get("transB", 0))
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        new_w, extra = numerics.fold_before_linear(w, None, scale, shift, in_axis=in_axis, out_axis=out_axis)
        alpha = float(attrs.get("alpha", 1.0))
        fold_gemm_bias(editor, view, target, lambda c: c + alpha * extra, w.dtype)
    else:
        in_axis, out_axis = (0, 1) if weight_input == 1 else (1, 0)
        new_w, extra = numerics.fold_before_linear(w, None, scale, shift, in_axis=in_axis, out_axis=out_axis)
        add_next_bias(editor, view, plan, idx, extra if weight_input == 1 else extra.reshape(-1, 1), w.dtype)
    editor.set_input(target, weight_input, new_w, dtype=w.dtype)
    return growth(w, new_w, out_axis, op, target)


def add_next_bias(editor, view, plan, matmul, bias, dtype):
    """Merges the MatMul's new bias into the Add of a bias that follows it, else inserts an Add."""
    following = following_bias_add(view, matmul, plan.target_rank) if bias.ndim == 1 else None
    if following is None:
        insert_bias_add(editor, view, view.nodes[matmul], bias, plan, dtype)
        return
    add, pos = view.nodes[following[0]], following[1]
    const = view.constant(add.input[pos]).value
    editor.set_input(add, pos, const.astype(np.float64) + bias, dtype=const.dtype)


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
