"""Nothing lost, nothing injected (issue 13): every path bnscope writes follows one rule.

An output is never an input of the run (model, its external data, data, loader, config, baseline;
also through a symlink or a hard link), never a device, FIFO or folder, and lies in a folder this
process can write; nothing but the outputs and the system temp folder is written, and an
interrupted run (SIGTERM; SIGKILL) leaves nothing that looks like a finished output.
Each refusal: exit 2, one line on stderr, every input byte for byte as before.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import tiny_bn_model
from helpers import RESNET, SHIFTED, assert_input_error, cli, listing, save_external
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TINY_CALIB = {"x": np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)}


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (not following links) -> its sha256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def run_inputs(tmp_path: Path) -> dict[str, Path]:
    """A model with external data, its data, a loader script, a config and a baseline, in tmp_path/in."""
    folder = tmp_path / "in"
    model = save_external(tiny_bn_model(), folder)
    np.savez(folder / "calib.npz", **TINY_CALIB)
    (folder / "loader.py").write_text(
        "import numpy as np\ndef load_data():\n    yield {'x': np.ones((2, 3, 8, 8), np.float32)}\n"
    )
    (folder / "gate.toml").write_text("max_layer_d = 5.0\n")
    np.savez(folder / "eval.npz", **TINY_CALIB, labels=np.arange(8) % 3)
    assert cli("check", model, "--save-baseline", folder / "base.json").exit_code == 0
    return {
        "model": model,
        "weights": folder / "weights.bin",
        "data": folder / "calib.npz",
        "loader": folder / "loader.py",
        "config": folder / "gate.toml",
        "baseline": folder / "base.json",
        "eval": folder / "eval.npz",
    }


# Each command with each output option it has; {out} is the path under test.
WRITERS = {
    "fold -o": ["fold", "{model}", "--data", "{data}", "-o", "{out}"],
    "recalibrate -o": ["recalibrate", "{model}", "--data", "{data}", "-o", "{out}"],
    "recalibrate -o --eval-data": [
        "recalibrate",
        "{model}",
        "--data",
        "{data}",
        "--eval-data",
        "{eval}",
        "-o",
        "{out}",
    ],
    "stats --save-moments": ["stats", "{model}", "--data", "{data}", "--save-moments", "{out}"],
    "stats --html": ["stats", "{model}", "--data", "{data}", "--html", "{out}"],
    "check --save-baseline": [
        "check",
        "{model}",
        "--data",
        "{data}",
        "--config",
        "{config}",
        "--baseline",
        "{baseline}",
        "--save-baseline",
        "{out}",
    ],  # fmt: skip
    "check --html": ["check", "{model}", "--loader", "{loader}", "--config", "{config}", "--html", "{out}"],
}


def writer_args(writer: str, inputs: dict[str, Path], out: Path) -> list[str]:
    values = {**{k: str(v) for k, v in inputs.items()}, "out": str(out)}
    return [a.format(**values) for a in WRITERS[writer]]


READS = {writer: {"model", "weights", *(k for k in ("data", "config", "baseline", "loader", "eval") if f"{{{k}}}" in args)}
         for writer, args in WRITERS.items()}  # fmt: skip


@pytest.mark.parametrize("writer, target", [(w, t) for w, targets in READS.items() for t in sorted(targets)])
def test_output_naming_an_input_is_refused_and_changes_nothing(run_inputs, writer, target, tmp_path):
    args = writer_args(writer, run_inputs, run_inputs[target])
    before = digest(tmp_path)
    line = assert_input_error(cli(*args))
    assert "of this run" in line or "refusing to overwrite" in line
    assert digest(tmp_path) == before


@pytest.mark.parametrize("how", ["symlink", "hardlink"])
@pytest.mark.parametrize("writer", ["fold -o", "stats --html", "check --save-baseline"])
def test_output_reaching_an_input_through_a_link_is_refused(run_inputs, writer, how, tmp_path):
    link = tmp_path / "alias.onnx"
    if how == "symlink":
        link.symlink_to(run_inputs["model"])
    else:
        os.link(run_inputs["model"], link)
    before = digest(tmp_path / "in")
    assert_input_error(cli(*writer_args(writer, run_inputs, link)))
    assert digest(tmp_path / "in") == before


def test_fold_output_whose_data_file_is_the_models_data_is_refused(tmp_path):
    """-o x.onnx also writes x.onnx.data: it must not be the input's external data file."""
    model = save_external(tiny_bn_model(), tmp_path / "m", location="out.onnx.data")
    before = digest(tmp_path)
    assert_input_error(cli("fold", model, "-o", tmp_path / "m" / "out.onnx"), "data file")
    assert digest(tmp_path) == before


