"""Sharded statistics: ``stats --shard I/N --save-moments`` per shard, then ``merge``, must give what
one run over all the data gives (to float64 rounding), also when the batch size does not divide
the sample count (96 samples in batches of 10 or 7: a short last batch lands in one shard).
Mismatched, duplicate and corrupt moments files are input errors (exit 2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import CALIB, RESNET, SHIFTED, assert_input_error, cli

from bnscope.errors import BnscopeError
from bnscope.stats.shards import load_moments, merge_moments


def stats_json(*args) -> dict:
    result = cli("stats", *args, "--per-channel", "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def run_shards(folder: Path, n: int, *args, model: Path = RESNET, data: Path = CALIB) -> list[Path]:
    parts = []
    for i in range(1, n + 1):
        part = folder / f"part_{i}.npz"
        stats_json(model, "--data", data, "--shard", f"{i}/{n}", "--save-moments", part, *args)
        parts.append(part)
    return parts


@pytest.mark.parametrize("batch_size, shards", [(10, 3), (7, 3), (32, 2)])
def test_merge_equals_the_full_run(tmp_path, batch_size, shards):
    full = stats_json(RESNET, "--data", SHIFTED, "-b", batch_size)
    parts = run_shards(tmp_path, shards, "-b", batch_size, data=SHIFTED)
    result = cli("merge", *parts, "--per-channel", "--format", "json")
    assert result.exit_code == 0, result.stderr
    merged = json.loads(result.stdout)
    assert merged["schema_version"] == 1
    assert merged["data"]["samples"] == full["data"]["samples"] == 96
    assert merged["data"]["batches"] == full["data"]["batches"] == -(-96 // batch_size)
    assert [layer["name"] for layer in merged["layers"]] == [layer["name"] for layer in full["layers"]]
    for got, want in zip(merged["layers"], full["layers"]):
        assert got["count"] == want["count"]
        assert got["verdict"] == want["verdict"]
        for key in ("batch_mean", "batch_var"):
            a, b = np.asarray(got[key]), np.asarray(want[key])
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.max(np.abs(b)), err_msg=key)
        for key in ("running_mean", "running_var"):
            assert got[key] == want[key]
        np.testing.assert_allclose(got["d"], want["d"], rtol=1e-9, atol=1e-12)
    assert merged["summary"]["verdicts"] == full["summary"]["verdicts"]


def test_each_shard_takes_every_nth_batch(tmp_path):
    """Batches 1..10 (the tenth has 6 samples) over 3 shards: 1,4,7,10 | 2,5,8 | 3,6,9."""
    docs = [stats_json(RESNET, "--data", CALIB, "-b", "10", "--shard", f"{i}/3") for i in (1, 2, 3)]
    assert [d["data"]["batches"] for d in docs] == [4, 3, 3]
    assert [d["data"]["samples"] for d in docs] == [36, 30, 30]


def test_merge_as_a_library_and_in_any_order(tmp_path):
    parts = run_shards(tmp_path, 3, "-b", "10")
    forward, backward = merge_moments(parts), merge_moments(parts[::-1])
    for a, b in zip(forward.layers, backward.layers):
        np.testing.assert_allclose(a.batch_mean, b.batch_mean, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(a.batch_var, b.batch_var, rtol=1e-13)
        assert a.count == b.count


def test_merge_table_and_thresholds(tmp_path):
    parts = run_shards(tmp_path, 2, "-b", "32", data=SHIFTED)
    table = cli("merge", *parts)
    assert table.exit_code == 0 and "block2_proj_bn" in table.stdout
    assert cli("merge", *parts, "--fail-on-drift").exit_code == 1
    lenient = cli("merge", *parts, "--max-d", "100", "--max-log-r", "100", "--fail-on-drift")
    assert lenient.exit_code == 0


def test_moments_file_holds_no_pickles(tmp_path):
    (part,) = run_shards(tmp_path, 1, "-b", "32")
    with np.load(part, allow_pickle=False) as z:
        assert "header" in z.files
        assert all(z[k].dtype != object for k in z.files)
    _, _, meta = load_moments(part)
    assert meta["batch_size"] == 32 and meta["shard"] == [0, 1] and len(meta["fingerprint"]) == 64


# -- refusals ---------------------------------------------------------------------------------------------
def test_merge_refuses_a_different_model(tmp_path):
    """Same layers, different bytes (another doc string): the fingerprints differ."""
    import onnx

    other = tmp_path / "other.onnx"
    model = onnx.load(str(RESNET))
    model.doc_string = "a different export"
    onnx.save_model(model, str(other))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = run_shards(tmp_path / "a", 2, "-b", "32")
    second = run_shards(tmp_path / "b", 2, "-b", "32", model=other)
    assert_input_error(cli("merge", first[0], second[1]), "fingerprint")


def test_merge_refuses_different_batch_sizes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = run_shards(tmp_path / "a", 2, "-b", "32")
    second = run_shards(tmp_path / "b", 2, "-b", "16")
    assert_input_error(cli("merge", first[0], second[1]), "batch_size")


def test_merge_refuses_different_splits(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    thirds = run_shards(tmp_path / "a", 3, "-b", "10")
    halves = run_shards(tmp_path / "b", 2, "-b", "10")
    assert_input_error(cli("merge", thirds[0], halves[1]), "different splits")


def test_merge_refuses_duplicate_shards(tmp_path):
    parts = run_shards(tmp_path, 3, "-b", "10")
    assert_input_error(cli("merge", parts[0], parts[1], parts[0]), "same shard")
    copy = tmp_path / "copy_of_part_2.npz"
    shutil.copy(parts[1], copy)
    assert_input_error(cli("merge", *parts, copy), "same shard")


def test_merge_without_files_is_a_usage_error():
    assert cli("merge").exit_code == 2
    with pytest.raises(BnscopeError):
        merge_moments([])


@pytest.fixture
def part(tmp_path) -> Path:
    (first,) = run_shards(tmp_path, 1, "-b", "32")
    return first


def _rewrite(part: Path, path: Path, edit) -> Path:
    with np.load(part) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    np.savez(path, **arrays)
    return path


def _header(arrays, **changes):
    meta = json.loads(str(arrays["header"]))
    meta.update(changes)
    arrays["header"] = np.array(json.dumps(meta))


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


CORRUPT = {
    "text": lambda part, path: _write(path, b"not a moments file\n"),
    "calibration_npz": lambda part, path: _write(path, CALIB.read_bytes()),
    "header_not_json": lambda part, path: _rewrite(part, path, lambda a: a.update(header=np.array("{oops"))),
    "newer_format": lambda part, path: _rewrite(part, path, lambda a: _header(a, format_version=99)),
    "truncated": lambda part, path: _write(path, part.read_bytes()[:3000]),
    "missing_array": lambda part, path: _rewrite(part, path, lambda a: a.pop("l1_m2")),
    "wrong_shape": lambda part, path: _rewrite(part, path, lambda a: a.update(l0_mean=a["l0_mean"][:3])),
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_corrupt_moments_file_is_an_input_error(tmp_path, part, kind):
    bad = CORRUPT[kind](part, tmp_path / f"bad_{kind}.npz")
    result = cli("merge", part, bad)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_corrupt_moments_messages_name_the_file(tmp_path, part):
    bad = CORRUPT["text"](part, tmp_path / "bad.npz")
    assert_input_error(cli("merge", part, bad), "bad.npz")
    newer = CORRUPT["newer_format"](part, tmp_path / "newer.npz")
    assert_input_error(cli("merge", newer), "format")


def test_missing_moments_file_is_an_input_error(tmp_path, part):
    assert_input_error(cli("merge", part, tmp_path / "nothere.npz"), "nothere.npz")


def test_merge_of_some_shards_is_an_input_error(tmp_path):
    """Two of three shards would gate a model on part of the data: refused, naming the missing shard."""
    parts = run_shards(tmp_path, 3, "-b", "10")
    assert_input_error(cli("merge", parts[0], parts[2]), "shard(s) 2 missing")
    assert_input_error(cli("merge", parts[0], parts[2]), "--allow-partial")


def test_merge_of_some_shards_with_allow_partial_reports_what_it_merged(tmp_path):
    """With --allow-partial the two shards merge with a warning, and the counts tell."""
    parts = run_shards(tmp_path, 3, "-b", "10")
    result = cli("merge", parts[0], parts[1], "--allow-partial", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert "2 of 3 shards given" in result.stderr
    data = json.loads(result.stdout)["data"]
    assert (data["samples"], data["batches"], data["shards"]) == (66, 7, 2)
