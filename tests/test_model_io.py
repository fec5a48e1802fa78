"""model_io: loading refuses bad files with one-line BnscopeErrors, external data stays inside the
model's folder and is read lazily, and saving is atomic (a crash leaves the old file or nothing).

The test model::

    x (N,3,8,8) -> Conv(w 4x3x3x3, pads 1) -> h -> BatchNormalization -> y -> Relu -> out
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import bn_inits, bn_node, cyclic_model, init, make_model, vi
from helpers import RESNET, listing, relocate_external, save_external
from onnx import helper, numpy_helper

from bnscope.errors import BnscopeError
from bnscope.onnxio import external_file
from bnscope.onnxio.external_data import TensorStore
from bnscope.onnxio.model_io import (
    LoadedModel,
    load_model,
    materialize_external_data,
    save_model,
)
from bnscope.onnxio.outputs import same_file


def tiny_model(seed: int = 0, out_channels: int = 4) -> onnx.ModelProto:
    """The Conv weight has 108 * out_channels floats: 432 bytes by default, 1728 with 16 channels."""
    rng = np.random.default_rng(seed)
    c = out_channels
    w = rng.standard_normal((c, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("h", "y"),
        helper.make_node("Relu", ["y"], ["out"], name="relu"),
    ]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("out", ["N", c, 8, 8])], [init("w", w), *bn_inits(rng, c)])


# -- load_model: bad files ---------------------------------------------------------------------------
def test_load_model_missing_file(tmp_path):
    with pytest.raises(BnscopeError, match="not found"):
        load_model(tmp_path / "nothere.onnx")


def test_load_model_empty_file(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(BnscopeError, match="empty"):
        load_model(tmp_path / "empty.onnx")


def test_load_model_directory(tmp_path):
    (tmp_path / "model.onnx").mkdir()
    with pytest.raises(BnscopeError, match="folder"):
        load_model(tmp_path / "model.onnx")


@pytest.mark.parametrize("content", [b"hello, I am text\n", bytes(range(256)) * 8, b"\xff" * 64])
def test_load_model_garbage(tmp_path, content):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(content)
    with pytest.raises(BnscopeError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and "Hint:" in message
    assert "not" in message and str(path) in message


@pytest.mark.parametrize("size", [1000, 5000])
def test_load_model_truncated(tmp_path, size):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(RESNET.read_bytes()[:size])
    with pytest.raises(BnscopeError, match="not a readable ONNX model|not a valid ONNX model|does not contain"):
        load_model(path)


def test_load_model_protobuf_that_is_not_a_model(tmp_path):
    """A TensorProto parses as a ModelProto without a graph: refused, not analysed as an empty model."""
    path = tmp_path / "tensor.onnx"
    path.write_bytes(numpy_helper.from_array(np.zeros(3, np.float32), "t").SerializeToString())
    with pytest.raises(BnscopeError, match="does not contain an ONNX model|not a readable ONNX model"):
        load_model(path)


def reversed_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its nodes listed in reverse order (fails onnx.checker's topological-order rule)."""
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_load_model_unsorted_graph_is_sorted_in_memory(tmp_path, caplog):
    model = reversed_nodes(tiny_model())
    path = tmp_path / "unsorted.onnx"
    onnx.save_model(model, str(path))
    before = path.read_bytes()
    with caplog.at_level("WARNING", logger="bnscope.onnxio.model_io"):
        loaded = load_model(path)
    assert [n.name for n in loaded.model.graph.node] == ["conv", "bn", "relu"]
    onnx.checker.check_model(loaded.model)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "topological order" in warnings[0] and "\n" not in warnings[0]
    assert path.read_bytes() == before  # the file is never rewritten
    assert [n.name for n in load_model(path, check=False).model.graph.node] == ["relu", "bn", "conv"]


def test_load_model_sorted_graph_gives_no_warning(tmp_path, caplog):
    path = tmp_path / "m.onnx"
    onnx.save_model(tiny_model(), str(path))
    with caplog.at_level("WARNING", logger="bnscope.onnxio.model_io"):
        load_model(path)
    assert not caplog.records


def test_load_model_unsorted_subgraph_is_sorted(tmp_path, caplog):
    #   x -> If(cond) { then: x -> Neg -> n -> Abs -> t (nodes reversed); else: x -> Identity -> e } -> y
    then = helper.make_graph(
        [helper.make_node("Abs", ["n"], ["t"], name="abs"), helper.make_node("Neg", ["x"], ["n"], name="neg")],
        "then",
        [],
        [vi("t", [2])],
    )
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="id")], "else", [], [vi("e", [2])])
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other)
    model = make_model([node], [vi("cond", [], onnx.TensorProto.BOOL), vi("x", [2])], [vi("y", [2])], ir_version=8)
    path = tmp_path / "sub.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)
    with caplog.at_level("WARNING", logger="bnscope.onnxio.model_io"):
        loaded = load_model(path)
    branch = loaded.model.graph.node[0].attribute
    assert [n.name for n in next(a.g for a in branch if a.name == "then_branch").node] == ["neg", "abs"]
    assert len(caplog.records) == 1