def test_output_inside_the_data_folder_is_refused(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.zeros((4, 3, 32, 32), np.float32))
    assert_input_error(cli("stats", RESNET, "--data", folder, "--save-moments", folder / "m.npz"), "inside")


@pytest.mark.parametrize("kind", ["device", "fifo", "folder"])
@pytest.mark.parametrize("option", ["-o", "--html"])
def test_special_files_are_never_replaced(tmp_path, kind, option):
    target = {"device": Path("/dev/null"), "fifo": tmp_path / "fifo", "folder": tmp_path / "dir"}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    args = ["fold", RESNET, "-o", target] if option == "-o" else ["stats", RESNET, "--random", "--html", target]
    line = assert_input_error(cli(*args), "not a regular file")
    assert {"device": "device", "fifo": "FIFO", "folder": "folder"}[kind] in line
    assert target.exists() and not target.is_file()


@pytest.mark.parametrize("option", ["-o", "--html", "--save-moments", "--save-baseline"])
def test_output_where_no_file_can_be_created_is_refused_before_work(tmp_path, option):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target, needle in ((Path("/proc/bnscope.out"), "cannot create files"), (blocker / "x.out", "not a folder")):
        args = {
            "-o": ["fold", RESNET, "-o", target],
            "--html": ["stats", RESNET, "--random", "--html", target],
            "--save-moments": ["stats", RESNET, "--random", "--save-moments", target],
            "--save-baseline": ["check", RESNET, "--save-baseline", target],
        }[option]
        assert_input_error(cli(*args), needle)


@pytest.mark.parametrize("option", ["-o", "--save-moments", "--html", "--save-baseline"])
@pytest.mark.parametrize("target", ["a regular file", "/proc/self/fd/1"])
def test_an_output_that_is_a_symlink_is_refused_not_replaced(tmp_path, option, target):
    """Writers rename over the path: `--html /dev/stdout` made the system's /dev/stdout a file (issue 13)."""
    model = tmp_path / "m.onnx"
    onnx.save(tiny_bn_model(), str(model))
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(elsewhere if target == "a regular file" else target)
    command = {"-o": ["fold", model, "--random"], "--save-baseline": ["check", model]}.get(option)
    result = cli(*(command or ["stats", model, "--random"]), option, link)
    assert_input_error(result, "symbolic link")
    assert link.is_symlink() and elsewhere.read_text() == "keep"


def test_two_outputs_naming_one_file_are_refused(tmp_path):
    out = tmp_path / "r.out"
    assert_input_error(cli("stats", RESNET, "--random", "--html", out, "--save-moments", out), "both name")


def test_missing_output_folders_are_created_and_existing_outputs_replaced(tmp_path):
    out = tmp_path / "new" / "deeper" / "report.html"
    assert cli("stats", RESNET, "--random", "--max-batches", "1", "--html", out).exit_code == 0
    out.write_text("old")
    assert cli("stats", RESNET, "--random", "--max-batches", "1", "--html", out).exit_code == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert listing(out.parent) == ["report.html"]


@pytest.mark.parametrize("command", ["stats", "check", "recalibrate"])
def test_nothing_is_written_beside_an_external_data_model(tmp_path, command):
    """stats, check --data and recalibrate read external data in place (no instrumented copy)."""
    model = save_external(tiny_bn_model(), tmp_path / "m")
    np.savez(tmp_path / "calib.npz", **TINY_CALIB)
    before = digest(tmp_path / "m")
    extra = ["-o", tmp_path / "out.onnx"] if command == "recalibrate" else []
    result = cli(command, model, "--data", tmp_path / "calib.npz", *extra)
    assert result.exit_code in (0, 1), result.stderr
    assert digest(tmp_path / "m") == before
    assert listing(tmp_path / "m") == ["model.onnx", "weights.bin"]


