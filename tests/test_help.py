"""``--help`` reads like a man page: the usage line names the arguments (MODEL, not ``{model}``),
placeholders say what to write (no ``<list[str]>`` or ``<int range>``), required options are marked,
and ``bnscope --help`` shows each command's whole summary (the docstring's first paragraph), not a
line cut with "...". Each help is rendered as a user sees it (typer's CliRunner, pinned width).
"""

from __future__ import annotations

import re

import pytest
import typer
from helpers import cli

from bnscope.cli.main import COMMANDS, app

NAMES = [c.__name__ for c in COMMANDS]
USAGE = {
    "inspect": "MODEL",
    "stats": "MODEL",
    "merge": "MOMENTS...",
    "fold": "MODEL",
    "quantize": "MODEL",
    "run": "MODEL",
    "recalibrate": "MODEL",
    "check": "MODEL...",
    "providers": "",
}


def help_text(*command: str, width: int = 100) -> str:
    result = cli(*command, "--help", env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.stderr
    return result.stdout


def placeholder(row: str) -> str:
    """The placeholder of an option's row ("" for a flag): what follows the names before the help."""
    first = row.split("\n", 1)[0]
    return "" if first.startswith("  ") or not first.strip() else re.split(r"\s{2,}", first.strip())[0]


def option_rows(text: str) -> dict[str, str]:
    """``--long`` -> the text after the option names (placeholder, help), one entry per option; the
    first line of the row stays on its own line."""
    options = text.split("\nOptions:\n", 1)[1]
    rows: dict[str, str] = {}
    last = None
    for line in options.splitlines():
        match = re.match(r"^  (-\w, )?(--[\w-]+)(?: / --[\w-]+)?(.*)$", line)
        if match:
            last = match[2]
            rows[last] = match[3]
        elif last and line.strip():
            rows[last] += "\n" + line.strip()
    return rows


def test_every_command_is_covered():
    assert sorted(NAMES) == sorted(USAGE)


@pytest.mark.parametrize("name", NAMES)
def test_usage_line_names_the_arguments(name):
    first = help_text(name).splitlines()[0]
    assert first == f"Usage: bnscope {name} [OPTIONS] {USAGE[name]}".rstrip()


@pytest.mark.parametrize("name", NAMES)
def test_placeholders_say_what_to_write(name):
    text = help_text(name)
    assert "{" not in text.splitlines()[0]
    assert not re.search(r"<(list\[|\w+ range|str|int|float|path|\w+\|)", text), text
    for option, row in option_rows(text).items():
        value = placeholder(row)
        if value:  # flags have none; every value option names its value
            assert re.fullmatch(r"[A-Z][A-Z0-9_.:=/\[\]]*|[a-z0-9_]+(\|[a-z0-9_]+)+", value), (option, value)


@pytest.mark.parametrize("name", NAMES)
def test_value_options_have_a_placeholder(name):
    command = typer.main.get_command(app).commands[name]
    flags = {"--help"} | {max(p.opts, key=len) for p in command.params if getattr(p, "is_flag", False)}
    for option, row in option_rows(help_text(name)).items():
        assert bool(placeholder(row)) == (option not in flags), (option, row)


def test_required_options_are_marked():
    fold = option_rows(help_text("fold"))
    assert placeholder(fold["--output"]) == "OUT"
    assert "[required unless --dry-run]" in " ".join(fold["--output"].split())
    assert "[required]" in option_rows(help_text("recalibrate"))["--output"]


def test_run_data_is_not_calibration_data():
    data = " ".join(option_rows(help_text("run"))["--data"].split())
    assert "Calibration" not in data and "Input data" in data
    assert "Calibration data" in " ".join(option_rows(help_text("stats"))["--data"].split())


@pytest.mark.parametrize("width", [80, 100])
def test_command_list_shows_whole_summaries(width):
    text = help_text(width=width)
    commands = text.split("\nCommands:\n", 1)[1]
    summaries: dict[str, str] = {}
    last = None
    for line in commands.splitlines():
        match = re.match(r"^  (\w+)\s+(.*)$", line)
        if match and match[1] in NAMES:
            last = match[1]
            summaries[last] = match[2]
        elif last:
            summaries[last] += " " + line.strip()
    assert sorted(summaries) == sorted(NAMES)
    for command in COMMANDS:
        first_paragraph = " ".join(command.__doc__.split("\n\n")[0].split())
        assert summaries[command.__name__] == first_paragraph
        assert not summaries[command.__name__].endswith(("...", "…"))