def test_load_model_unsorted_graph_with_external_data(tmp_path):
    """The re-check runs in memory, where onnx.checker cannot look up the data files beside the model."""
    path = save_external(reversed_nodes(tiny_model()), tmp_path / "ext")
    loaded = load_model(path)
    assert loaded.has_external_data and [n.name for n in loaded.model.graph.node] == ["conv", "bn", "relu"]
    np.testing.assert_array_equal(
        TensorStore(loaded).to_array(loaded.model.graph.initializer[0]),
        numpy_helper.to_array(tiny_model().graph.initializer[0]),
    )


def test_load_model_cyclic_graph_is_refused(tmp_path):
    path = tmp_path / "cyclic.onnx"
    onnx.save_model(cyclic_model(), str(path))
    with pytest.raises(BnscopeError, match="has a cycle") as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and "Hint:" in message and "'add'" in message and "'relu'" in message


def test_load_model_cyclic_subgraph_is_refused(tmp_path):
    body = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["a"], name="add"), helper.make_node("Relu", ["a"], ["c"], name="relu")],
        "body",
        [],
        [vi("a", [2])],
    )
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="id")], "else", [], [vi("e", [2])])
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=body, else_branch=other)
    path = tmp_path / "cyclic_sub.onnx"
    onnx.save_model(
        make_model([node], [vi("cond", [], onnx.TensorProto.BOOL), vi("x", [2])], [vi("y", [2])], ir_version=8),
        str(path),
    )
    with pytest.raises(BnscopeError, match="subgraph 'body' has a cycle") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_load_model_invalid_graph_is_one_line(tmp_path):
    model = tiny_model()
    model.graph.node[0].input[1] = "no_such_weight"
    path = tmp_path / "invalid.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(BnscopeError, match="not a valid ONNX model") as info:
        load_model(path)
    assert "\n" not in str(info.value) and "no_such_weight" in str(info.value)


def test_load_model_valid(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(tiny_model(), str(path))
    loaded = load_model(path)
    assert isinstance(loaded, LoadedModel)
    assert loaded.path == path and loaded.base_dir == tmp_path
    assert not loaded.has_external_data


# -- external data -------------------------------------------------------------------------------
def test_external_data_loads_lazily_and_matches_numpy_helper(tmp_path):
    model = tiny_model()
    path = save_external(model, tmp_path / "m")
    loaded = load_model(path)
    assert loaded.has_external_data
    store = TensorStore(loaded)
    expected = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for tensor in loaded.model.graph.initializer:
        assert tensor.data_location == onnx.TensorProto.EXTERNAL
        assert not tensor.raw_data  # nothing was read at load time
        np.testing.assert_array_equal(store.to_array(tensor), expected[tensor.name])
    full = onnx.load(str(path))  # onnx's own external-data reader agrees
    for tensor in full.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), expected[tensor.name])


