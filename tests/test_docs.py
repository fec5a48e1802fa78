"""Every example in README.md and docs/*.md is what the tool prints, so they cannot drift again.

A ```console block holds one or more commands, each a line ``$ bnscope ARGS...`` followed by what it
printed on stdout. Each block is rerun in its own folder (the repository's top-level entries linked into
it, so the commands read as if run from the repository root and their outputs land in the folder), its
commands in order, in process (typer's CliRunner) at a pinned width (``COLUMNS``), and stdout is compared with the
block: a ``...`` matches anything (doctest's ELLIPSIS), so timings and machine-dependent values are
written as ``...``; trailing spaces are ignored. A ```python block is executed the same way.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
WIDTH = "120"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    kind: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(kind: str) -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match[1] == kind:
                found.append(Block(path, text.count("\n", 0, match.start()) + 1, kind, match[2]))
    return found


def commands(block: Block) -> list[tuple[list[str], str]]:
    """(argv after ``bnscope``, expected stdout) for each ``$ bnscope`` line of a console block; a
    line ending in ``\\`` continues on the next."""
    lines = block.text.splitlines()
    assert lines and lines[0].startswith("$ bnscope "), f"{block.id}: a console block starts with '$ bnscope '"
    out: list[tuple[list[str], str]] = []
    i = 0
    while i < len(lines):
        command = lines[i][2:]
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + " " + lines[i].strip()
        argv = shlex.split(command)
        assert argv[0] == "bnscope", f"{block.id}: only bnscope commands run here: {command}"
        i += 1
        start = i
        while i < len(lines) and not lines[i].startswith("$ "):
            i += 1
        out.append((argv[1:], "\n".join(lines[start:i])))
    return out


def same(expected: str, got: str) -> bool:
    def norm(text: str) -> str:
        return "\n".join(line.rstrip() for line in text.rstrip().splitlines()) + "\n"

    return doctest.OutputChecker().check_output(norm(expected), norm(got), doctest.ELLIPSIS)


@pytest.fixture
def in_folder(tmp_path, monkeypatch):
    """A folder that reads like the repository root (each top-level entry linked into it), where the
    examples' outputs land instead of in the repository."""
    for entry in ROOT.iterdir():
        if not entry.name.startswith("."):
            (tmp_path / entry.name).symlink_to(entry)
    monkeypatch.chdir(tmp_path)
    return tmp_path


CONSOLE = blocks("console")
PYTHON = blocks("python")


def test_the_docs_have_examples():
    assert len(CONSOLE) >= 8 and PYTHON
    readme = [b for b in CONSOLE if b.path.name == "README.md"]
    shown = {argv[0] for b in readme for argv, _ in commands(b)}
    assert shown >= {"inspect", "stats", "fold", "run", "check", "recalibrate", "merge", "providers"}


@pytest.mark.parametrize("block", CONSOLE, ids=[b.id for b in CONSOLE])
def test_console_example(block, in_folder):
    for argv, expected in commands(block):
        result = cli(*argv, env={"COLUMNS": WIDTH})
        assert result.exit_code in (0, 1), f"{block.id}: bnscope {shlex.join(argv)}: {result.stderr}"
        assert same(expected, result.stdout), (
            f"{block.id}: bnscope {shlex.join(argv)} printed\n{result.stdout}\ninstead of\n{expected}"
        )


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_example(block, in_folder):
    """The block runs; a top-level ``print(...)  # TEXT`` must print TEXT."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block.text, block.id, "exec"), {"__name__": "__docs__"})
    expected = [m[1] for m in re.finditer(r"^print\(.*\)  # (.*)$", block.text, re.M)]
    if expected:
        assert printed.getvalue().splitlines() == expected, block.id


def test_ellipsis_matches_only_where_written():
    assert same("a ... c\n...\nend", "a b c\nx\ny\nend")
    assert not same("a ... c\nend", "a b c\nother")
    assert not same("max|d| 1.513", "max|d| 1.514")


# Written on other branches at the same time (quantize, distributed statistics, fold); linked from the
# README already.
PENDING = {"docs/quantize.md", "docs/distributed.md", "docs/fold.md"}


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as dashes."""
    headings = re.findall(r"^#+ (.*)$", path.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_links_resolve(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
        if re.match(r"\w+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if str(path.relative_to(ROOT)) in PENDING and not path.exists():
            continue
        assert path.exists(), f"{doc.name}: {target}"
        if anchor:
            assert anchor in anchors(path), f"{doc.name}: {target}"


def test_release_tag_is_the_version():
    """The README and the pre-commit recipe name the release tag of this version (v + __version__)."""
    import bnscope

    tag = f"v{bnscope.__version__}"
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / "docs" / "ci.md").read_text()
    assert re.findall(r"git checkout (v[\w.]+)", readme) == [tag]
    assert set(re.findall(r"rev: (\S+)", ci)) == {tag}
