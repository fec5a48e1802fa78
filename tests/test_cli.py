"""The command line as a user and a CI pipeline see it: output formats, exit codes, stdout vs stderr.

Every command runs in-process through ``typer.testing.CliRunner`` (stdout and stderr apart:
``result.stdout`` / ``result.stderr``) on the bundled sample models, with the terminal width pinned
(COLUMNS=120). Bad inputs are small files built in ``tmp_path``; each must give exit 2 and exactly
one line on stderr, never a traceback.

Exit codes: 0 ok, 1 a check failed, 2 usage/input error, 3 internal error (traceback with --debug).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import stat
import warnings
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import cyclic_model, tiny_bn_model
from helpers import (
    BROKEN,
    BROKEN_CALIB,
    CALIB,
    RESNET,
    RESNET_BN,
    SHIFTED,
    assert_input_error,
    cli,
    json_out,
    listing,
    relocate_external,
    save_external,
)

import bnscope

# The documented JSON keys (README, "JSON output"); documents may carry more.
INSPECT_KEYS = {"schema_version", "model", "layers", "decomposed_bn", "summary"}
INSPECT_MODEL_KEYS = {"path", "ir_version", "opset", "producer", "inputs", "outputs", "node_count", "bn_count", "notes"}
INSPECT_LAYER_KEYS = {
    "name",
    "input",
    "output",
    "rank",
    "channels",
    "epsilon",
    "momentum",
    "training_mode",
    "producer",
    "consumers",
    "fold",
    "flags",
}
FOLD_DECISION_KEYS = {"possible", "direction", "target", "reason", "notes"}
FLAG_KEYS = {"code", "severity", "channels", "message"}
STATS_KEYS = {"schema_version", "model", "mode", "data", "thresholds", "layers", "skipped", "summary"}
STATS_DATA_KEYS = {"source", "samples", "batches", "random"}
STATS_LAYER_KEYS = {
    "name",
    "index",
    "channels",
    "count",
    "strategy",
    "verdict",
    "why",
    "max_abs_d",
    "mean_abs_d",
    "max_abs_log_r",
    "mean_abs_log_r",
    "fraction_over",
    "worst_channels",
}
STATS_SUMMARY_KEYS = {"layers", "verdicts", "first_not_ok", "reading"}
FOLD_KEYS = {"schema_version", "model", "output", "bn_before", "bn_after", "layers", "verification", "warnings"}
FOLD_LAYER_KEYS = {
    "name",
    "folded",
    "direction",
    "target",
    "target_op",
    "reason",
    "notes",
    "weight_range_growth",
    "channel_range_imbalance",
}
VERIFICATION_KEYS = {"passed", "provider", "active_providers", "data", "outputs"}
VERIFIED_OUTPUT_KEYS = {"name", "max_abs", "max_rel", "passed", "atol", "rtol"}
CHECK_KEYS = {"schema_version", "model", "passed", "failures", "results", "not_run"}
CHECK_RESULT_KEYS = {"rule", "layer", "passed", "message"}
RECALIBRATE_KEYS = {"schema_version", "model", "output", "method", "data", "passes", "layers", "accuracy"}
RUN_KEYS = {"schema_version", "model", "provider", "active_providers", "fell_back", "latency", "placement", "cpu_nodes"}
RUN_COMPARE_KEYS = {"model", "latency", "latency_ratio", "outputs", "passed"}


# -- small models and data for the bad-input cases ---------------------------------------------------


def bad_model(kind: str, tmp_path: Path) -> Path:
    """A model file that must be refused with exit 2."""
    path = tmp_path / "bad" / "model.onnx"
    path.parent.mkdir(parents=True)
    if kind == "missing":
        return tmp_path / "bad" / "nothere.onnx"
    if kind == "text":
        path.write_text("this is not an ONNX model\n")
    elif kind == "truncated":
        path.write_bytes(RESNET.read_bytes()[:1000])
    elif kind == "cyclic":
        onnx.save_model(cyclic_model(), str(path))
    elif kind in ("external_parent", "external_absolute", "external_missing"):
        outside = tmp_path / "x.bin"
        path = save_external(tiny_bn_model(), tmp_path / "bad", location="weights.bin")
        (tmp_path / "bad" / "weights.bin").rename(outside)
        relocate_external(
            path,
            {"external_parent": "../x.bin", "external_absolute": str(outside), "external_missing": "weights.bin"}[kind],
        )
    return path


BAD_MODELS = {
    "missing": ("not found",),
    "text": ("not a readable ONNX model",),
    "truncated": ("not a readable ONNX model",),
    "cyclic": ("has a cycle", "Hint:"),
    "external_parent": ("unsafe external data location", "../x.bin"),
    "external_absolute": ("unsafe external data location",),
    "external_missing": ("missing", "weights.bin"),
}


def command(name: str, model: Path, tmp_path: Path, data: Path | None = None) -> list:
    """Arguments that make ``name`` load ``model`` (and read ``data`` where given)."""
    out = tmp_path / "out" / "out.onnx"
    feed = ["--data", data] if data else ["--random"]
    return {
        "inspect": ["inspect", model],
        "stats": ["stats", model, *feed, "--max-batches", "1"],
        "fold": ["fold", model, "-o", out, *feed],
        "run": ["run", model, *feed, "--runs", "1", "--warmup", "0"],
        "recalibrate": ["recalibrate", model, "--data", data or CALIB, "-o", out],
        "check": ["check", model, *(["--data", data] if data else [])],
    }[name]


COMMANDS = ["inspect", "stats", "fold", "run", "recalibrate", "check"]


# -- --version, help ------------------------------------------------------------------------------
def test_version_names_bnscope_onnx_and_the_onnxruntime_package():
    result = cli("--version")
    assert result.exit_code == 0
    line = result.stdout.strip()
    assert f"bnscope {bnscope.__version__}" in line
    assert f"onnx {onnx.__version__}" in line
    installed = [d for d in ("onnxruntime", "onnxruntime-gpu") if _installed(d)]
    assert any(f"{d} {metadata.version(d)}" in line for d in installed), line
    assert result.stderr == ""


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def test_cli_without_arguments_shows_help_and_lists_every_command():
    result = cli()
    text = result.stdout + result.stderr
    for name in (*COMMANDS, "merge"):
        assert name in text


# -- every command in every format ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["table", "json", "markdown"])
def test_inspect_every_format(fmt):
    result = cli("inspect", RESNET, "--format", fmt)
    assert result.exit_code == 0, result.stderr
    if fmt == "json":
        doc = json_out(result)
        assert set(doc) >= INSPECT_KEYS
        assert set(doc["model"]) >= INSPECT_MODEL_KEYS
        assert [layer["name"] for layer in doc["layers"]] == RESNET_BN
        for layer in doc["layers"]:
            assert set(layer) >= INSPECT_LAYER_KEYS
            assert set(layer["fold"]) >= FOLD_DECISION_KEYS
            assert set(layer["producer"]) == {"op", "name"}
            assert all(set(c) == {"op", "name"} for c in layer["consumers"])
        assert set(doc["summary"]) >= {"bn", "foldable", "flags"}
        assert doc["summary"]["bn"] == doc["summary"]["foldable"] == 6
    elif fmt == "markdown":
        assert result.stdout.startswith("## bnscope inspect")
        assert "| `stem_bn` |" in result.stdout
    else:
        assert all(name in result.stdout for name in RESNET_BN)
        assert "6 BN, 6 foldable, 0 error(s), 0 warning(s)" in result.stdout
        assert max(len(line) for line in result.stdout.splitlines()) <= 160


def test_inspect_json_flags_have_the_documented_keys():
    doc = json_out(cli("inspect", BROKEN, "-f", "json"))
    flags = [f for layer in doc["layers"] for f in layer["flags"]]
    assert flags and all(set(f) >= FLAG_KEYS for f in flags)
    assert doc["summary"]["flags"] == {"error": 1, "warning": 1, "info": 0}


@pytest.mark.parametrize("fmt", ["table", "json", "markdown", "csv"])
def test_stats_every_format(fmt):
    result = cli("stats", RESNET, "--data", CALIB, "--max-batches", "1", "--format", fmt)
    assert result.exit_code == 0, result.stderr
    if fmt == "json":
        doc = json_out(result)
        assert set(doc) >= STATS_KEYS
        assert set(doc["data"]) >= STATS_DATA_KEYS
        assert set(doc["summary"]) >= STATS_SUMMARY_KEYS
        assert doc["data"]["samples"] == 32 and doc["data"]["batches"] == 1 and doc["data"]["random"] is False
        for layer in doc["layers"]:
            assert set(layer) >= STATS_LAYER_KEYS
            assert "batch_mean" not in layer and "d" not in layer  # compact: arrays only with --per-channel
        assert [layer["verdict"] for layer in doc["layers"]] == ["ok"] * 6
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        assert [r["layer"] for r in rows] == RESNET_BN
        assert {"verdict", "max_abs_d", "max_abs_log_r"} <= set(rows[0])
    elif fmt == "markdown":
        assert result.stdout.startswith("## bnscope stats")
        assert "`block2_proj_bn`" in result.stdout
    else:
        assert all(name in result.stdout for name in RESNET_BN)
        assert "agree" in result.stdout


def test_stats_csv_per_channel_has_one_row_per_channel():
    result = cli("stats", RESNET, "--data", CALIB, "--max-batches", "1", "-f", "csv", "--per-channel")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 16 * 3 + 32 * 3
    assert {"layer", "channel", "batch_mean", "d", "log_r"} <= set(rows[0])


@pytest.mark.parametrize("fmt", ["table", "json", "markdown"])
def test_fold_every_format(tmp_path, fmt):
    out = tmp_path / "folded.onnx"
    result = cli("fold", RESNET, "-o", out, "--format", fmt)
    assert result.exit_code == 0, result.stderr
    assert out.is_file()
    if fmt == "json":
        doc = json_out(result)
        assert set(doc) >= FOLD_KEYS
        assert doc["bn_before"] == 6 and doc["bn_after"] == 0 and doc["output"] == str(out)
        assert all(set(layer) >= FOLD_LAYER_KEYS for layer in doc["layers"])
        assert set(doc["verification"]) >= VERIFICATION_KEYS
        assert doc["verification"]["passed"] is True
        assert all(set(o) >= VERIFIED_OUTPUT_KEYS for o in doc["verification"]["outputs"])
    elif fmt == "markdown":
        assert result.stdout.startswith("## bnscope fold")
        assert "passed" in result.stdout
    else:
        assert "6 BN -> 0" in result.stdout and f"wrote {out}" in result.stdout


def test_fold_table_names_a_long_output_path_whole(tmp_path):
    # A long checkout or temp path (seen on a GPU machine) must not be wrapped across lines.
    out = tmp_path / ("d" * 170) / "folded.onnx"
    out.parent.mkdir()
    result = cli("fold", RESNET, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert f"wrote {out}\n" in result.stdout


@pytest.fixture(scope="module")
def folded_resnet(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folded") / "resnet_small_folded.onnx"
    assert cli("fold", RESNET, "-o", out).exit_code == 0
    return out


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_run_every_format(fmt, folded_resnet):
    result = cli(
        "run",
        RESNET,
        "--compare",
        folded_resnet,
        "--random",
        "-b",
        "4",
        "--runs",
        "3",
        "--warmup",
        "1",
        "--format",
        fmt,
    )
    assert result.exit_code == 0, result.stderr
    if fmt == "json":
        doc = json_out(result)
        assert set(doc) >= RUN_KEYS
        assert doc["active_providers"] == ["CPUExecutionProvider"] and doc["fell_back"] is False
        assert set(doc["compare"]) >= RUN_COMPARE_KEYS
        assert doc["compare"]["passed"] is True
        if doc["placement"] is None:  # onnxruntime < 1.31 does not report it, and says so
            assert doc["cpu_nodes"] is None and doc["placement_note"].startswith("not checked")
        else:  # the optimised graph's nodes, all on the CPU EP that was asked for
            assert set(doc["placement"]) == {"CPUExecutionProvider"} and doc["cpu_nodes"] == []
            assert 0 < doc["placement"]["CPUExecutionProvider"] <= len(onnx.load(RESNET).graph.node)
    else:
        assert "median ms" in result.stdout and "latency ratio" in result.stdout
        assert "placement" in result.stdout


@pytest.mark.parametrize("fmt", ["table", "json", "markdown"])
def test_recalibrate_every_format(tmp_path, fmt):
    out = tmp_path / "recal.onnx"
    result = cli("recalibrate", RESNET, "--data", SHIFTED, "-o", out, "-b", "48", "--format", fmt)
    assert result.exit_code == 0, result.stderr
    assert out.is_file()
    if fmt == "json":
        doc = json_out(result)
        assert set(doc) >= RECALIBRATE_KEYS
        assert [layer["name"] for layer in doc["layers"]] == RESNET_BN
        assert all({"name", "pass", "before", "after"} <= set(layer) for layer in doc["layers"])
        assert all(layer["after"]["verdict"] == "ok" for layer in doc["layers"])
        assert set(doc["accuracy"]) == {"before", "after"}
    elif fmt == "markdown":
        assert result.stdout.startswith("## bnscope recalibrate")
    else:
        assert f"wrote {out}" in result.stdout


@pytest.mark.parametrize("fmt", ["table", "json", "markdown", "junit"])
def test_check_every_format(fmt):
    result = cli("check", RESNET, "--data", CALIB, "--format", fmt)
    assert result.exit_code == 0, result.stderr
    if fmt == "json":
        doc = json_out(result)
        assert set(doc) >= CHECK_KEYS
        assert doc["passed"] is True and doc["failures"] == 0
        assert all(set(r) >= CHECK_RESULT_KEYS for r in doc["results"])
        assert doc["not_run"] == []
    elif fmt == "junit":
        root = ET.fromstring(result.stdout)
        assert root.tag == "testsuites" and root.get("failures") == "0"
    elif fmt == "markdown":
        assert result.stdout.startswith("## :white_check_mark: bnscope check")
    else:
        assert "PASSED" in result.stdout


# -- exit code 1: the gates -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "model, fail_on, code",
    [
        (BROKEN, "warning", 1),
        (BROKEN, "error", 1),
        (BROKEN, "never", 0),
        (RESNET, "warning", 0),
    ],
)
def test_inspect_fail_on(model, fail_on, code):
    result = cli("inspect", model, "--fail-on", fail_on)
    assert result.exit_code == code, result.stderr


def test_inspect_fail_on_warning_fails_for_a_warning_alone(tmp_path):
    """A never-updated BN (a warning, no error) trips --fail-on warning but not --fail-on error."""
    model = tiny_bn_model()
    for t in model.graph.initializer:
        if t.name in ("bn_mean", "bn_var"):
            t.CopyFrom(
                onnx.numpy_helper.from_array(np.full(4, 0.0 if t.name == "bn_mean" else 1.0, np.float32), t.name)
            )
    path = tmp_path / "never.onnx"
    onnx.save_model(model, str(path))
    assert cli("inspect", path, "--fail-on", "warning").exit_code == 1
    assert cli("inspect", path, "--fail-on", "error").exit_code == 0


def test_stats_fail_on_drift():
    shifted = cli("stats", RESNET, "--data", SHIFTED, "--fail-on-drift", "-f", "json")
    assert shifted.exit_code == 1
    verdicts = json_out(shifted)["summary"]["verdicts"]
    assert verdicts["drift"] == 1 and verdicts["inherited"] == 5  # stem_bn, the root; the rest after it
    assert cli("stats", RESNET, "--data", CALIB, "--fail-on-drift").exit_code == 0


def test_check_broken_fails_and_healthy_with_data_passes():
    broken = cli("check", BROKEN, "-f", "json")
    assert broken.exit_code == 1
    failed = {(r["rule"], r["layer"]) for r in json_out(broken)["results"] if not r["passed"]}
    assert failed == {("no_nonfinite", "bn4_nan_var"), ("no_never_updated", "bn3_never_updated")}
    assert cli("check", RESNET, "--data", CALIB).exit_code == 0


# -- exit code 2: bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("kind", list(BAD_MODELS))
def test_bad_model_is_an_input_error_for_every_command(tmp_path, kind, name):
    model = bad_model(kind, tmp_path)
    assert_input_error(cli(*command(name, model, tmp_path)), *BAD_MODELS[kind])
    assert not (tmp_path / "out" / "out.onnx").exists()


@pytest.fixture
def bad_data(tmp_path):
    """name -> an .npz that resnet_small must refuse, and what the message must say."""
    x = np.load(CALIB)["input"][:8]
    cases = {
        "wrong_name": ({"images": x, "extra": x}, ("'input'",)),
        "wrong_shape": ({"input": x[:, :, :16, :16]}, ("shape",)),
        "wrong_dtype": ({"input": x.astype(np.int64)}, ("float32", "int64")),
        "object": ({"input": np.array([{"a": 1}, None], dtype=object)}, ("objects",)),
    }
    paths = {}
    for name, (arrays, needles) in cases.items():
        paths[name] = (tmp_path / f"{name}.npz", needles)
        np.savez(paths[name][0], **arrays)
    return paths


@pytest.mark.parametrize("name", ["stats", "fold", "run", "recalibrate", "check"])
@pytest.mark.parametrize("case", ["wrong_name", "wrong_shape", "wrong_dtype", "object"])
def test_bad_data_is_an_input_error_for_every_command(tmp_path, bad_data, case, name):
    path, needles = bad_data[case]
    assert_input_error(cli(*command(name, RESNET, tmp_path, data=path)), *needles)
    assert not (tmp_path / "out" / "out.onnx").exists()


def test_missing_data_path_is_an_input_error(tmp_path):
    assert_input_error(cli("stats", RESNET, "--data", tmp_path / "nothere.npz"), "does not exist")


def test_stats_without_a_data_source_is_an_input_error():
    # the hint names the options a new user types (it said "a loader script, or random data")
    assert_input_error(cli("stats", RESNET), "no calibration data", "--data FILE", "--loader", "--random")


def test_recalibrate_without_data_is_an_input_error(tmp_path):
    assert_input_error(cli("recalibrate", RESNET, "-o", tmp_path / "r.onnx"), "needs data")


@pytest.mark.parametrize("value", ["2", "0/3", "4/3", "a/b"])
def test_stats_bad_shard_is_an_input_error(value):
    assert_input_error(cli("stats", RESNET, "--data", CALIB, "--shard", value), "--shard")


@pytest.mark.parametrize("name", ["stats", "recalibrate", "check"])
@pytest.mark.parametrize(
    "size",
    [
        "-1",
        "0",
    ],
)
def test_bad_batch_size_is_an_input_error(tmp_path, name, size):
    assert_input_error(cli(*command(name, RESNET, tmp_path, data=CALIB), "--batch-size", size), "batch size")


def test_fold_two_data_sources_is_an_input_error(tmp_path):
    assert_input_error(cli("fold", RESNET, "-o", tmp_path / "f.onnx", "--data", CALIB, "--random"), "choose one")


def nan_data(tmp_path: Path) -> Path:
    x = np.load(CALIB)["input"].copy()
    x[0, 0, 0, 0] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, input=x)
    return path


def test_stats_on_nan_data_is_an_input_error(tmp_path):
    """NaN in the data is bad input (rule 3): one line naming the batch and the input, exit 2,
    for stats and for the CI gate."""
    for args in (("stats", RESNET, "--data", nan_data(tmp_path)), ("check", RESNET, "--data", nan_data(tmp_path))):
        result = cli(*args)
        assert_input_error(result, "NaN/Inf")
        assert "batch 1" in result.stderr and "1 in 'input'" in result.stderr and "--allow-nonfinite" in result.stderr


def test_stats_allow_nonfinite_reports_broken_layers(tmp_path):
    """A NaN pixel spreads through the first Conv into every channel: every layer is broken, the
    report says the data hold one non-finite value and tells the user to look at the data."""
    result = cli("stats", RESNET, "--data", nan_data(tmp_path), "--allow-nonfinite", "-f", "json")
    assert result.exit_code == 0, result.stderr
    doc = json_out(result)
    assert doc["data"]["nonfinite_values"] == 1
    assert [layer["verdict"] for layer in doc["layers"]] == ["broken"] * 6
    assert doc["layers"][0]["max_abs_d"] is None  # NaN is written as null
    assert any("NaN" in line and "data" in line for line in doc["summary"]["reading"])
    assert cli("stats", RESNET, "--data", nan_data(tmp_path), "--allow-nonfinite", "--fail-on-drift").exit_code == 1


def test_stats_on_nan_data_prints_no_python_warnings(tmp_path):
    """No 'RuntimeWarning: All-NaN slice encountered' on the user's stderr (turned into errors here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = cli("stats", RESNET, "--data", nan_data(tmp_path), "--allow-nonfinite")
    assert result.exit_code == 0, result.stderr