def test_fold_writes_only_its_output_and_stages_in_the_temp_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    model = save_external(tiny_bn_model(), tmp_path / "m")
    assert cli("fold", model, "-o", tmp_path / "out" / "f.onnx").exit_code == 0
    assert listing(tmp_path / "out") == ["f.onnx", "f.onnx.data"]
    assert listing(tmp_path / "m") == ["model.onnx", "weights.bin"]
    assert staging(tmp_path / "tmp") == []


def staging(folder: Path) -> list[str]:
    """bnscope's entries in a temp folder (onnxruntime keeps a '.ses' file of its own there)."""
    return [name for name in listing(folder) if "bnscope" in name]


# -- interrupted runs ---------------------------------------------------------------------------------
SLOW_LOADER = """
import time
import numpy as np
import onnx
from pathlib import Path
def load_data():
    Path(__file__).with_name("started").write_text("1")
    time.sleep(60)
    yield {"x": np.ones((8, 3, 32, 32), np.float32)}
"""


def start_slow_fold(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """``bnscope fold`` held inside its verification (the loader sleeps) with its staging made."""
    for name in ("tmp", "out"):
        (tmp_path / name).mkdir()
    (tmp_path / "slow.py").write_text(SLOW_LOADER)
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    args = ["fold", str(RESNET), "--loader", str(tmp_path / "slow.py"), "-o", str(tmp_path / "out" / "f.onnx")]
    process = subprocess.Popen(
        [sys.executable, "-m", "bnscope", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    assert staging(tmp_path / "tmp"), "the fold should be staging by now"
    return process, tmp_path / "out"


@pytest.mark.slow
def test_sigterm_cleans_up_staging_like_ctrl_c(tmp_path):
    process, out = start_slow_fold(tmp_path)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip() == "terminated"
    assert staging(tmp_path / "tmp") == [] and listing(out) == []


@pytest.mark.slow
def test_sigkill_leaves_nothing_that_looks_like_an_output(tmp_path):
    process, out = start_slow_fold(tmp_path)
    process.kill()
    process.communicate(timeout=60)
    assert listing(out) == []  # staging lies in the temp folder, under a temporary name
    assert all(name.startswith("bnscope-fold-") for name in staging(tmp_path / "tmp"))


# -- the property: no command ever changes a file it was given as input ---------------------------------
OUTPUT_CHOICES = ["model", "weights", "data", "config", "baseline", "loader", "eval", "fresh", "alias", "long", "slash"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writer=st.sampled_from(list(WRITERS)), target=st.sampled_from(OUTPUT_CHOICES))
def test_no_command_changes_an_input(run_inputs, tmp_path, writer, target):
    """Whatever output path a command is given, every file it reads keeps its bytes."""
    alias = tmp_path / "alias"
    if not alias.exists():
        alias.symlink_to(run_inputs["data"])
    named = {"fresh": tmp_path / "fresh.out", "alias": alias, "long": tmp_path / ("a" * 255), "slash": f"{tmp_path}/d/"}
    out = named.get(target) or run_inputs[target]
    args = writer_args(writer, run_inputs, out)
    restore(tmp_path / "pristine", tmp_path / "in")
    given = [p for k, p in run_inputs.items() if k in READS[writer]]
    before = {p: p.read_bytes() for p in given}
    result = cli(*args)
    assert result.exit_code in (0, 1, 2), result.stderr
    assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in given} == before
    if result.exit_code == 2:
        assert len(result.stderr.strip().splitlines()) == 1
    restore(tmp_path / "pristine", tmp_path / "in")  # files this example may have written as outputs
    (tmp_path / "fresh.out").unlink(missing_ok=True)
    (tmp_path / ("a" * 255)).unlink(missing_ok=True)
    assert not (tmp_path / "d").exists()  # "-o d/" names a folder: nothing is written as "d"


def restore(pristine: Path, folder: Path) -> None:
    """``folder`` as it was when ``pristine`` was copied from it (copied on the first call)."""
    if not pristine.exists():
        shutil.copytree(folder, pristine)
    for path in folder.iterdir():
        if not (pristine / path.name).exists():
            path.unlink()
    for path in pristine.iterdir():
        if (folder / path.name).read_bytes() != path.read_bytes():
            shutil.copyfile(path, folder / path.name)


def test_a_write_that_fails_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """Disk full while writing: the environment's fault, exit 2 (not an internal error)."""

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    result = cli("stats", RESNET, "--random", "--max-batches", "1", "--html", tmp_path / "r.html")
    assert result.exit_code == 2  # the table was already on stdout: the report is written after it
    assert result.stderr.strip().splitlines() == [
        f"error: cannot write the HTML report {tmp_path / 'r.html'} (No space left on device). "
        "Hint: check free space and permissions, or choose another path"
    ]
    assert listing(tmp_path) == []


def test_external_data_read_in_place_gives_the_inline_statistics_and_leaves_nothing(tmp_path, monkeypatch):
    """Whichever way this build takes (the folder option, or on onnxruntime 1.19 a linked copy in the
    temp folder: the .ci oldest leg runs that one), the statistics equal the inline model's and no
    file is left beside the model or in the temp folder."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)
    model = save_external(tiny_bn_model(), tmp_path / "m")
    np.savez(tmp_path / "calib.npz", **TINY_CALIB)
    result = cli("stats", model, "--data", tmp_path / "calib.npz", "--per-channel", "-f", "json")
    assert result.exit_code == 0, result.stderr
    inline = tmp_path / "inline.onnx"
    onnx.save(tiny_bn_model(), str(inline))
    expected = cli("stats", inline, "--data", tmp_path / "calib.npz", "--per-channel", "-f", "json")
    layers = [json.loads(r.stdout)["layers"][0] for r in (result, expected)]
    np.testing.assert_allclose(layers[0]["batch_mean"], layers[1]["batch_mean"], rtol=1e-12)
    assert listing(tmp_path / "m") == ["model.onnx", "weights.bin"]
    assert staging(tmp_path / "tmp") == []


def test_the_external_data_probe_answers_for_this_build():
    from bnscope.runtime.external import bytes_models_read_a_given_folder

    assert isinstance(bytes_models_read_a_given_folder(), bool)


@pytest.mark.slow
def test_a_reader_that_closes_stdout_ends_the_run_quietly():
    # bnscope stats ... | head -1: the reader goes away mid-table. Exit as a process killed by SIGPIPE
    # (141, like cat or grep) with nothing on stderr; it is not a loader calling sys.exit (exit 2).
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before bnscope writes
    with os.fdopen(writer, "wb") as out:
        process = subprocess.run(
            [sys.executable, "-m", "bnscope", "stats", str(RESNET), "--data", str(SHIFTED)],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert process.returncode == 128 + signal.SIGPIPE, process.stderr
    assert process.stderr == ""


@pytest.mark.parametrize("command", ["fold", "recalibrate"])
def test_force_never_lets_an_output_replace_the_models_external_data(tmp_path, command):
    """--force allows replacing the model itself, not its weights file (issue 13)."""
    model = save_external(tiny_bn_model(), tmp_path / "m")
    np.savez(tmp_path / "calib.npz", **TINY_CALIB)
    before = digest(tmp_path / "m")
    args = [command, model, "--data", tmp_path / "calib.npz", "--force", "-o", tmp_path / "m" / "weights.bin"]
    assert_input_error(cli(*args), "external data")
    assert digest(tmp_path / "m") == before


def test_force_onto_the_model_may_replace_its_own_data_file(tmp_path):
    """fold --force -o model.onnx of a model whose data is model.onnx.data replaces both."""
    model = save_external(tiny_bn_model(), tmp_path / "m", location="model.onnx.data")
    assert cli("fold", model, "--random", "--force", "-o", model).exit_code == 0
    assert cli("inspect", model).exit_code == 0
