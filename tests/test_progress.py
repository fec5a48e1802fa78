"""Progress on stderr: a rich bar on a terminal (run under a pseudo-terminal, as a user sees it), and
plain lines in a log (CI), throttled so that short runs print none.
"""

from __future__ import annotations

import logging
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from bnscope.cli.commands.stats import progress_lines

ROOT = Path(__file__).resolve().parents[1]


def _run_on_a_terminal(*args: str) -> tuple[int, str]:
    """Runs ``python -m bnscope ARGS`` with stderr on a pseudo-terminal; returns its exit code and that text."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "bnscope", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal (POSIX)")
@pytest.mark.slow
def test_progress_bar_on_a_terminal_draws_no_markup():
    code, text = _run_on_a_terminal(
        "stats", "sample_models/resnet_small.onnx", "--random", "--max-batches", "40", "-b", "2"
    )
    assert code == 0, text
    assert "batches" in text, text
    assert "[progress" not in text and "[/" not in text, text


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def warnings_shown():
    logger = logging.getLogger("bnscope")
    previous = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(previous)


def test_progress_lines_every_tenth_once_time_has_passed(capsys, warnings_shown):
    clock = FakeClock()
    update = progress_lines(every_s=5.0, clock=clock)
    for done in range(1, 101):
        clock.now += 1.0  # one second a batch: every tenth (10 batches) is past the 5 s spacing
        update(done, 100)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"progress: batches {n}/100" for n in range(10, 101, 10)]


def test_progress_lines_stay_silent_on_a_short_run(capsys, warnings_shown):
    clock = FakeClock()
    update = progress_lines(every_s=5.0, clock=clock)
    for done in range(1, 101):
        clock.now += 0.01
        update(done, 100)
    assert capsys.readouterr().err == ""


def test_progress_lines_with_an_unknown_total_every_fiftieth(capsys, warnings_shown):
    clock = FakeClock()
    update = progress_lines(every_s=0.0, clock=clock)
    for done in range(1, 121):
        update(done, None)
    assert capsys.readouterr().err.splitlines() == ["progress: batches 50/?", "progress: batches 100/?"]


def test_progress_lines_quiet_prints_nothing(capsys):
    logger = logging.getLogger("bnscope")
    previous = logger.level
    logger.setLevel(logging.ERROR)  # -q
    try:
        update = progress_lines(every_s=0.0, clock=FakeClock())
        for done in range(1, 11):
            update(done, 10)
    finally:
        logger.setLevel(previous)
    assert capsys.readouterr().err == ""
