"""A ModelProto's large weights go to onnxruntime in memory (runtime.model_source.split_weights):
the same session, bit for bit, and the caller's model untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnscope.runtime.model_source import IN_MEMORY_MIN_BYTES, split_weights
from bnscope.runtime.sessions import create_session


def _conv_bn_model(channels: int = 64) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32)  # 147 KiB: handed over
    params = [rng.uniform(0.5, 1.5, channels).astype(np.float32) for _ in range(4)]
    inits = [numpy_helper.from_array(weight, "w")]
    inits += [numpy_helper.from_array(p, n) for p, n in zip(params, ("g", "b", "m", "v"))]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
        helper.make_node("Relu", ["y"], ["r"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 8, 8])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", channels, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_split_moves_only_large_weights_and_leaves_the_model_alone():
    model = _conv_bn_model()
    before = model.SerializeToString()
    data, weights = split_weights(model)
    assert weights.names == ("w",)
    assert model.SerializeToString() == before
    shell = onnx.load_model_from_string(data)
    moved = next(t for t in shell.graph.initializer if t.name == "w")
    assert moved.data_location == TensorProto.EXTERNAL and not moved.raw_data
    assert len(data) < IN_MEMORY_MIN_BYTES
    assert split_weights(model, keep=frozenset({"w"}))[1].names == ()


def test_in_memory_weights_give_the_same_outputs_as_the_model_bytes():
    model = _conv_bn_model()
    x = np.random.default_rng(1).standard_normal((4, 64, 8, 8)).astype(np.float32)
    in_memory = create_session(model)  # CPU: weights handed over in memory
    whole = create_session(model.SerializeToString())
    assert [name for name, _ in in_memory.pinned] == ["w"]
    np.testing.assert_array_equal(in_memory.run({"x": x})[0], whole.run({"x": x})[0])
    reference = onnx.reference.ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(in_memory.run({"x": x})[0], reference, rtol=1e-4, atol=1e-4)


def test_overridden_weights_stay_in_the_model_bytes():
    model = _conv_bn_model()
    x = np.ones((1, 64, 8, 8), np.float32)
    zero = {"w": np.zeros((64, 64, 3, 3), np.float32)}
    session = create_session(model, opt_level="disable", initializers=zero)  # as runtime.floor uses them
    out = session.run({"x": x})[0]
    g, b, m, v = (numpy_helper.to_array(t) for t in model.graph.initializer[1:])
    expected = np.maximum(b - m * g / np.sqrt(v + 1e-5), 0).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("suffix", [".onnxtxt", ".json"])
def test_text_formats_still_load(tmp_path, suffix):
    from bnscope.onnxio.model_io import load_model

    model = _conv_bn_model(8)
    path = tmp_path / f"m{suffix}"
    onnx.save(model, str(path))
    loaded = load_model(path)
    assert [n.op_type for n in loaded.model.graph.node] == ["Conv", "BatchNormalization", "Relu"]


def test_an_initializer_listed_as_a_graph_input_stays_in_the_bytes():
    model = _conv_bn_model()
    weight = next(t for t in model.graph.initializer if t.name == "w")
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(weight.dims)))
    assert split_weights(model)[1].names == ()
