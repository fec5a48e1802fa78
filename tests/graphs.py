"""Shared builders for tests: tiny ONNX graphs, BN parameters, unoptimised onnxruntime runs.

A plain module the tests import (``from graphs import make_model``); fixtures live in conftest.py.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT


def vi(name: str, shape, elem_type: int = F32) -> onnx.ValueInfoProto:
    """A graph input/output description."""
    return helper.make_tensor_value_info(name, elem_type, shape)


def init(name: str, value) -> onnx.TensorProto:
    """An initializer from a numpy array."""
    return numpy_helper.from_array(np.asarray(value), name)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, ir_version: int | None = None):
    """A one-graph model; IR version defaults to what ``onnx.helper`` picks for the opset (at most
    10). Outputs given with shape None get their inferred shape."""
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version or min(model.ir_version, 10)
    if any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        for out, done in zip(model.graph.output, inferred.graph.output):
            out.CopyFrom(done)
    return model


def bn_arrays(rng: np.random.Generator, c: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Valid BN parameters: gamma, beta, mean, and variance ``abs(randn) + 0.1``."""
    return {
        "scale": rng.standard_normal(c).astype(dtype),
        "B": rng.standard_normal(c).astype(dtype),
        "mean": rng.standard_normal(c).astype(dtype),
        "var": (np.abs(rng.standard_normal(c)) + 0.1).astype(dtype),
    }


def bn_inits(rng: np.random.Generator, c: int, prefix: str = "bn", dtype=np.float32) -> list[onnx.TensorProto]:
    """BN parameters as initializers named ``{prefix}_scale`` ... ``{prefix}_var``."""
    return [init(f"{prefix}_{k}", v) for k, v in bn_arrays(rng, c, dtype).items()]


def bn_node(x: str, y: str | list[str], prefix: str = "bn", name: str | None = None, **attrs) -> onnx.NodeProto:
    """A BatchNormalization reading ``{prefix}_scale/B/mean/var``."""
    ins = [x] + [f"{prefix}_{k}" for k in ("scale", "B", "mean", "var")]
    outs = [y] if isinstance(y, str) else list(y)
    return helper.make_node("BatchNormalization", ins, outs, name=prefix if name is None else name, **attrs)


def ort_run(model: onnx.ModelProto, feeds: dict, disable_all: bool = True) -> list[np.ndarray]:
    """Runs on CPU; ``disable_all`` keeps onnxruntime from folding Conv+BN itself."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if disable_all:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ref_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """Runs with ``onnx.reference`` (for dtypes onnxruntime's CPU kernels lack, e.g. float64 Conv)."""
    from onnx.reference import ReferenceEvaluator

    return list(ReferenceEvaluator(model).run(None, feeds))


def bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def assert_well_formed(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    """Structure a fold must keep: valid model, same graph I/O, unique and used initializers."""
    onnx.checker.check_model(folded, full_check=True)
    real = lambda m: [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]  # noqa: E731
    assert real(folded) == real(original)
    assert [o.name for o in folded.graph.output] == [o.name for o in original.graph.output]
    names = [t.name for t in folded.graph.initializer]
    assert len(names) == len(set(names)), "duplicate initializer names"
    read = {x for n in folded.graph.node for x in n.input} | {o.name for o in folded.graph.output}
    assert not [t for t in names if t not in read], "unused initializers"


def check_fold(model, feeds, options=None, *, folded_bns=None, rtol=1e-4, atol=1e-5, run=ort_run):
    """Folds ``model``; asserts it is unmutated, well formed, fewer BN, and equal by value.

    Values are compared with ``atol`` scaled by the largest output magnitude (at least 1).

    Returns:
        ``(folded model, records)``.
    """
    from bnscope.fold.plan import FoldOptions
    from bnscope.fold.rewrite import fold_batchnorm

    before = model.SerializeToString()
    folded, records = fold_batchnorm(model, options or FoldOptions())
    assert model.SerializeToString() == before, "input model was mutated"
    n_folded = sum(r.folded for r in records)
    if folded_bns is not None:
        assert n_folded == folded_bns, [r.reason for r in records if not r.folded]
    assert bn_count(folded) == bn_count(model) - n_folded
    assert_well_formed(model, folded)
    want, got = run(model, feeds), run(folded, feeds)
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and g.shape == w.shape
        scale = float(np.max(np.abs(w))) if w.size else 1.0
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * max(scale, 1.0))
    return folded, records


def bn_in_if_branches_model() -> onnx.ModelProto:
    # x -> BN(main_bn) -> h -> If(cond) { then: BN(then_bn)(h) ; else: BN(else_bn)(h) } -> y
    c = 2
    params = {
        n: numpy_helper.from_array(v.astype(np.float32), n)
        for n, v in (("s", np.ones(c)), ("b", np.zeros(c)), ("m", np.zeros(c)), ("v", np.ones(c)))
    }

    def branch(name: str) -> onnx.GraphProto:
        bn = helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], [f"{name}_out"], name=name)
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)
        return helper.make_graph([bn], f"{name}_body", [], [out])

    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["h"], name="main_bn"),
        helper.make_node(
            "If", ["cond"], ["y"], name="choose", then_branch=branch("then_bn"), else_branch=branch("else_bn")
        ),
    ]
    cond = numpy_helper.from_array(np.array(True), "cond")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 3, 3])],
        [*params.values(), cond],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def tiny_bn_model(rng: np.random.Generator | None = None) -> onnx.ModelProto:
    """x (N,3,8,8) -> Conv(3->4, 3x3, pads 1) -> h -> BN -> y -> Relu -> out"""
    rng = rng or np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("h", "y"),
        helper.make_node("Relu", ["y"], ["out"], name="relu"),
    ]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("out", ["N", 4, 8, 8])], [init("w", w), *bn_inits(rng, 4)])


def cyclic_model() -> onnx.ModelProto:
    """x -> Add(x, c) -> a -> Relu -> c: a cycle, so no topological order exists (an unsorted DAG loads)."""
    nodes = [
        helper.make_node("Add", ["x", "c"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["c"], name="relu"),
    ]
    return make_model(nodes, [vi("x", ["N", 4])], [vi("a", ["N", 4])], ir_version=8)