def test_fold_output_same_as_input_is_refused_and_input_unchanged(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(BROKEN.read_bytes())
    assert_input_error(cli("fold", model, "-o", model), "refusing to overwrite")
    (tmp_path / "link.onnx").symlink_to(model)
    assert_input_error(cli("fold", model, "-o", tmp_path / "link.onnx"), "refusing to overwrite")
    assert model.read_bytes() == BROKEN.read_bytes()
    assert listing(tmp_path) == ["link.onnx", "model.onnx"]


def test_fold_broken_writes_atomically_and_leaves_no_temp_files(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = cli("fold", BROKEN, "-o", out_dir / "broken_folded.onnx", "-f", "json", "--no-verify")
    assert result.exit_code == 0, result.stderr
    doc = json_out(result)
    assert (doc["bn_before"], doc["bn_after"]) == (4, 1)
    kept = [layer for layer in doc["layers"] if not layer["folded"]]
    assert [layer["name"] for layer in kept] == ["bn4_nan_var"]
    assert listing(out_dir) == ["broken_folded.onnx"]
    onnx.checker.check_model(str(out_dir / "broken_folded.onnx"), full_check=True)


def test_fold_of_broken_never_verifies_its_nan_outputs(tmp_path):
    """broken.onnx's kept NaN-variance BN makes its outputs NaN: equal NaN used to pass as 'max abs 0'."""
    result = cli("fold", BROKEN, "-o", tmp_path / "f.onnx", "-f", "json")
    assert result.exit_code == 1
    output = json_out(result)["verification"]["outputs"][0]
    assert not output["passed"] and "NaN/inf" in output["reason"]
    assert not (tmp_path / "f.onnx").exists()


def test_fold_failing_verification_writes_nothing(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = cli("fold", BROKEN, "-o", out_dir / "f.onnx", "--atol", "0", "--rtol", "0", "-f", "json")
    assert result.exit_code == 1
    doc = json_out(result)
    assert doc["output"] is None and doc["verification"]["passed"] is False
    assert listing(out_dir) == []


def test_fold_output_has_ordinary_file_permissions(tmp_path):
    out = tmp_path / "f.onnx"
    old = os.umask(0o022)
    try:
        assert cli("fold", RESNET, "-o", out, "--no-verify").exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


# -- exit code 3 and --debug -----------------------------------------------------------------------
def _boom(*args, **kwargs):
    raise RuntimeError("boom in the library\nsecond line")


def test_internal_error_exits_3_with_one_line(monkeypatch):
    monkeypatch.setattr("bnscope.workflows.inspect.find_decomposed_bn", _boom)
    result = cli("inspect", RESNET)
    assert result.exit_code == 3
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "RuntimeError: boom in the library" in lines[0] and "--debug" in lines[0]
    assert "Traceback" not in result.stderr


def test_internal_error_with_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setattr("bnscope.workflows.inspect.find_decomposed_bn", _boom)
    result = cli("--debug", "inspect", RESNET)
    assert result.exit_code == 3
    assert result.stdout == ""
    assert "Traceback" in result.stderr
    assert "boom in the library" in result.stderr and "_boom" in result.stderr


def test_check_failed_raised_in_the_library_exits_1_with_one_line(monkeypatch):
    def gate(*args, **kwargs):
        raise bnscope.CheckFailed("the gate failed. Hint: look at the report")

    monkeypatch.setattr("bnscope.workflows.inspect.find_decomposed_bn", gate)
    result = cli("inspect", RESNET)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: the gate failed. Hint: look at the report"]


def test_input_error_with_debug_is_still_one_line(tmp_path):
    assert_input_error(cli("--debug", "inspect", tmp_path / "nothere.onnx"), "not found")


# -- stdout is data, logs go to stderr ----------------------------------------------------------------
def test_verbose_logs_go_to_stderr_and_stdout_stays_json():
    result = cli("-vv", "stats", RESNET, "--data", CALIB, "--max-batches", "1", "-f", "json")
    assert result.exit_code == 0
    json_out(result)
    assert "calibration data" in result.stderr
    assert "DEBUG" not in result.stdout and "INFO" not in result.stdout


def test_verbose_recalibrate_logs_its_passes_on_stderr(tmp_path):
    result = cli("-v", "recalibrate", RESNET, "--data", CALIB, "-o", tmp_path / "r.onnx", "-b", "96", "-f", "json")
    assert result.exit_code == 0, result.stderr
    json_out(result)
    assert "pass 1" in result.stderr


def test_quiet_prints_nothing_on_stderr():
    result = cli("-q", "inspect", BROKEN, "-f", "json")
    assert result.exit_code == 0
    assert result.stderr == ""
    json_out(result)


@pytest.mark.parametrize(
    "args, code",
    [
        (("inspect", BROKEN, "-f", "json"), 0),  # exit 1 only with --fail-on
        (("stats", BROKEN, "--data", BROKEN_CALIB, "-f", "json"), 0),  # exit 1 only with --fail-on-drift
        (("check", BROKEN, "--data", BROKEN_CALIB, "-f", "json"), 1),  # broken.onnx fails the gate
    ],
)
def test_json_on_stdout_is_the_whole_stdout(args, code):
    """No banner, progress or warning text mixed into the JSON, even for a model with problems."""
    result = cli(*args)
    assert result.exit_code == code, result.stderr
    doc = json_out(result)
    assert len(doc["layers" if args[0] != "check" else "results"]) >= 4  # the whole report, not a stub


# -- models with external data -------------------------------------------------------------------------
@pytest.fixture
def external_broken(tmp_path) -> Path:
    """broken.onnx with every tensor in weights.bin (its Conv weights are > 1 KiB)."""
    return save_external(onnx.load(str(BROKEN)), tmp_path / "ext")


@pytest.fixture
def external_resnet(tmp_path) -> Path:
    """resnet_small.onnx with every tensor in weights.bin: a fold of it verifies (broken.onnx's NaN
    outputs never do), so the float floor is measured on external weights too."""
    return save_external(onnx.load(str(RESNET)), tmp_path / "ext_resnet")


@pytest.mark.parametrize("name", ["inspect", "fold", "run"])
def test_external_data_model_works(tmp_path, external_broken, external_resnet, name):
    model, data = (external_resnet, CALIB) if name == "fold" else (external_broken, BROKEN_CALIB)
    result = cli(*command(name, model, tmp_path, data=data if name != "inspect" else None))
    assert result.exit_code == 0, result.stderr
    assert listing(model.parent) == ["model.onnx", "weights.bin"]


def test_fold_external_data_model_keeps_external_data(tmp_path, external_resnet):
    out = tmp_path / "out" / "f.onnx"
    assert cli("fold", external_resnet, "-o", out).exit_code == 0
    assert listing(out.parent) == ["f.onnx", "f.onnx.data"]
    assert cli("inspect", out, "-f", "json").exit_code == 0


@pytest.mark.parametrize("name, code", [("stats", 0), ("check", 1), ("recalibrate", 0)])
def test_external_data_model_statistics(tmp_path, external_broken, name, code):
    """The same verdicts as for the inline model: check fails on broken.onnx's defects, not on
    the external data."""
    result = cli(*command(name, external_broken, tmp_path, data=BROKEN_CALIB), "-f", "json")
    assert result.exit_code == code, result.stderr
    inline = cli(*command(name, BROKEN, tmp_path, data=BROKEN_CALIB), "-f", "json")
    assert inline.exit_code == code, inline.stderr
    if name == "check":
        assert json_out(result)["results"] == json_out(inline)["results"]
    if name == "stats":
        verdicts = [[(layer["name"], layer["verdict"]) for layer in json_out(r)["layers"]] for r in (result, inline)]
        assert verdicts[0] == verdicts[1]


def test_fold_external_data_model_with_small_tensors(tmp_path):
    model = save_external(tiny_bn_model(), tmp_path / "ext")
    result = cli("fold", model, "-o", tmp_path / "ext" / "f.onnx")
    assert result.exit_code == 0, result.stderr
    assert not [n for n in listing(tmp_path / "ext") if n.startswith(".")]


def test_cli_log_lines_are_plain_and_unwrapped_off_a_terminal(tmp_path):
    # CI logs: a long warning stays one line, prefixed like bnscope's "error:" lines.
    from bnscope.cli import app as cli_module

    cli_module.setup_logging(logging.WARNING)
    handler = logging.getLogger("bnscope").handlers[0]
    assert not isinstance(handler, cli_module.RichHandler)
    record = logging.LogRecord("bnscope.x", logging.WARNING, __file__, 1, "w" * 300, None, None)
    assert handler.format(record) == "warning: " + "w" * 300
