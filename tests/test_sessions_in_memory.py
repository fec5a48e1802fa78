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
    assert in_memory.pinned == ()  # onnxruntime copied the weights: nothing is held for it
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


def test_a_weight_with_the_wrong_byte_count_is_left_to_onnxruntime_to_name():
    """A malformed large initializer stays in the bytes: onnxruntime's own message says what is wrong
    (not a misleading '2 GB' one)."""
    from bnscope.errors import BnscopeError

    model = _conv_bn_model()
    weight = next(t for t in model.graph.initializer if t.name == "w")
    weight.raw_data = weight.raw_data + b"\0\0\0\0"
    assert split_weights(model)[1].names == ()
    with pytest.raises(BnscopeError) as caught:
        create_session(model)
    assert "2 GB" not in str(caught.value)


def test_integer_weights_and_weights_read_inside_a_subgraph_match_the_model_bytes():
    rng = np.random.default_rng(2)
    table = numpy_helper.from_array(rng.integers(0, 1000, (64, 256)).astype(np.int64), "table")
    bias = numpy_helper.from_array(rng.standard_normal((64, 256)).astype(np.float32), "bias")
    then = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["t"])], "then", [], [helper.make_tensor_value_info("t", 1, None)]
    )
    other = helper.make_graph(
        [helper.make_node("Sub", ["x", "bias"], ["e"])], "else", [], [helper.make_tensor_value_info("e", 1, None)]
    )
    nodes = [
        helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other),
        helper.make_node("Cast", ["table"], ["tf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["y", "tf"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sub",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [64, 256])],
        [table, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert split_weights(model)[1].names == ("table", "bias")
    x = rng.standard_normal((64, 256)).astype(np.float32)
    for flag in (True, False):
        feed = {"x": x, "flag": np.array(flag)}
        np.testing.assert_array_equal(
            create_session(model).run(feed)[0], create_session(model.SerializeToString()).run(feed)[0]
        )


@pytest.mark.parametrize(
    ("suffix", "text"), [(".json", "{not json"), (".onnxtxt", "<ir_version: 8> ("), (".textproto", "graph {")]
)
def test_a_malformed_text_model_is_an_input_error(tmp_path, suffix, text):
    from bnscope.errors import BnscopeError, ExitCode
    from bnscope.onnxio.model_io import load_model

    path = tmp_path / f"m{suffix}"
    path.write_text(text)
    with pytest.raises(BnscopeError) as caught:
        load_model(path)
    assert caught.value.exit_code == ExitCode.USAGE and "not a readable ONNX model" in str(caught.value)
