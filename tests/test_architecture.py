"""The architecture is checked, not described: import contracts (import-linter) and lint (ruff).

The contracts live in pyproject.toml: the layers (cli -> report -> workflows -> fold|stats ->
runtime|data -> onnxio -> numerics), numerics importing only numpy, typer only in cli, the
library never importing report, and fold's own layers (rewrite -> patterns -> into_previous|into_next
-> variants -> linear_op -> edits -> plan|layout). Both tools come with the test extras.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 330  # "about 300": a module past this is two modules


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


def test_import_contracts_hold():
    tool = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert tool, "import-linter is missing: pip install '.[test]'"
    result = _run(tool)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "broken" in result.stdout and " 0 broken" in result.stdout


def test_ruff_lint_is_clean():
    result = _run(sys.executable, "-m", "ruff", "check", "bnscope", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_ruff_format_is_clean():
    result = _run(sys.executable, "-m", "ruff", "format", "--check", "bnscope", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.parametrize("path", sorted((ROOT / "bnscope").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_size(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines: split it by job"


def test_cli_start_up_imports_only_what_the_command_needs():
    # The command registry loads each command's module; the package's public API is imported on
    # first use, so `bnscope stats` never pays for the fold machinery (start-up is part of its cost).
    code = "import sys, bnscope.cli.main; print(sorted(m for m in sys.modules if m.startswith(('bnscope.fold', 'bnscope.workflows.fold', 'bnscope.workflows.run'))))"
    result = _run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_public_api_names_all_resolve():
    import bnscope

    for name in bnscope.__all__:
        assert getattr(bnscope, name) is not None, name
    assert set(bnscope.__all__) <= set(dir(bnscope))
    with pytest.raises(AttributeError):
        bnscope.no_such_name  # noqa: B018
