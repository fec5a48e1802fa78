"""The error types the library raises and the exit codes the CLI maps them to."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes, stable for CI use."""

    OK = 0
    CHECK_FAILED = 1
    USAGE = 2
    INTERNAL = 3


class BnscopeError(Exception):
    """A user or input error: bad file, wrong shape, unsupported model. Exit code 2.

    The message is one line: what is wrong, then "Hint: what to do".
    """

    exit_code = ExitCode.USAGE


class CheckFailed(BnscopeError):
    """A check the user asked for did not pass (CI gate). Exit code 1."""

    exit_code = ExitCode.CHECK_FAILED
