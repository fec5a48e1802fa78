"""The attack corpus of issue 13, input side: never exit 3 for bad input, never a silent false result.

Hostile names are shown as text (no markup, control characters escaped) in every format; sizes
are checked before allocating; every broken model, option and config value is exit 2 and one
line; a gate that checked nothing does not pass; typer's own usage errors are one line too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import bn_inits, bn_node, init, make_model, tiny_bn_model, vi
from helpers import BROKEN, CALIB, RESNET, SHIFTED, assert_input_error, cli, save_external
from onnx import helper, numpy_helper

from bnscope import report

ESCAPE_NAME = "\x1b[31mred\x1b]0;title\x07\u202e"
MARKUP_NAME = "[bold red]ghost[/]"


def named_model(tmp_path: Path, name: str, file: str = "named.onnx") -> Path:
    model = tiny_bn_model()
    model.graph.node[1].name = name
    path = tmp_path / file
    onnx.save(model, str(path))
    return path


def tiny_data(tmp_path: Path, nan: bool = False) -> Path:
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    if nan:
        x[0, 0, 0, 0] = np.nan
    path = tmp_path / ("nan.npz" if nan else "calib.npz")
    np.savez(path, x=x)
    return path


# -- names from the model are text ----------------------------------------------------------------------
# every format each command is written in (the renderers' registry), so a new format is covered too
FORMATS = {c: report.formats(f"{c.capitalize()}Result") for c in ("inspect", "fold", "stats", "check")}


@pytest.mark.parametrize("command, fmt", [(c, f) for c, formats in FORMATS.items() for f in formats])
def test_hostile_names_never_reach_the_terminal_raw(tmp_path, command, fmt):
    model = named_model(tmp_path, ESCAPE_NAME)
    args = {
        "inspect": ["inspect", model],
        "fold": ["fold", model, "--dry-run"],
        "stats": ["stats", model, "--data", tiny_data(tmp_path)],
        "check": ["check", model, "--data", tiny_data(tmp_path)],
    }[command]
    result = cli(*args, "--format", fmt)
    assert result.exit_code in (0, 1), result.stderr
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in result.stdout and raw not in result.stderr
    assert "\\x1b[31mred" in result.stdout or "\\u001b[31mred" in result.stdout


@pytest.mark.parametrize("command", ["inspect", "fold", "stats"])
def test_markup_in_names_is_shown_as_written(tmp_path, command):
    model = named_model(tmp_path, MARKUP_NAME)
    args = {"inspect": ["inspect", model], "fold": ["fold", model, "--dry-run"], "stats": ["stats", model, "--random"]}
    result = cli(*args[command])
    assert result.exit_code == 0, result.stderr
    assert MARKUP_NAME in result.stdout


def test_hostile_names_in_error_lines_are_escaped(tmp_path):
    model = tiny_bn_model()
    model.graph.node[1].name = ESCAPE_NAME
    model.graph.initializer[1].CopyFrom(init(model.graph.initializer[1].name, np.ones(3, np.float32)))
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    line = assert_input_error(cli("inspect", path), "channel")
    assert "\x1b" not in line and "\\x1b" in line


# -- broken models: exit 2 in every command -------------------------------------------------------------
def rank1_model() -> onnx.ModelProto:
    """x (4,) -> BN -> y: BN needs (N, C, ...)"""
    rng = np.random.default_rng(0)
    return make_model([bn_node("x", "y")], [vi("x", [4])], [vi("y", [4])], bn_inits(rng, 4))


def short_scale_model() -> onnx.ModelProto:
    model = tiny_bn_model()
    scale = model.graph.initializer[1]
    scale.CopyFrom(init(scale.name, np.ones(3, np.float32)))
    return model


def broken_external(tmp_path: Path, offset: str | None = None, length: str | None = None) -> Path:
    path = save_external(tiny_bn_model(), tmp_path / "ext")
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "offset" and offset is not None:
            entry.value = offset
        if entry.key == "length" and length is not None:
            entry.value = length
    path.write_bytes(model.SerializeToString())
    return path


BROKEN_MODELS = {
    "short_scale": (lambda tmp: _saved(tmp, short_scale_model()), "channel count"),
    "rank1_input": (lambda tmp: _saved(tmp, rank1_model()), "rank 1"),
    "negative_offset": (lambda tmp: broken_external(tmp, offset="-5"), "not a non-negative integer"),
    "text_offset": (lambda tmp: broken_external(tmp, offset="abc"), "not a non-negative integer"),
    "length_past_eof": (lambda tmp: broken_external(tmp, length="99999999"), "past the end"),
}


def _saved(tmp_path: Path, model: onnx.ModelProto) -> Path:
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("command", ["inspect", "check", "fold", "stats"])
@pytest.mark.parametrize("kind", list(BROKEN_MODELS))
def test_broken_model_is_an_input_error(tmp_path, kind, command):
    make, needle = BROKEN_MODELS[kind]
    model = make(tmp_path)
    args = {
        "inspect": ["inspect", model],
        "check": ["check", model],
        "fold": ["fold", model, "-o", tmp_path / "f.onnx"],
        "stats": ["stats", model, "--random"],
    }[command]
    assert_input_error(cli(*args), needle)


# -- sizes are checked before allocating ----------------------------------------------------------------
def forged_npy(path: Path, shape: tuple[int, ...]) -> Path:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + repr(shape) + ", }"
    header = header.ljust(117) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(40))
    return path


def test_npy_header_claiming_more_than_the_file_is_refused(tmp_path):
    data = forged_npy(tmp_path / "huge.npy", (10**9, 3, 32, 32))
    line = assert_input_error(cli("stats", RESNET, "--data", data), "declares shape", "TiB", "truncated")
    assert "[1000000000,3,32,32]" in line


def test_npz_member_claiming_more_than_it_holds_is_refused(tmp_path):
    import zipfile

    forged = forged_npy(tmp_path / "input.npy", (10**9, 3, 32, 32))
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.write(forged, "input.npy")
    assert_input_error(cli("stats", RESNET, "--data", tmp_path / "huge.npz"), "declares shape", "'input'")


@pytest.mark.parametrize("command", ["run", "stats", "fold"])
def test_random_data_for_a_huge_fixed_batch_is_refused_before_allocating(tmp_path, command):
    model = tiny_bn_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10**9
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 10**9
    path = _saved(tmp_path, model)
    args = {"run": ["run", path, "--runs", "1", "--warmup", "0"], "stats": ["stats", path, "-b", str(10**9)]}
    args["fold"] = ["fold", path, "--dry-run"]
    assert_input_error(cli(*args[command], "--random"), "would take", "GiB", "--batch-size")


def test_a_batch_zero_model_is_told_to_re_export_not_to_use_batch_size_zero(tmp_path):
    model = tiny_bn_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 0
    line = assert_input_error(cli("fold", _saved(tmp_path, model), "--dry-run"), "re-export")
    assert "use batch size 0" not in line


# -- options ---------------------------------------------------------------------------------------------
BAD_OPTIONS = {
    "max_layer_d_nan": (["check", RESNET, "--max-layer-d", "nan"], "--max-layer-d"),
    "old_max_d_nan": (["check", RESNET, "--max-d", "nan"], "--max-d"),
    "max_d_negative": (["stats", RESNET, "--random", "--max-d", "-1"], "--max-d"),
    "max_layer_log_r_inf": (["check", RESNET, "--max-layer-log-r", "inf"], "--max-layer-log-r"),
    "max_fraction_2": (["stats", RESNET, "--random", "--max-fraction", "2"], "--max-fraction"),
    "rtol_negative": (["fold", RESNET, "--dry-run", "--rtol", "-1"], "--rtol"),
    "atol_nan": (["run", RESNET, "--random", "--compare", RESNET, "--atol", "nan"], "--atol"),
    "layer_limit_negative": (["check", RESNET, "--layer-max-d", "stem_bn:-1"], "stem_bn:-1"),
    "layer_limit_unknown": (["stats", RESNET, "--random", "--layer-max-d", "nope:1"], "'nope'"),
    "only_and_skip": (
        ["fold", RESNET, "--dry-run", "--only", "stem_bn", "--skip", "stem_bn"],
        "both --only and --skip",
    ),
    "enable_and_disable": (["check", RESNET, "--enable", "no_bn", "--disable", "no_bn"], "both --enable and --disable"),
    "runs_zero": (["run", RESNET, "--random", "--runs", "0"], "--runs"),
    "runs_past_memory": (["run", RESNET, "--random", "--runs", "99999999999999999999"], "runs"),
    "runs_past_int64": (["run", RESNET, "--random", "--runs", "1000000000000"], "runs"),
    "max_batches_zero": (["stats", RESNET, "--random", "--max-batches", "0"], "--max-batches"),
    "missing_argument": (["fold"], "missing argument"),
    "unknown_option": (["inspect", RESNET, "--bogus"], "--bogus"),
    "not_an_integer": (["stats", RESNET, "--random", "--max-batches", "x"], "--max-batches"),
    "unknown_command": (["nosuch"], "nosuch"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_is_one_line_and_exit_2(case):
    args, needle = BAD_OPTIONS[case]
    assert_input_error(cli(*args), needle)


def test_quiet_after_the_command_works_like_before_it(tmp_path):
    model = tiny_bn_model()
    nodes = list(model.graph.node)[::-1]  # unsorted: a warning on load
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = _saved(tmp_path, model)
    assert "warning" in cli("inspect", path).stderr
    for args in (["-q", "inspect", path], ["inspect", path, "-q"], ["inspect", "-q", path]):
        result = cli(*args)
        assert result.exit_code == 0 and result.stderr == "", result.stderr


# -- config and baseline files ---------------------------------------------------------------------------
BAD_CONFIGS = {
    "tool_bnscope_number": ("pyproject.toml", "[tool]\nbnscope = 5\n", "must be a table"),
    "rule_not_boolean": ("bnscope.toml", '[rules]\nno_nonfinite = "no"\n', "true or false"),
    "max_d_nan": ("bnscope.toml", "max_layer_d = nan\n", "finite number"),
    "max_d_negative": ("bnscope.toml", "max_layer_d = -1\n", "finite number"),
    "layer_limit_text": ("bnscope.toml", '[layer_max_d]\nstem_bn = "big"\n', "finite number"),
}


def test_an_unreadable_config_is_an_input_error(tmp_path, monkeypatch):
    """chmod 000 (or EIO): was 'internal error: PermissionError' (issue 13)."""
    config = tmp_path / "bnscope.toml"
    config.write_text("max_layer_d = 5.0\n")
    read_text = Path.read_text

    def refuse(self, *args, **kwargs):
        if self == config:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    assert_input_error(cli("check", RESNET, "--config", config), "cannot read", "permission denied")


def test_a_config_that_is_a_folder_is_not_called_missing(tmp_path):
    assert_input_error(cli("check", RESNET, "--config", tmp_path), "is a folder")


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_value_is_an_input_error(tmp_path, case):
    name, text, needle = BAD_CONFIGS[case]
    (tmp_path / name).write_text(text)
    assert_input_error(cli("check", RESNET, "--config", tmp_path / name), needle)


@pytest.mark.parametrize("content", [b"{}", b"[]", b'{"kind": "bnscope-baseline", "layers": []}', b"\xff\xfe\x00"])
def test_malformed_baseline_is_an_input_error(tmp_path, content):
    (tmp_path / "b.json").write_bytes(content)
    assert_input_error(cli("check", RESNET, "--baseline", tmp_path / "b.json"), "b.json")


def test_a_check_that_checked_nothing_does_not_pass(tmp_path):
    (tmp_path / "off.toml").write_text(
        "[rules]\nno_nonfinite = false\nno_never_updated = false\nno_training_mode = false\n"
    )
    assert_input_error(cli("check", BROKEN, "--config", tmp_path / "off.toml"), "ran no rule")


def test_unknown_layer_in_a_check_config_is_warned_not_ignored(tmp_path):
    (tmp_path / "g.toml").write_text("[layer_max_d]\nnot_a_layer = 3.0\n")
    result = cli("check", RESNET, "--config", tmp_path / "g.toml")
    assert result.exit_code == 0, result.stderr
    assert "'not_a_layer'" in result.stderr and "not applied" in result.stderr


# -- silent false results ---------------------------------------------------------------------------------
def test_merge_of_shards_with_the_whole_run_is_refused(tmp_path):
    base = ["stats", RESNET, "--data", CALIB, "-b", "16"]
    assert cli(*base, "--save-moments", tmp_path / "all.npz").exit_code == 0
    for i in (1, 2):
        assert cli(*base, "--shard", f"{i}/2", "--save-moments", tmp_path / f"p{i}.npz").exit_code == 0
    assert_input_error(cli("merge", tmp_path / "p1.npz", tmp_path / "p2.npz", tmp_path / "all.npz"), "twice")
    assert cli("merge", tmp_path / "p1.npz", tmp_path / "p2.npz").exit_code == 0


@pytest.mark.parametrize("code", ["0", "None", "'done'"])
def test_a_loader_calling_sys_exit_is_an_input_error(tmp_path, code):
    (tmp_path / "exits.py").write_text(f"import sys\ndef load_data():\n    sys.exit({code})\n")
    assert_input_error(cli("stats", RESNET, "--loader", tmp_path / "exits.py"), "sys.exit")


@pytest.mark.parametrize("name", ["loader", "loader.txt"])
def test_a_loader_script_without_py_suffix_runs(tmp_path, name):
    """importlib finds no loader for such a name: that was 'internal error: AttributeError' (issue 13)."""
    (tmp_path / name).write_text(
        "import numpy as np\ndef load_data():\n    yield {'x': np.ones((2, 3, 8, 8), np.float32)}\n"
    )
    result = cli("stats", named_model(tmp_path, "bn"), "--loader", f"{tmp_path / name}:load_data")
    assert result.exit_code == 0, result.stderr


def test_fold_verification_refuses_nan_data_like_stats(tmp_path):
    model = named_model(tmp_path, "bn")
    assert_input_error(cli("fold", model, "--dry-run", "--data", tiny_data(tmp_path, nan=True)), "NaN")


def test_check_refuses_external_data_running_past_the_file(tmp_path):
    assert_input_error(cli("check", broken_external(tmp_path, length="4096")), "past the end")


@pytest.mark.parametrize("command", ["inspect", "check", "fold"])
def test_external_tensor_whose_shape_outgrows_its_length_is_an_input_error(tmp_path, command):
    """dims [4,3,1e5,1e5] with the original 'length': was 'internal error: cannot reshape' (issue 13)."""
    path = save_external(tiny_bn_model(), tmp_path / "m")
    model = onnx.load(str(path), load_external_data=False)
    weight = next(t for t in model.graph.initializer if t.name == "w")
    weight.dims[2:] = [100_000, 100_000]
    onnx.save(model, str(path))
    args = {"inspect": [], "check": [], "fold": ["--random", "-o", tmp_path / "f.onnx"]}[command]
    assert_input_error(cli(command, path, *args), "does not match its shape")


@pytest.mark.slow
def test_onnxruntime_prints_nothing_of_its_own_when_a_session_cannot_be_created(tmp_path):
    """A 480 GB weight: onnxruntime logged its own coloured '[E:onnxruntime:...]' line first (issue 13)."""
    path = save_external(tiny_bn_model(), tmp_path / "m")
    model = onnx.load(str(path), load_external_data=False)
    weight = next(t for t in model.graph.initializer if t.name == "w")
    weight.dims[2:] = [100_000, 100_000]
    del weight.external_data[2:]  # location and offset only: onnxruntime reads the declared size
    onnx.save(model, str(path))
    args = [sys.executable, "-m", "bnscope", "stats", str(path), "--random"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error:") and "\x1b" not in line


# -- output that reads well ------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [CALIB, SHIFTED])
def test_stats_table_fits_80_columns_without_breaking_words(data):
    """With the diagnosis columns too (shifted data): what does not fit goes below, one line a layer."""
    result = cli("stats", RESNET, "--data", data, env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "verdict" in result.stdout and "block2_proj_bn " in result.stdout
    assert "worst ch" in result.stdout


def test_piped_output_follows_columns():
    wide = cli("inspect", RESNET, env={"COLUMNS": "200"}).stdout
    narrow = cli("inspect", RESNET, env={"COLUMNS": "70"}).stdout
    assert max(map(len, narrow.splitlines())) <= 70 < max(map(len, wide.splitlines()))


@pytest.mark.slow
def test_onnxruntime_start_up_lines_stay_off_stderr_with_an_unwritable_home(tmp_path):
    env = {**os.environ, "HOME": "/proc/bnscope-no-home", "TMPDIR": str(tmp_path)}
    args = [sys.executable, "-m", "bnscope", "stats", str(RESNET), "--random", "--max-batches", "1", "-q"]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "onnxruntime" not in result.stderr and result.stderr == ""
    assert json.loads(subprocess.run([*args, "-f", "json"], env=env, capture_output=True, text=True).stdout)


@pytest.mark.parametrize("command", ["stats", "fold", "run"])
def test_session_errors_name_the_file_once_not_the_graph(tmp_path, command):
    """A model onnxruntime refuses (an op it lacks) is named by its path, once."""
    model = tiny_bn_model()
    model.graph.node.append(helper.make_node("NoSuchOp", ["out"], ["out2"], name="weird", domain="bnscope.test"))
    model.graph.output[0].name = "out2"
    model.opset_import.append(helper.make_opsetid("bnscope.test", 1))
    path = _saved(tmp_path, model)
    args = {"stats": ["stats", path], "fold": ["fold", path, "--dry-run"], "run": ["run", path, "--runs", "1"]}
    line = assert_input_error(cli(*args[command], "--random"), "NoSuchOp")
    assert line.count(str(path)) == 1 and "in-memory" not in line and "Load model from" not in line


@pytest.mark.parametrize("method", ["sequential", "onepass"])
def test_recalibrate_errors_name_the_input_file_not_a_working_copy(tmp_path, method):
    """Was 'onnxruntime cannot load recalibrating.onnx' / 'in-memory model' (issue 13)."""
    model = tiny_bn_model()
    var = next(i for i in model.graph.initializer if i.name == "bn_var")
    var.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(var).astype(np.int64), "bn_var"))
    path = tmp_path / "intvar.onnx"
    onnx.save(model, str(path))
    args = ["recalibrate", path, "--data", tiny_data(tmp_path), "-o", tmp_path / "r.onnx", "--method", method]
    line = assert_input_error(cli(*args), "intvar.onnx")
    assert "recalibrating" not in line and "in-memory" not in line


def test_log_lines_escape_control_characters(tmp_path):
    (tmp_path / "g.toml").write_text('[layer_max_d]\n"\\u001b[31mx\\nnext" = 3.0\n')
    result = cli("check", RESNET, "--config", tmp_path / "g.toml")
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_log_handler_writes_one_escaped_line(capsys):
    import logging

    from bnscope.cli import app as cli_module

    cli_module.setup_logging(logging.WARNING)
    logging.getLogger("bnscope.test").warning("layer %s\nis odd", "\x1b]0;title\x07")
    err = capsys.readouterr().err
    assert err.splitlines() == ["warning: layer \\x1b]0;title\\x07 is odd"]


@pytest.mark.parametrize("role", ["model", "data", "baseline", "eval_data", "compare"])
def test_an_input_that_is_a_fifo_or_device_is_refused_not_read(tmp_path, role):
    """Reading a FIFO blocks until a writer comes; /dev/zero never ends: both are refused unread."""
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    args = {
        "model": ["inspect", fifo],
        "data": ["stats", RESNET, "--data", fifo],
        "baseline": ["check", RESNET, "--baseline", fifo],
        "eval_data": ["recalibrate", RESNET, "--data", CALIB, "-o", tmp_path / "r.onnx", "--eval-data", fifo],
        "compare": ["run", RESNET, "--random", "--compare", fifo],
    }[role]
    assert_input_error(cli(*args), "FIFO", "not a regular file")
    assert_input_error(cli("inspect", "/dev/zero"), "device")


@pytest.mark.parametrize("command", ["stats", "check"])
def test_hostile_names_in_the_html_report_are_escaped(tmp_path, command):
    """A \\u202e in a layer name would reverse the text around it in a browser (issue 13)."""
    model = named_model(tmp_path, ESCAPE_NAME)
    result = cli(command, model, "--data", tiny_data(tmp_path), "--html", tmp_path / "r.html")
    assert result.exit_code in (0, 1), result.stderr
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in page
    assert "\\x1b[31mred" in page
