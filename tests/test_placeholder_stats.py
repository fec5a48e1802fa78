"""Placeholder statistics: parameters the graph fills with one value (onnx's light_densenet121 takes
every parameter of 119 of its 121 BNs from ConstantOfShape(0.02)), or one running mean and variance
in every channel of a wide layer. ``inspect`` flags them with the channels and a hint; ``check``'s
no_never_updated rule fails on them.

    light_densenet (tiny):  x -> Conv(3->16) -> BN_fill (all four from ConstantOfShape([16]) = 0.02)
                              -> Conv(16->16) -> BN_expand (all four Expand(0.02 scalar, [16]))
                              -> Conv(16->16) -> BN_trained (random, valid) -> y
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from graphs import bn_arrays, bn_inits, bn_node, init, make_model, ort_run, vi
from helpers import cli
from onnx import helper, numpy_helper

from bnscope.fold.rewrite import fold_batchnorm
from bnscope.onnxio.graph import GraphView

C = 16


def _value(v) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(v))


def light_densenet(rng) -> onnx.ModelProto:
    nodes = [helper.make_node("Constant", [], ["shape"], value=_value(np.array([C], np.int64)), name="shape")]
    nodes.append(helper.make_node("Constant", [], ["fill"], value=_value(np.float32(0.02)), name="scalar"))
    fill_value = _value(np.array([0.02], np.float32))
    for k in range(4):
        nodes.append(helper.make_node("ConstantOfShape", ["shape"], [f"f{k}"], value=fill_value, name=f"fill{k}"))
        nodes.append(helper.make_node("Expand", ["fill", "shape"], [f"e{k}"], name=f"expand{k}"))
    inits = [
        init(f"w{i}", (rng.standard_normal((C, 3 if i == 0 else C, 1, 1)) * 0.3).astype(np.float32)) for i in range(3)
    ]
    inits += bn_inits(rng, C, "trained")
    x = "x"
    for i, params in enumerate((["f0", "f1", "f2", "f3"], ["e0", "e1", "e2", "e3"], None)):
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        if params is None:
            nodes.append(bn_node(f"c{i}", "y", "trained", name="bn_trained"))
        else:
            name = ("bn_fill", "bn_expand")[i]
            nodes.append(helper.make_node("BatchNormalization", [f"c{i}", *params], [f"b{i}"], name=name))
        x = f"b{i}"
    return make_model(nodes, [vi("x", [2, 3, 4, 4])], [vi("y", [2, C, 4, 4])], inits)


def uniform_bn(rng, c: int, mean: float, var: float) -> onnx.ModelProto:
    values = bn_arrays(rng, c)
    values["mean"], values["var"] = np.full(c, mean, np.float32), np.full(c, var, np.float32)
    inits = [init(f"bn_{k}", v) for k, v in values.items()]
    inits.append(init("w", rng.standard_normal((c, 3, 1, 1)).astype(np.float32)))
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    return make_model([conv, bn_node("c", "y")], [vi("x", [1, 3, 2, 2])], [vi("y", [1, c, 2, 2])], inits)


def _flags(path) -> dict[str, list[dict]]:
    doc = json.loads(cli("inspect", path, "-f", "json").stdout)
    return {layer["name"]: layer["flags"] for layer in doc["layers"]}


def test_inspect_and_check_flag_parameters_filled_by_constantofshape_and_expand(tmp_path, rng):
    path = tmp_path / "light_densenet.onnx"
    onnx.save(light_densenet(rng), path)
    flags = _flags(path)
    for name, op in (("bn_fill", "ConstantOfShape"), ("bn_expand", "Expand")):
        (flag,) = flags[name]
        assert flag["code"] == "placeholder_parameters" and flag["channels"] == list(range(C))
        assert flag["message"].count(op) == 4 and "0.02" in flag["message"] and "bnscope recalibrate" in flag["message"]
    assert flags["bn_trained"] == []
    checked = cli("check", path, "-f", "json")
    assert checked.exit_code == 1, checked.stderr
    failed = {(r["rule"], r["layer"]) for r in json.loads(checked.stdout)["results"] if not r["passed"]}
    assert failed == {("no_never_updated", "bn_fill"), ("no_never_updated", "bn_expand")}


def test_expand_of_a_scalar_is_a_constant_equal_to_onnx_reference(rng):
    from onnx.reference import ReferenceEvaluator

    model = light_densenet(rng)
    view = GraphView(model)
    expected = ReferenceEvaluator(model).run(["e0", "f0"], {"x": np.zeros((2, 3, 4, 4), np.float32)})
    for name, want in zip(("e0", "f0"), expected):
        const = view.constant(name)
        assert const is not None and const.value.dtype == want.dtype
        np.testing.assert_array_equal(const.value, want)


def test_fold_folds_bns_whose_parameters_an_expand_makes(rng):
    model = light_densenet(rng)
    folded, records = fold_batchnorm(model)
    assert {r.name: r.folded for r in records} == {"bn_fill": True, "bn_expand": True, "bn_trained": True}
    x = {"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32)}
    (want,), (got,) = ort_run(model, x), ort_run(folded, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_one_mean_and_variance_in_every_channel_of_a_wide_layer_is_flagged(tmp_path, rng):
    cases = {
        "wide": (uniform_bn(rng, C, 0.5, 2.0), ["placeholder_statistics"]),
        "narrow": (uniform_bn(rng, 4, 0.5, 2.0), []),  # 4 channels may agree by chance of design
        "never_updated": (uniform_bn(rng, C, 0.0, 1.0), ["never_updated"]),  # flagged once, as before
    }
    for label, (model, codes) in cases.items():
        path = tmp_path / f"{label}.onnx"
        onnx.save(model, path)
        (flags,) = _flags(path).values()
        assert [f["code"] for f in flags] == codes, label
        if codes == ["placeholder_statistics"]:
            assert flags[0]["channels"] == list(range(C)) and "0.5" in flags[0]["message"]
            assert cli("check", path).exit_code == 1
