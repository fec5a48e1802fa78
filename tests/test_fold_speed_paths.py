"""The fast paths of folding a model with external data, checked against the slow, obvious ones.

- TensorStore reads external tensors straight into numpy (same values as onnx's reader);
- a spilling store keeps rewritten weights out of the protobuf, and save_model copies external
  tensors byte for byte (nothing decoded) into ``<out>.data`` inside the output's folder;
- the weight-range maxima are computed without float64 copies and give the same numbers.

The folded model::

    x (N,3,8,8) -> Conv(w 16x3x3x3) -> BN -> Relu -> out        w: 1728 bytes (spilled / external)
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import bn_inits, bn_node, init, make_model, ort_run, vi
from helpers import save_external
from onnx import TensorProto, helper, numpy_helper

from bnscope import numerics
from bnscope.errors import BnscopeError
from bnscope.fold.rewrite import fold_batchnorm
from bnscope.onnxio import external_data, tensor_proto
from bnscope.onnxio.external_data import TensorStore
from bnscope.onnxio.model_io import load_model, save_model
from bnscope.workflows.fold import fold_model
from bnscope.workflows.options import FoldSettings


def conv_bn_model(channels: int = 16, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv"),
        bn_node("h", "y"),
        helper.make_node("Relu", ["y"], ["out"], name="relu"),
    ]
    return make_model(
        nodes,
        [vi("x", ["N", 3, 8, 8])],
        [vi("out", ["N", channels, 6, 6])],
        [init("w", w), *bn_inits(rng, channels)],
        ir_version=8,
    )


def locations(model: onnx.ModelProto) -> set[str]:
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


# -- reading ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.int8, np.bool_, np.uint16])
def test_tensor_store_reads_plain_dtypes_like_numpy_helper(tmp_path, dtype):
    value = (np.arange(24).reshape(2, 3, 4) % 5).astype(dtype)
    model = make_model(
        [helper.make_node("Identity", ["c"], ["out"])],
        [],
        [vi("out", None, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))],
        [init("c", value)],
        ir_version=8,
    )
    loaded = load_model(save_external(model, tmp_path / "m"))
    got = TensorStore(loaded).to_array(loaded.model.graph.initializer[0])
    assert got.dtype == value.dtype and got.shape == value.shape
    np.testing.assert_array_equal(got, value)


def test_tensor_store_reads_bfloat16_through_onnx(tmp_path):
    tensor = helper.make_tensor("c", TensorProto.BFLOAT16, [4], np.array([1.0, -2.0, 0.5, 3.0], np.float32))
    model = make_model(
        [helper.make_node("Identity", ["c"], ["out"])],
        [],
        [vi("out", None, TensorProto.BFLOAT16)],
        [tensor],
        ir_version=8,
    )
    loaded = load_model(save_external(model, tmp_path / "m"))
    got = TensorStore(loaded).to_array(loaded.model.graph.initializer[0])
    np.testing.assert_array_equal(got.astype(np.float32), [1.0, -2.0, 0.5, 3.0])


def test_tensor_store_truncated_external_data_is_one_line_error(tmp_path):
    path = save_external(conv_bn_model(), tmp_path / "m")
    loaded = load_model(path)
    w = next(t for t in loaded.model.graph.initializer if t.name == "w")
    for entry in list(w.external_data):
        if entry.key == "length":
            w.external_data.remove(entry)  # read "to the end of the file", which is too short
    (tmp_path / "m" / "weights.bin").write_bytes(b"\0" * 100)
    with pytest.raises(BnscopeError, match="truncated") as info:
        TensorStore(loaded).to_array(w)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        np.ones((3, 2), np.float32),
        np.float32(2.5),
        np.arange(5, dtype=np.int64),
        np.array([True, False]),
        np.ones((2, 2), np.float16)[:, :1],
    ],
)
def test_fill_inline_matches_numpy_helper_from_array(value):
    tensor = TensorProto()
    tensor.name, tensor.doc_string = "t", "dropped, as CopyFrom(from_array) drops it"
    tensor_proto.fill_inline(tensor, np.asarray(value))
    assert tensor == numpy_helper.from_array(np.asarray(value), "t")


# -- spilling and saving -------------------------------------------------------------------------
def test_spilling_fold_keeps_weights_out_of_the_proto_and_saves_the_same_model(tmp_path):
    model = conv_bn_model()
    path = save_external(model, tmp_path / "m")
    inline, _ = fold_batchnorm(model)
    loaded = load_model(path)
    store = TensorStore(loaded, spill_to=tmp_path / "spill.data")
    folded, records = fold_batchnorm(loaded.model, store=store)
    assert all(r.folded for r in records)
    w = next(t for t in folded.graph.initializer if t.name == "w")
    assert w.data_location == TensorProto.EXTERNAL and not w.raw_data  # in the spill file
    assert locations(folded) == {"spill.data"}
    out = save_model(folded, tmp_path / "out" / "folded.onnx", store=store)
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded.onnx", "folded.onnx.data"]
    saved = onnx.load(str(out))  # onnx's own reader: every tensor inside the folder
    assert locations(onnx.load(str(out), load_external_data=False)) == {"folded.onnx.data"}
    want = {t.name: numpy_helper.to_array(t) for t in inline.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])  # bit-identical to the in-memory fold
    onnx.checker.check_model(str(out), full_check=True)


def test_save_model_copies_untouched_external_tensors_without_decoding(tmp_path, monkeypatch):
    path = save_external(conv_bn_model(), tmp_path / "m")
    loaded = load_model(path)
    store = TensorStore(loaded)

    def no_decoding(*args, **kwargs):
        raise AssertionError("an external tensor was decoded")

    monkeypatch.setattr(TensorStore, "to_array", no_decoding)
    monkeypatch.setattr(numpy_helper, "to_array", no_decoding)
    out = save_model(loaded.model, tmp_path / "o" / "copy.onnx", store=store)
    monkeypatch.undo()
    original = onnx.load(str(path))
    saved = onnx.load(str(out))
    for a, b in zip(original.graph.initializer, saved.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_save_model_aligns_big_tensors_to_pages(tmp_path):
    big = np.arange(300_000, dtype=np.float32).reshape(1000, 300)  # 1.2 MB
    small = np.ones(1000, np.float32)  # 4000 bytes: not aligned, leaves the file unaligned
    model = make_model(
        [helper.make_node("Mul", ["s", "b"], ["out"])],
        [],
        [vi("out", [1000, 300])],
        [init("s", small.reshape(1000, 1)), init("b", big)],
        ir_version=8,
    )
    out = save_model(model, tmp_path / "out.onnx", external=True)
    saved = onnx.load(str(out), load_external_data=False)
    offsets = {t.name: int({e.key: e.value for e in t.external_data}["offset"]) for t in saved.graph.initializer}
    assert offsets["s"] == 0 and offsets["b"] % 4096 == 0
    full = onnx.load(str(out))
    np.testing.assert_array_equal(numpy_helper.to_array(full.graph.initializer[1]), big)


def test_save_model_needs_the_store_for_external_tensors(tmp_path):
    loaded = load_model(save_external(conv_bn_model(), tmp_path / "m"))
    with pytest.raises(ValueError, match="TensorStore"):
        save_model(loaded.model, tmp_path / "out.onnx")


def test_save_model_inline_output_from_external_tensors(tmp_path):
    model = conv_bn_model()
    loaded = load_model(save_external(model, tmp_path / "m"))
    out = save_model(loaded.model, tmp_path / "out.onnx", external=False, store=TensorStore(loaded))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out.onnx"]
    assert onnx.load(str(out)).graph.initializer[0] == model.graph.initializer[0]


def test_fold_model_streams_external_data_and_verifies(tmp_path):
    model = conv_bn_model()
    path = save_external(model, tmp_path / "m", threshold=1024)
    result = fold_model(path, FoldSettings(output=tmp_path / "out" / "folded.onnx"))
    assert result.passed and result.bn_after == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["folded.onnx", "folded.onnx.data"]  # no staging left
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = ort_run(model, {"x": x})[0]
    got = ort_run(onnx.load(str(out / "folded.onnx")), {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fold_model_external_output_in_the_inputs_folder_keeps_the_input(tmp_path):
    path = save_external(conv_bn_model(), tmp_path / "m", threshold=1024)
    before = (tmp_path / "m" / "weights.bin").read_bytes()
    fold_model(path, FoldSettings(output=tmp_path / "m" / "folded.onnx", verify=False))
    assert (tmp_path / "m" / "weights.bin").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "folded.onnx",
        "folded.onnx.data",
        "model.onnx",
        "weights.bin",
    ]


# -- weight-range maxima ------------------------------------------------------------------------
def _growth_reference(w, w_folded):
    before = float(np.abs(np.asarray(w, np.float64)).max()) if np.size(w) else 0.0
    after = float(np.abs(np.asarray(w_folded, np.float64)).max()) if np.size(w_folded) else 0.0
    if before == 0:
        return 1.0 if after == 0 else float("inf")
    return after / before


def _imbalance_reference(w_folded, axis):
    w = np.moveaxis(np.abs(np.asarray(w_folded, np.float64)), axis, 0)
    per_channel = w.reshape(w.shape[0], -1).max(axis=1)
    top, median = float(per_channel.max()), float(np.median(per_channel))
    if median == 0:
        return 1.0 if top == 0 else float("inf")
    return top / median


def _weights():
    rng = np.random.default_rng(0)
    nan = rng.standard_normal((4, 3)).astype(np.float32)
    nan[1, 2] = np.nan
    return [
        rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        rng.standard_normal((5, 7)),
        rng.standard_normal((4, 6)).astype(np.float16),
        np.array([[-np.inf, 1], [2, 3]], np.float32),
        nan,
        rng.integers(-128, 127, (4, 5)).astype(np.int8),
        np.zeros((3, 2)),
        np.array([-3.0, 2.0, 1.0]),
    ]


@pytest.mark.parametrize("w", _weights())
def test_weight_range_maxima_match_the_float64_reference(w):
    scale = np.linspace(-2, 3, w.shape[0]).reshape((-1,) + (1,) * (w.ndim - 1))
    folded = w.astype(np.float64) * scale
    for a, b in ((w, folded), (folded, w)):
        assert numerics.weight_range_growth(a, b) == pytest.approx(_growth_reference(a, b), rel=0, nan_ok=True)
    for axis in range(w.ndim):
        want, got = _imbalance_reference(folded, axis), numerics.channel_range_imbalance(folded, axis)
        assert got == want or (np.isnan(got) and np.isnan(want))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_spilled_values_are_cast_once_like_astype(tmp_path, dtype):
    """Spilling casts block by block (1 MiB at a time); the bytes are those of one astype."""
    loaded = load_model(save_external(conv_bn_model(), tmp_path / "m"))
    store = TensorStore(loaded, spill_to=tmp_path / "spill.data")
    value = np.random.default_rng(0).standard_normal((3, 200_001)) * 1e3  # several blocks, a ragged end
    tensor = TensorProto()
    tensor.name = "big"
    store.put(tensor, value, dtype)
    assert tensor.data_location == TensorProto.EXTERNAL
    got = store.to_array(tensor)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, value.astype(dtype))


def test_tensor_store_maps_big_tensors_read_only_and_caps_the_mappings(tmp_path, monkeypatch):
    big = np.arange(300_000, dtype=np.float32)  # 1.2 MB: mapped
    model = make_model(
        [helper.make_node("Identity", ["c"], ["out"])], [], [vi("out", [300_000])], [init("c", big)], ir_version=8
    )
    loaded = load_model(save_external(model, tmp_path / "m"))
    store = TensorStore(loaded)
    tensor = loaded.model.graph.initializer[0]
    mapped = store.to_array(tensor)
    np.testing.assert_array_equal(mapped, big)
    assert not mapped.flags.writeable  # like numpy_helper.to_array's raw-data arrays
    monkeypatch.setattr(external_data, "MAX_MAPPINGS", 1)
    copied = store.to_array(tensor)  # the cap is reached while ``mapped`` lives: read into memory
    assert copied.flags.writeable
    np.testing.assert_array_equal(copied, big)
    del mapped
    assert not store.to_array(tensor).flags.writeable  # the mapping was released with its array


@pytest.mark.parametrize("w", _weights())
def test_channel_max_abs_of_a_scaled_weight_is_the_scaled_channel_max_abs(w):
    """What lets a fold compute growth and imbalance from W and the BN scale alone: exact, not close."""
    scale = np.random.default_rng(1).standard_normal(w.shape[0]) * 10
    folded = w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    want, got = numerics.channel_max_abs(folded, 0), numerics.channel_max_abs(w, 0) * np.abs(scale)
    np.testing.assert_array_equal(got, want)