def test_external_data_reads_only_the_tensor_it_is_asked_for(tmp_path, monkeypatch):
    path = save_external(tiny_model(), tmp_path / "m")
    loaded = load_model(path)
    reads = []
    real_open = open

    def spy(file, mode="r", *args, **kwargs):
        if "b" in mode and str(file).endswith("weights.bin"):
            reads.append(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    store = TensorStore(loaded)
    assert reads == []
    store.to_array(loaded.model.graph.initializer[0])
    assert len(reads) == 1


def test_materialize_external_data_gives_an_in_memory_copy(tmp_path):
    model = tiny_model()
    loaded = load_model(save_external(model, tmp_path / "m"))
    copy = onnx.ModelProto()
    copy.CopyFrom(loaded.model)
    materialize_external_data(loaded, copy)
    for got, want in zip(copy.graph.initializer, model.graph.initializer):
        assert got.data_location != onnx.TensorProto.EXTERNAL
        np.testing.assert_array_equal(numpy_helper.to_array(got), numpy_helper.to_array(want))


@pytest.mark.parametrize("where", ["../evil.bin", "sub/../../evil.bin", "absolute"])
def test_external_data_outside_the_folder_is_refused(tmp_path, where):
    path = save_external(tiny_model(), tmp_path / "m")
    evil = tmp_path / "evil.bin"
    (tmp_path / "m" / "weights.bin").rename(evil)
    relocate_external(path, str(evil) if where == "absolute" else where)
    with pytest.raises(BnscopeError, match="unsafe external data location") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_external_data_symlink_outside_the_folder_is_refused(tmp_path):
    path = save_external(tiny_model(), tmp_path / "m")
    evil = tmp_path / "evil.bin"
    (tmp_path / "m" / "weights.bin").rename(evil)
    (tmp_path / "m" / "weights.bin").symlink_to(evil)
    with pytest.raises(BnscopeError, match="outside the model's folder"):
        load_model(path)


def test_external_data_missing_file_is_refused(tmp_path):
    path = save_external(tiny_model(), tmp_path / "m")
    (tmp_path / "m" / "weights.bin").unlink()
    with pytest.raises(BnscopeError, match="missing"):
        load_model(path)


def test_tensor_store_checks_the_location_again(tmp_path):
    """Defence in depth: a tensor edited after loading cannot make the store read outside."""
    loaded = load_model(save_external(tiny_model(), tmp_path / "m"))
    tensor = onnx.TensorProto()
    tensor.CopyFrom(loaded.model.graph.initializer[0])
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = "../../etc/passwd"
    with pytest.raises(BnscopeError, match="unsafe"):
        TensorStore(loaded).to_array(tensor)


# -- save_model -------------------------------------------------------------------------------------
def test_save_model_round_trip(tmp_path):
    model = tiny_model()
    out = save_model(model, tmp_path / "sub" / "out.onnx")
    assert out == tmp_path / "sub" / "out.onnx"
    assert onnx.load(str(out)) == model
    assert listing(tmp_path / "sub") == ["out.onnx"]


def test_save_model_external_round_trip(tmp_path):
    model = tiny_model(out_channels=16)  # the 1728-byte weight goes to the data file, BN params stay inline
    out = save_model(model, tmp_path / "out.onnx", external=True)
    assert listing(tmp_path) == ["out.onnx", "out.onnx.data"]
    loaded = load_model(out)
    assert loaded.has_external_data
    store = TensorStore(loaded)
    for got, want in zip(loaded.model.graph.initializer, tiny_model(out_channels=16).graph.initializer):
        np.testing.assert_array_equal(store.to_array(got), numpy_helper.to_array(want))


def test_save_model_external_leaves_the_callers_model_alone(tmp_path):
    model = tiny_model(out_channels=16)
    save_model(model, tmp_path / "out.onnx", external=True)
    assert model == tiny_model(out_channels=16)


def test_save_model_external_with_only_small_tensors(tmp_path):
    out = save_model(tiny_model(), tmp_path / "out.onnx", external=True)  # every tensor < 1 KiB
    loaded = load_model(out)
    store = TensorStore(loaded)
    for got, want in zip(loaded.model.graph.initializer, tiny_model().graph.initializer):
        np.testing.assert_array_equal(store.to_array(got), numpy_helper.to_array(want))
    assert not [n for n in listing(tmp_path) if n.startswith(".")]


def _failing_save(calls: list):
    """An onnx.save_model that writes half a file and then fails (the inline save)."""

    def save(model, path, *args, **kwargs):
        calls.append(path)
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    return save


def _failing_write(calls: list):
    """A data-file write that writes half a tensor and then fails (the external save)."""

    def write_all(fd, view):
        calls.append(fd)
        os.write(fd, bytes(view[:10]))
        raise OSError("disk full")

    return write_all


def _break_saving(monkeypatch, external: bool, calls: list) -> None:
    if external:
        monkeypatch.setattr(external_file, "write_all", _failing_write(calls))
    else:
        monkeypatch.setattr(onnx, "save_model", _failing_save(calls))


@pytest.mark.parametrize("external", [False, True])
def test_save_model_crash_leaves_nothing(tmp_path, monkeypatch, external):
    calls = []
    _break_saving(monkeypatch, external, calls)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model(out_channels=16), tmp_path / "out.onnx", external=external)
    assert calls, "the broken writer was not used"
    if not external:
        assert Path(calls[0]).name != "out.onnx"  # it wrote a temp file, not the target
    assert listing(tmp_path) == []


@pytest.mark.parametrize("external", [False, True])
def test_save_model_crash_keeps_the_existing_output(tmp_path, monkeypatch, external):
    (tmp_path / "out.onnx").write_bytes(b"the old model")
    (tmp_path / "out.onnx.data").write_bytes(b"the old data")
    _break_saving(monkeypatch, external, [])
    with pytest.raises(OSError):
        save_model(tiny_model(out_channels=16), tmp_path / "out.onnx", external=external)
    assert (tmp_path / "out.onnx").read_bytes() == b"the old model"
    assert (tmp_path / "out.onnx.data").read_bytes() == b"the old data"
    assert listing(tmp_path) == ["out.onnx", "out.onnx.data"]


def test_save_model_replaces_an_existing_output(tmp_path):
    (tmp_path / "out.onnx").write_bytes(b"old")
    save_model(tiny_model(), tmp_path / "out.onnx")
    assert onnx.load(str(tmp_path / "out.onnx")) == tiny_model()
    assert listing(tmp_path) == ["out.onnx"]


def test_save_model_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = save_model(tiny_model(), tmp_path / "out.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


# -- same_file ----------------------------------------------------------------------------------------
def test_same_file(tmp_path):
    a = tmp_path / "a.onnx"
    a.write_bytes(b"x")
    (tmp_path / "link.onnx").symlink_to(a)
    os.link(a, tmp_path / "hard.onnx")
    (tmp_path / "b.onnx").write_bytes(b"x")
    assert same_file(a, a)
    assert same_file(a, tmp_path / "link.onnx")
    assert same_file(a, tmp_path / "hard.onnx")
    assert not same_file(a, tmp_path / "b.onnx")
    assert not same_file(a, tmp_path / "new.onnx")
