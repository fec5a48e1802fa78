"""Long graphs: one fold pass keeps its graph index up to date instead of rebuilding it per BN
(issue 19: planning was quadratic), and BN lineage is one sweep. Not timed (benchmarks/
bench_fold_planning.py times it); these check that the plans and the lineage stay right.

    conv_bn_stack(n):  x -> n x [Conv(1x1) -> BN] -> y
    bn_chain(n):       x -> n x BN -> y
    mixed(n):          x -> n x [MatMul -> BN -> BN -> Relu]      (a MatMul fold inserts an Add)
"""

from __future__ import annotations

import numpy as np
import onnx
from graphs import bn_arrays, init, make_model, ort_run, vi
from onnx import helper

from bnscope.fold.rewrite import fold_batchnorm
from bnscope.onnxio.graph import GraphView
from bnscope.stats.lineage import bn_upstream


def _bn(rng, i, x, y, nodes, inits, c=4):
    values = bn_arrays(rng, c)
    inits.extend(init(f"bn{i}_{k}", v) for k, v in values.items())
    nodes.append(helper.make_node("BatchNormalization", [x] + [f"bn{i}_{k}" for k in values], [y], name=f"bn{i}"))


def conv_bn_stack(rng, n):
    nodes, inits, x = [], [], "x"
    for i in range(n):
        inits.append(init(f"w{i}", (rng.standard_normal((4, 4, 1, 1)) * 0.5).astype(np.float32)))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        _bn(rng, i, f"c{i}", f"y{i}", nodes, inits)
        x = f"y{i}"
    return make_model(nodes, [vi("x", [2, 4, 3, 3])], [vi(x, [2, 4, 3, 3])], inits)


def bn_chain(rng, n):
    nodes, inits, x = [], [], "x"
    for i in range(n):
        _bn(rng, i, x, f"y{i}", nodes, inits)
        x = f"y{i}"
    return make_model(nodes, [vi("x", [2, 4, 3])], [vi(x, [2, 4, 3])], inits)


def mixed(rng, n):
    nodes, inits, x = [], [], "x"
    for i in range(n):
        inits.append(init(f"w{i}", (rng.standard_normal((4, 4)) * 0.5).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        _bn(rng, 2 * i, f"m{i}", f"a{i}", nodes, inits)
        _bn(rng, 2 * i + 1, f"a{i}", f"b{i}", nodes, inits)
        nodes.append(helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    return make_model(nodes, [vi("x", [5, 4])], [vi(x, [5, 4])], inits)


def _index(view: GraphView) -> tuple[dict, dict]:
    producer = {name: view.nodes[i].name for name, i in view.producer.items()}
    consumers = {name: sorted(view.nodes[i].name for i in idx) for name, idx in view.consumers.items() if idx}
    return producer, consumers


def test_fold_long_conv_bn_stack_folds_every_bn_into_its_conv(rng):
    model = conv_bn_stack(rng, 300)
    folded, records = fold_batchnorm(model)
    assert [(r.name, r.folded, r.target) for r in records] == [(f"bn{i}", True, f"conv{i}") for i in range(300)]
    assert [n.op_type for n in folded.graph.node] == ["Conv"] * 300
    onnx.checker.check_model(folded, full_check=True)
    x = {"x": rng.standard_normal((2, 4, 3, 3)).astype(np.float32)}
    (want,), (got,) = ort_run(model, x), ort_run(folded, x)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_fold_long_bn_chain_merges_into_the_first_bn(rng):
    model = bn_chain(rng, 400)
    folded, records = fold_batchnorm(model)
    assert not records[0].folded and all(r.folded and r.direction == "into_previous" for r in records[1:])
    (node,) = folded.graph.node
    assert node.name == "bn0" and node.output[0] == "y399"
    x = {"x": rng.standard_normal((2, 4, 3)).astype(np.float32)}
    (want,), (got,) = ort_run(model, x), ort_run(folded, x)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_fold_pass_index_matches_a_fresh_index_of_the_rewritten_graph(rng):
    """The index one pass keeps up to date equals one built from scratch on the graph it wrote."""
    import bnscope.fold.rewrite as rewrite

    model = mixed(rng, 40)
    seen = []
    original = rewrite.GraphEditor

    class Spy(original):
        def commit(self):
            super().commit()
            live = [i for i in range(len(self.view.nodes)) if i not in self.view._gone]
            fresh = GraphView(self.model)
            seen.append((sorted(self.view.nodes[i].name for i in live), _index(self.view), fresh))

    rewrite.GraphEditor = Spy
    try:
        folded, records = rewrite.fold_batchnorm(model)
    finally:
        rewrite.GraphEditor = original
    assert all(r.folded for r in records) and len(records) == 80
    for names, index, fresh in seen:
        assert names == sorted(n.name for n in fresh.nodes)
        assert index == _index(fresh)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add", "Relu"] * 40
    x = {"x": rng.standard_normal((5, 4)).astype(np.float32)}
    (want,), (got,) = ort_run(model, x), ort_run(folded, x)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_bn_upstream_of_a_long_chain_and_a_branch(rng):
    model = bn_chain(rng, 500)
    upstream = bn_upstream(GraphView(model))
    assert all(upstream[f"bn{k}"] == {f"bn{i}" for i in range(k)} for k in (0, 1, 250, 499))
    # two branches from bn0 joined by an Add: bn_a and bn_b see bn0 only, bn_c sees all three
    nodes, inits = [], []
    for i, (x, y) in enumerate([("x", "t"), ("t", "a"), ("t", "b")]):
        _bn(rng, i, x, y, nodes, inits)
    nodes.append(helper.make_node("Add", ["a", "b"], ["s"], name="add"))
    _bn(rng, 3, "s", "y", nodes, inits)
    branched = make_model(nodes, [vi("x", [2, 4, 3])], [vi("y", [2, 4, 3])], inits)
    assert dict(bn_upstream(GraphView(branched))) == {
        "bn0": set(),
        "bn1": {"bn0"},
        "bn2": {"bn0"},
        "bn3": {"bn0", "bn1", "bn2"},
    }
