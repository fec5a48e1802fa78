"""Tests for bnscope.data and its formats (bnscope.data_*): calibration sources, batching, sharding, validation and safety."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import REAL_MODELS, needs_real_models
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnscope.data.images import ImageOptions
from bnscope.data.sources import open_source
from bnscope.data.spec import (
    DataSource,
    InputSpec,
    fixed_batch_size,
    input_specs,
    nonfinite_count,
    validate_batch,
)
from bnscope.errors import BnscopeError


def _model(inputs: list[onnx.ValueInfoProto], initializers: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    """x (and y ...) -> Identity per input -> outputs; initializers optionally listed as graph inputs too."""
    nodes = [helper.make_node("Identity", [v.name], [f"out_{v.name}"]) for v in inputs]
    outputs = [helper.make_tensor_value_info(f"out_{v.name}", v.type.tensor_type.elem_type, None) for v in inputs]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _image_like() -> list[InputSpec]:
    # x: float32 [N, 3, 4, 4]
    return input_specs(_model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])]))


def _two_inputs() -> list[InputSpec]:
    # a: float32 [N, 2], b: float32 [N, 3]
    return input_specs(
        _model(
            [
                helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2]),
                helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3]),
            ]
        )
    )


def _samples(count: int, offset: float = 0.0) -> np.ndarray:
    """Sample i is filled with the value i + offset, so batches show which samples they hold."""
    return (np.arange(count, dtype=np.float32)[:, None, None, None] + offset) * np.ones((1, 3, 4, 4), np.float32)


def _ids(batches: list[dict[str, np.ndarray]], name: str = "x") -> list[list[int]]:
    return [[int(v) for v in batch[name].reshape(len(batch[name]), -1)[:, 0]] for batch in batches]


def _assert_user_error(exc_info: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(exc_info.value)
    assert "\n" not in message and "Hint: " in message, message
    for needle in needles:
        assert needle in message, message


# --- input_specs ------------------------------------------------------------------------------


def test_input_specs_dims_and_dtypes():
    model = _model(
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, None, 8]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT16, [1]),
            helper.make_tensor_value_info("m", TensorProto.BOOL, []),
        ]
    )
    assert input_specs(model) == [
        InputSpec("x", np.dtype(np.float32), ("N", 3, None, 8)),
        InputSpec("ids", np.dtype(np.int64), (2,)),
        InputSpec("h", np.dtype(np.float16), (1,)),
        InputSpec("m", np.dtype(bool), ()),
    ]


def test_input_specs_skips_initializers_listed_as_inputs():
    weight = numpy_helper.from_array(np.ones(2, np.float32), "w")
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
        helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]),
    ]
    assert [s.name for s in input_specs(_model(inputs, [weight]))] == ["x"]


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 2]), "BFLOAT16"),
        (helper.make_tensor_value_info("x", TensorProto.STRING, ["N"]), "STRING"),
        (helper.make_tensor_sequence_value_info("x", TensorProto.FLOAT, None), "not a tensor"),
        (helper.make_value_info("x", helper.make_tensor_type_proto(TensorProto.FLOAT, None)), "no shape"),
    ],
)
def test_input_specs_unsupported_input(value, needle):
    with pytest.raises(BnscopeError) as info:
        input_specs(_model([value]) if value.type.HasField("tensor_type") else _bare_model(value))
    _assert_user_error(info, "'x'", needle)


def _bare_model(value: onnx.ValueInfoProto) -> onnx.ModelProto:
    graph = helper.make_graph([], "g", [value], [])
    return helper.make_model(graph)


@needs_real_models
def test_input_specs_real_model_with_initializer_inputs():
    model = onnx.load(str(REAL_MODELS / "pytorch_ultraface_version-RFB-320.onnx"))
    assert len(model.graph.input) == 245
    assert input_specs(model) == [InputSpec("input", np.dtype(np.float32), (1, 3, 240, 320))]


def test_fixed_batch_size():
    assert fixed_batch_size(_image_like()) is None
    assert fixed_batch_size([InputSpec("x", np.dtype(np.float32), (1, 3))]) == 1
    assert (
        fixed_batch_size([InputSpec("x", np.dtype(np.float32), (1, 3)), InputSpec("y", np.dtype(np.float32), (2,))])
        is None
    )


# --- .npz / .npy ------------------------------------------------------------------------------


def test_npz_by_input_name_with_labels(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=_samples(10), labels=np.arange(10))
    source = open_source(path, _image_like())
    assert (source.description, source.samples, source.is_random) == ("calib.npz (10 samples)", 10, False)
    batches = list(source.batches(4))
    assert _ids(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(set(b) == {"x"} for b in batches)
    np.testing.assert_array_equal(source.labels(), np.arange(10))


def test_npz_second_pass_reads_the_file_once(tmp_path):
    # stats' second pass (the diagnosis) reads the same data again: a one-file source keeps the
    # file's arrays, so the batches of the second pass are views of the first pass's arrays.
    path = tmp_path / "calib.npz"
    np.savez(path, x=_samples(10))
    source = open_source(path, _image_like())
    first, again = list(source.batches(4)), list(source.batches(4, shard=(1, 2)))
    assert _ids(again) == [[4, 5, 6, 7]]
    assert np.shares_memory(first[1]["x"], again[0]["x"])


def test_npz_single_input_accepts_any_single_key(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, _samples(3))  # stored as arr_0
    source = open_source(path, _image_like())
    assert _ids(list(source.batches(1))) == [[0], [1], [2]]
    assert source.labels() is None


def test_npz_two_inputs(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, a=np.zeros((5, 2), np.float32), b=np.ones((5, 3), np.float32))
    batches = list(open_source(path, _two_inputs()).batches(2))
    assert [(b["a"].shape, b["b"].shape) for b in batches] == [((2, 2), (2, 3))] * 2 + [((1, 2), (1, 3))]


@pytest.mark.parametrize(
    ("arrays", "needles"),
    [
        ({"a": np.zeros((5, 2), np.float32)}, ["'b'", "no array"]),
        ({"a": np.zeros((5, 2), np.float32), "b": np.zeros((5, 3), np.float32), "c": np.zeros(5)}, ["'c'"]),
        ({"a": np.zeros((5, 2), np.float32), "b": np.zeros((4, 3), np.float32)}, ["'a': 5", "'b': 4"]),
        ({"a": np.zeros((5, 7), np.float32), "b": np.zeros((5, 3), np.float32)}, ["'a'", "[N,2]", "[5,7]"]),
    ],
)
def test_npz_mismatched_arrays(tmp_path, arrays, needles):
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    with pytest.raises(BnscopeError) as info:
        list(open_source(path, _two_inputs()).batches(2))
    _assert_user_error(info, *needles)


def test_npz_single_input_ambiguous_keys(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, p=_samples(2), q=_samples(2))
    with pytest.raises(BnscopeError) as info:
        open_source(path, _image_like())
    _assert_user_error(info, "'x'", "'p', 'q'")


def test_npy_is_memory_mapped_and_batched(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, _samples(7))
    assert _ids(list(open_source(path, _image_like()).batches(3))) == [[0, 1, 2], [3, 4, 5], [6]]


def test_npy_one_sample_without_batch_axis(tmp_path):
    path = tmp_path / "one.npy"
    np.save(path, _samples(1)[0])  # shape (3, 4, 4)
    batches = list(open_source(path, _image_like()).batches(8))
    assert [b["x"].shape for b in batches] == [(1, 3, 4, 4)]


def test_npy_for_two_input_model_names_the_inputs(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, np.zeros((4, 2), np.float32))
    with pytest.raises(BnscopeError) as info:
        open_source(path, _two_inputs())
    _assert_user_error(info, "'a', 'b'")


# --- folders ----------------------------------------------------------------------------------


def _array_folder(tmp_path: Path) -> Path:
    """b_1.npy: samples 3-4, a_0.npz: samples 0-2 (+labels), c_2.npy: sample 5 without batch axis."""
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "a_0.npz", x=_samples(3), labels=np.array([0, 1, 2]))
    np.save(folder / "b_1.npy", _samples(2, offset=3))
    np.save(folder / "c_2.npy", _samples(1, offset=5)[0])
    (folder / "README.txt").write_text("ignored")
    return folder


def test_folder_streams_files_in_name_order(tmp_path):
    source = open_source(_array_folder(tmp_path), _image_like())
    assert (source.samples, source.description) == (6, "calib/ (3 files, 6 samples)")
    assert _ids(list(source.batches(4))) == [[0, 1, 2, 3], [4, 5]]
    assert _ids(list(source.batches(1))) == [[i] for i in range(6)]


def test_folder_labels_need_every_file(tmp_path):
    source = open_source(_array_folder(tmp_path), _image_like())
    with pytest.raises(BnscopeError) as info:
        source.labels()
    _assert_user_error(info, "1 of 3")


def test_folder_empty(tmp_path):
    with pytest.raises(BnscopeError) as info:
        open_source(tmp_path, _image_like())
    _assert_user_error(info, str(tmp_path))


def test_folder_mixing_kinds(tmp_path):
    np.save(tmp_path / "a.npy", _samples(1))
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(BnscopeError) as info:
        open_source(tmp_path, _image_like())
    _assert_user_error(info, "mixes")


def test_npz_compressed(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez_compressed(path, x=_samples(3))
    assert _ids(list(open_source(path, _image_like()).batches(2))) == [[0, 1], [2]]


def test_folder_loads_each_file_once_and_only_for_its_shard(tmp_path, monkeypatch):
    for i in range(4):
        np.savez(tmp_path / f"part_{i}.npz", x=_samples(2, offset=2 * i))
    loaded = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda path, *a, **k: loaded.append(Path(path).name) or real_load(path, *a, **k))
    source = open_source(tmp_path, _image_like())
    assert _ids(list(source.batches(1))) == [[i] for i in range(8)]
    assert loaded == [f"part_{i}.npz" for i in range(4)]
    loaded.clear()
    assert _ids(list(source.batches(2, shard=(0, 2)))) == [[0, 1], [4, 5]]
    assert loaded == ["part_0.npz", "part_2.npz"]


def test_npz_with_corrupt_member_data(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez_compressed(path, x=np.random.default_rng(0).standard_normal((64, 3, 4, 4)).astype(np.float32))
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    with pytest.raises(BnscopeError) as info:
        list(open_source(path, _image_like()).batches(64))
    _assert_user_error(info, "calib.npz")


# --- batching and sharding --------------------------------------------------------------------


def test_batches_max_batches(tmp_path):
    source = open_source(_array_folder(tmp_path), _image_like())
    assert _ids(list(source.batches(2, max_batches=2))) == [[0, 1], [2, 3]]


def test_batches_shards_union_to_the_full_run(tmp_path):
    source = open_source(_array_folder(tmp_path), _image_like())
    full = _ids(list(source.batches(1, max_batches=5)))
    shards = [_ids(list(source.batches(1, max_batches=5, shard=(i, 2)))) for i in range(2)]
    assert shards == [[[0], [2], [4]], [[1], [3]]]
    assert sorted(shards[0] + shards[1]) == full


@settings(max_examples=40, deadline=None)
@given(
    samples=st.integers(1, 12),
    batch_size=st.integers(1, 5),
    shards=st.integers(1, 4),
    max_batches=st.none() | st.integers(1, 6),
)
def test_batches_sharding_partitions_batches(samples, batch_size, shards, max_batches):
    source = open_source(None, _image_like(), random=True, random_samples=samples)
    full = list(source.batches(batch_size, max_batches))
    parts = [list(source.batches(batch_size, max_batches, shard=(i, shards))) for i in range(shards)]
    assert sum(len(p) for p in parts) == len(full)
    for k, batch in enumerate(full):
        np.testing.assert_array_equal(parts[k % shards][k // shards]["x"], batch["x"])
    sizes = [len(b["x"]) for b in full]
    assert all(size == batch_size for size in sizes[:-1]) and 1 <= sizes[-1] <= batch_size
    if max_batches is None:
        assert sum(sizes) == samples


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"batch_size": 0}, "batch size"),
        ({"batch_size": 2, "max_batches": 0}, "max batches"),
        ({"batch_size": 2, "shard": (2, 2)}, "shard 2/2"),
    ],
)
def test_batches_bad_arguments(kwargs, needle):
    source = open_source(None, _image_like(), random=True)
    with pytest.raises(BnscopeError) as info:
        source.batches(**kwargs)
    _assert_user_error(info, needle)


# --- validate_batch ---------------------------------------------------------------------------


def test_validate_batch_casts_floats():
    spec = [InputSpec("x", np.dtype(np.float32), ("N", 2))]
    fed = validate_batch({"x": np.ones((3, 2), np.float64), "labels": np.zeros(3)}, spec)
    assert set(fed) == {"x"} and fed["x"].dtype == np.float32
    half = [InputSpec("x", np.dtype(np.float16), ("N", 2))]
    assert validate_batch({"x": np.ones((3, 2), np.float32)}, half)["x"].dtype == np.float16


def test_validate_batch_casts_integers_that_fit():
    spec = [InputSpec("ids", np.dtype(np.int64), ("N",))]
    assert validate_batch({"ids": np.arange(3, dtype=np.int32)}, spec)["ids"].dtype == np.int64
    small = [InputSpec("ids", np.dtype(np.uint8), ("N",))]
    with pytest.raises(BnscopeError) as info:
        validate_batch({"ids": np.array([1, 300])}, small)
    _assert_user_error(info, "'ids'", "uint8")


@pytest.mark.parametrize(
    ("want", "data"),
    [
        (np.float32, np.arange(4).reshape(2, 2)),
        (np.int64, np.ones((2, 2), np.float32)),
        (np.bool_, np.ones((2, 2), np.int64)),
        (np.float32, np.ones((2, 2), bool)),
    ],
)
def test_validate_batch_refuses_int_float_bool_mismatch(want, data):
    with pytest.raises(BnscopeError) as info:
        validate_batch({"x": data}, [InputSpec("x", np.dtype(want), ("N", 2))])
    _assert_user_error(info, "'x'", str(np.dtype(want)))


def test_validate_batch_refuses_object_arrays():
    data = np.empty((2, 2), dtype=object)
    with pytest.raises(BnscopeError) as info:
        validate_batch({"x": data}, [InputSpec("x", np.dtype(np.float32), ("N", 2))])
    _assert_user_error(info, "'x'", "object")


def test_validate_batch_shape_message():
    with pytest.raises(BnscopeError) as info:
        validate_batch(
            {"x": np.zeros((8, 3, 64, 64), np.float32)}, [InputSpec("x", np.dtype(np.float32), ("N", 3, 32, 32))]
        )
    assert str(info.value).startswith("input 'x': expected shape [N,3,32,32] (N dynamic), got [8,3,64,64]. Hint: ")


def test_validate_batch_rank_mismatch():
    with pytest.raises(BnscopeError) as info:
        validate_batch(
            {"x": np.zeros((3, 32, 32), np.float32)}, [InputSpec("x", np.dtype(np.float32), (None, 3, 32, 32))]
        )
    _assert_user_error(info, "input 'x': expected shape [?,3,32,32] (? dynamic), got [3,32,32]")


def test_validate_batch_fixed_batch_hint():
    with pytest.raises(BnscopeError) as info:
        validate_batch({"x": np.zeros((4, 3), np.float32)}, [InputSpec("x", np.dtype(np.float32), (1, 3))])
    _assert_user_error(info, "'x'", "fixes the batch size to 1")


def test_validate_batch_shared_dynamic_dim():
    with pytest.raises(BnscopeError) as info:
        validate_batch({"a": np.zeros((4, 2), np.float32), "b": np.zeros((3, 3), np.float32)}, _two_inputs())
    _assert_user_error(info, "'b'", "'a'", "N")


def test_validate_batch_missing_and_unexpected_names():
    with pytest.raises(BnscopeError) as info:
        validate_batch({"a": np.zeros((1, 2), np.float32)}, _two_inputs())
    _assert_user_error(info, "missing input 'b'", "'a', 'b'")
    with pytest.raises(BnscopeError) as info:
        validate_batch({"a": np.zeros((1, 2)), "b": np.zeros((1, 3)), "z": np.zeros(1)}, _two_inputs())
    _assert_user_error(info, "unexpected input 'z'", "'a', 'b'")
    with pytest.raises(BnscopeError) as info:
        validate_batch([np.zeros((1, 2))], _two_inputs())
    _assert_user_error(info, "list")


def test_nonfinite_count_reports_without_raising():
    data = np.array([[np.nan, 1.0], [np.inf, -np.inf]], np.float32)
    fed = validate_batch({"x": data}, [InputSpec("x", np.dtype(np.float32), ("N", 2))])
    assert nonfinite_count(fed) == {"x": 3}
    assert nonfinite_count({"ids": np.arange(3)}) == {"ids": 0}


# --- safety and file errors -------------------------------------------------------------------


def test_npz_with_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(BnscopeError) as info:
        open_source(path, _image_like())
    _assert_user_error(info, "never unpickles", "np.savez")


def test_npy_with_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([[1], "a"], dtype=object), allow_pickle=True)
    with pytest.raises(BnscopeError) as info:
        open_source(path, _image_like())
    _assert_user_error(info, "never unpickles")


@pytest.mark.parametrize("name", ["bad.npz", "bad.npy"])
def test_corrupt_array_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not numpy data")
    with pytest.raises(BnscopeError) as info:
        open_source(path, _image_like())
    _assert_user_error(info, name)


def test_missing_path(tmp_path):
    with pytest.raises(BnscopeError) as info:
        open_source(tmp_path / "nope.npz", _image_like())
    _assert_user_error(info, "nope.npz", "does not exist")


def test_unknown_file_type(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2")
    with pytest.raises(BnscopeError) as info:
        open_source(path, _image_like())
    _assert_user_error(info, "data.csv")


def test_zero_samples(tmp_path):
    path = tmp_path / "empty.npy"
    np.save(path, np.zeros((0, 3, 4, 4), np.float32))
    with pytest.raises(BnscopeError) as info:
        open_source(path, _image_like())
    _assert_user_error(info, "no samples")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"spec": None}, "no calibration data"),
        ({"spec": "x.npz", "random": True}, "choose one"),
        ({"spec": None, "random": True, "loader": "f.py"}, "choose one"),
    ],
)
def test_open_source_needs_exactly_one_kind(kwargs, needle):
    spec = kwargs.pop("spec")
    with pytest.raises(BnscopeError) as info:
        open_source(spec, _image_like(), **kwargs)
    _assert_user_error(info, needle)


# --- random -----------------------------------------------------------------------------------


def test_random_is_seeded_and_independent_of_batch_size():
    source = open_source(None, _image_like(), random=True, seed=3, random_samples=5)
    assert source.is_random and source.samples == 5 and "seed 3" in source.description
    one = np.concatenate([b["x"] for b in source.batches(5)])
    again = np.concatenate([b["x"] for b in source.batches(2)])
    np.testing.assert_array_equal(one, again)
    other = np.concatenate([b["x"] for b in open_source(None, _image_like(), random=True, seed=4).batches(5, 1)])
    assert not np.array_equal(one, other)
    assert one.dtype == np.float32 and one.shape == (5, 3, 4, 4)


def test_random_refuses_dynamic_non_batch_dims_and_integers():
    dynamic = [InputSpec("x", np.dtype(np.float32), ("N", 3, "H", "W"))]
    with pytest.raises(BnscopeError) as info:
        open_source(None, dynamic, random=True)
    _assert_user_error(info, "'x'", "[N,3,H,W]", "real calibration data")
    with pytest.raises(BnscopeError) as info:
        open_source(None, [InputSpec("ids", np.dtype(np.int64), ("N", 4))], random=True)
    _assert_user_error(info, "'ids'", "int64")


# --- loader scripts ---------------------------------------------------------------------------


def _write_loader(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "my_loader.py"
    path.write_text("import numpy as np\n\n" + body)
    return path


def test_loader_batches_used_as_given(tmp_path):
    path = _write_loader(
        tmp_path,
        ("def feeds():\n    for n in (3, 5):\n        yield {'x': np.full((n, 3, 4, 4), n, dtype=np.float64)}\n"),
    )
    source = open_source(None, _image_like(), loader=f"{path}:feeds")
    assert source.samples is None and source.description == "data loader my_loader.py:feeds"
    batches = list(source.batches(batch_size=2))
    assert [b["x"].shape[0] for b in batches] == [3, 5] and batches[0]["x"].dtype == np.float32
    assert [len(list(source.batches(2, shard=(i, 2)))) for i in range(2)] == [1, 1]


def test_loader_bare_arrays_default_function_name(tmp_path):
    path = _write_loader(tmp_path, "def load_data():\n    return [np.zeros((2, 3, 4, 4), np.float32)]\n")
    assert [b["x"].shape for b in open_source(None, _image_like(), loader=str(path)).batches(1)] == [(2, 3, 4, 4)]


@pytest.mark.parametrize(
    ("body", "spec_suffix", "needles"),
    [
        ("def load_data():\n    return []\n", "", ["gave no data"]),
        ("def load_data():\n    yield [1, 2]\n", "", ["yielded a list"]),
        ("def load_data():\n    return {'x': np.zeros((1, 3, 4, 4))}\n", "", ["returned a dict"]),
        ("def load_data():\n    raise RuntimeError('disk\\nfull')\n", "", ["RuntimeError: disk full"]),
        ("def load_data():\n    yield {'x': np.zeros((1, 3, 4, 4))}\n", ":other", ["no function 'other'"]),
        ("def (:\n", "", ["SyntaxError on import"]),
    ],
)
def test_loader_errors(tmp_path, body, spec_suffix, needles):
    path = _write_loader(tmp_path, body)
    with pytest.raises(BnscopeError) as info:
        list(open_source(None, _image_like(), loader=f"{path}{spec_suffix}").batches(1))
    _assert_user_error(info, *needles)


def test_loader_missing_script(tmp_path):
    with pytest.raises(BnscopeError) as info:
        open_source(None, _image_like(), loader=f"{tmp_path / 'none.py'}:f")
    _assert_user_error(info, "none.py", "does not exist")


# --- ONNX test data (.pb) ---------------------------------------------------------------------


def _write_pb(path: Path, array: np.ndarray, name: str = "") -> None:
    path.write_bytes(numpy_helper.from_array(array, name).SerializeToString())


def test_pb_folder_positional_and_named(tmp_path):
    _write_pb(tmp_path / "input_0.pb", np.zeros((2, 2), np.float32))  # unnamed: positional -> a
    _write_pb(tmp_path / "input_1.pb", np.ones((2, 3), np.float32), name="b")
    source = open_source(tmp_path, _two_inputs())
    assert source.samples == 2 and "1 ONNX test data set" in source.description
    (batch,) = source.batches(batch_size=1)  # used as given
    np.testing.assert_array_equal(batch["a"], np.zeros((2, 2)))
    np.testing.assert_array_equal(batch["b"], np.ones((2, 3)))


def test_pb_named_tensors_override_position(tmp_path):
    _write_pb(tmp_path / "input_0.pb", np.ones((1, 3), np.float32), name="b")
    _write_pb(tmp_path / "input_1.pb", np.zeros((1, 2), np.float32), name="a")
    (batch,) = open_source(tmp_path, _two_inputs()).batches(4)
    assert batch["a"].shape == (1, 2) and batch["b"].shape == (1, 3)


def test_pb_test_data_sets(tmp_path):
    for i in (0, 1, 10, 2):  # sets in numeric order: 0, 1, 2, 10
        folder = tmp_path / f"test_data_set_{i}"
        folder.mkdir()
        _write_pb(folder / "input_0.pb", _samples(1, offset=i))
    (tmp_path / "model.onnx").write_bytes(b"")
    source = open_source(tmp_path, _image_like())
    assert source.samples == 4
    assert _ids(list(source.batches(3))) == [[0], [1], [2], [10]]


def test_pb_single_file_and_corrupt_file(tmp_path):
    path = tmp_path / "x.pb"
    _write_pb(path, _samples(2))
    assert _ids(list(open_source(path, _image_like()).batches(1))) == [[0, 1]]
    bad = tmp_path / "input_0.pb"
    bad.write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(BnscopeError) as info:
        open_source(bad, _image_like())
    _assert_user_error(info, "input_0.pb")


@needs_real_models
def test_pb_parameter_inputs_are_not_samples(tmp_path):
    model = onnx.load(str(REAL_MODELS / "onnx_node_test_batchnorm_epsilon_training_mode.onnx"))
    inputs = input_specs(model)  # x [2,3,4,5], s/bias/mean/var [3]
    for i, spec in enumerate(inputs):
        _write_pb(tmp_path / f"input_{i}.pb", np.ones(spec.shape, np.float32), name=spec.name)
    (batch,) = open_source(tmp_path, inputs).batches(1)
    assert {name: a.shape for name, a in batch.items()} == {s.name: s.shape for s in inputs}


# --- images -----------------------------------------------------------------------------------


def _write_images(folder: Path, count: int, size: tuple[int, int] = (6, 5)) -> None:
    image = pytest.importorskip("PIL.Image")
    folder.mkdir(exist_ok=True)
    for i in range(count):
        pixels = np.full((*size, 3), (10 * i, 100, 255), np.uint8)  # (H, W, RGB)
        image.fromarray(pixels).save(folder / f"img_{i}.{'png' if i % 2 else 'jpg'}", quality=100)


def test_images_nchw_guessed_and_normalized(tmp_path):
    _write_images(tmp_path / "imgs", 3)
    inputs = [InputSpec("x", np.dtype(np.float32), ("N", 3, 4, 4))]
    options = ImageOptions(mean=(0.5,), std=(0.5, 0.5, 0.5))
    source = open_source(tmp_path / "imgs", inputs, image_options=options)
    assert source.samples == 3 and source.description == "imgs/ (3 images, 4x4 NCHW)"
    (batch,) = source.batches(8)
    assert batch["x"].shape == (3, 3, 4, 4)
    np.testing.assert_allclose(batch["x"][1, :, 0, 0], [(10 / 255 - 0.5) * 2, (100 / 255 - 0.5) * 2, 1.0], atol=0.03)


def test_images_nhwc_grayscale_and_size_option(tmp_path):
    _write_images(tmp_path / "imgs", 2)
    inputs = [InputSpec("x", np.dtype(np.float16), ("N", "H", "W", 1))]
    (batch,) = open_source(tmp_path / "imgs", inputs, image_options=ImageOptions(size=(3, 7))).batches(2)
    assert batch["x"].shape == (2, 3, 7, 1) and batch["x"].dtype == np.float16
    with pytest.raises(BnscopeError) as info:
        open_source(tmp_path / "imgs", inputs)
    _assert_user_error(info, "'x'", "height and width")


def test_images_unreadable_file(tmp_path):
    _write_images(tmp_path / "imgs", 1)
    (tmp_path / "imgs" / "zz_broken.png").write_bytes(b"not a png")
    source = open_source(tmp_path / "imgs", _image_like())
    with pytest.raises(BnscopeError) as info:
        list(source.batches(1))
    _assert_user_error(info, "zz_broken.png")


def test_images_without_pillow(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(BnscopeError) as info:
        open_source(tmp_path, _image_like())
    _assert_user_error(info, "pip install 'bnscope[images]'")


def test_images_need_one_image_input(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(BnscopeError) as info:
        open_source(tmp_path, _two_inputs())
    _assert_user_error(info, "'a', 'b'")
    with pytest.raises(BnscopeError) as info:
        open_source(tmp_path, [InputSpec("x", np.dtype(np.float32), ("N", 5, 4, 4))])
    _assert_user_error(info, "'x'", "layout")


def test_data_source_is_the_public_type(tmp_path):
    assert isinstance(open_source(None, _image_like(), random=True), DataSource)
