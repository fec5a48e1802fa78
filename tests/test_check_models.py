"""``bnscope check MODEL...``: several models in one process, one result per model, and the pre-commit
hook (which passes every staged ``.onnx`` file) run the way pre-commit runs it.

The expected verdicts come from the sample models' planted defects (``broken.onnx`` has a NaN variance
and a never-updated layer; ``resnet_small.onnx`` has none) and from checking each model on its own.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import BROKEN, RESNET, SAMPLES, cli

ROOT = Path(__file__).resolve().parents[1]
MLP = SAMPLES / "mlp.onnx"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no bnscope.toml / pyproject.toml of the repository is read
    return tmp_path


def single(model: Path) -> dict:
    result = cli("check", model, "--format", "json")
    assert result.exit_code in (0, 1), result.stderr
    return json.loads(result.stdout)


def test_two_models_one_result_each_and_exit_1_when_one_fails(in_tmp):
    result = cli("check", RESNET, BROKEN, "--format", "json")
    assert result.exit_code == 1, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1 and doc["passed"] is False
    assert [m["model"] for m in doc["models"]] == [str(RESNET), str(BROKEN)]
    assert doc["failed"] == [str(BROKEN)]
    assert doc["models"] == [single(RESNET), single(BROKEN)]
    assert [m["passed"] for m in doc["models"]] == [True, False]


def test_models_that_all_pass_exit_0(in_tmp):
    result = cli("check", RESNET, MLP, "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["passed"] is True and doc["failed"] == [] and len(doc["models"]) == 2


def test_one_model_keeps_the_single_document(in_tmp):
    doc = single(BROKEN)
    assert "models" not in doc and doc["model"] == str(BROKEN) and doc["passed"] is False


def test_table_has_a_table_per_model_and_a_count(in_tmp):
    result = cli("check", BROKEN, RESNET)
    assert result.exit_code == 1
    assert result.stdout.count("FAILED: 10/12 checks passed") == 1
    assert result.stdout.count("PASSED: 18/18 checks passed") == 1
    assert result.stdout.rstrip().splitlines()[-1] == f"FAILED: 1 of 2 models failed ({BROKEN})"


def test_junit_has_one_suite_per_model(in_tmp):
    result = cli("check", BROKEN, RESNET, "--format", "junit")
    assert result.exit_code == 1
    root = ET.fromstring(result.stdout)
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == [f"bnscope check {BROKEN}", f"bnscope check {RESNET}"]
    assert [int(s.get("failures")) for s in suites] == [2, 0]
    assert int(root.get("failures")) == 2
    assert int(root.get("tests")) == sum(len(s.findall("testcase")) for s in suites)


def test_markdown_has_one_section_per_model(in_tmp):
    result = cli("check", BROKEN, RESNET, "--format", "markdown")
    assert result.exit_code == 1
    headings = [line for line in result.stdout.splitlines() if line.startswith("## ")]
    assert headings == [f"## :x: bnscope check `{BROKEN}`", f"## :white_check_mark: bnscope check `{RESNET}`"]


@pytest.mark.parametrize("bad", ["missing.onnx", "corrupt.onnx"])
def test_a_bad_model_among_several_is_an_input_error_naming_it(in_tmp, bad):
    (in_tmp / "corrupt.onnx").write_bytes(b"not a protobuf at all")
    result = cli("check", RESNET, bad, BROKEN)
    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error:") and bad in line and "Hint" in line


@pytest.mark.parametrize("option", ["--baseline", "--save-baseline", "--html"])
def test_one_model_options_refuse_several_models(in_tmp, option):
    result = cli("check", RESNET, MLP, option, in_tmp / "x.out")
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert option in line and "2 models" in line and f"{option} describes one model" in line
    assert not (in_tmp / "x.out").exists()


def hook_fields(text: str) -> dict[str, str]:
    """The one hook's ``key: value`` lines (the file is that flat; no YAML library in the test extras)."""
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert sum(line.startswith("- ") for line in lines) == 1, "one hook"
    return dict(line.lstrip("- ").strip().split(": ", 1) for line in lines)


def hook_command(files: list[Path]) -> list[str]:
    """The hook's entry with the file names appended, as pre-commit runs it; ``bnscope`` is the
    console script when installed, else this interpreter's ``python -m bnscope``."""
    hook = hook_fields((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert hook["pass_filenames"] == "true" and hook["files"] == r"\.onnx$"
    program, *args = shlex.split(hook["entry"])
    assert program == "bnscope"
    launcher = [shutil.which("bnscope")] if shutil.which("bnscope") else [sys.executable, "-m", "bnscope"]
    return [*launcher, *args, *map(str, files)]


def run_hook(files: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    return subprocess.run(hook_command(files), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # fresh bnscope processes, as pre-commit starts them
def test_pre_commit_hook_with_two_files(in_tmp):
    for model in (RESNET, MLP, BROKEN):
        shutil.copy(model, in_tmp / model.name)
    good = run_hook([Path("resnet_small.onnx"), Path("mlp.onnx")], in_tmp)
    assert good.returncode == 0, good.stderr
    assert good.stdout.count("PASSED: ") == 3  # two models, then the count
    bad = run_hook([Path("resnet_small.onnx"), Path("broken.onnx")], in_tmp)
    assert bad.returncode == 1, bad.stderr
    assert "FAILED: 1 of 2 models failed (broken.onnx)" in bad.stdout


@pytest.mark.parametrize("fmt", ["table", "markdown", "junit"])
def test_several_models_keep_names_with_newlines_on_their_line(in_tmp, fmt):
    """As for one model (test_safety_names): a path or name with a line break is written as ``\\n``."""
    forged = in_tmp / "m\nFORGED: passed.onnx"
    shutil.copy(MLP, forged)
    result = cli("check", forged, RESNET, "--format", fmt)
    assert result.exit_code == 0, result.stderr
    assert not any(line.lstrip(' "|`#>-').startswith("FORGED") for line in result.stdout.splitlines())
    assert "m\\nFORGED: passed.onnx" in result.stdout
