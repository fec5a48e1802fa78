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
    """A check the user asked for did not pass (CI gate). Exit code 1.

    Public API for code built on bnscope (pipelines, ``--loader`` scripts) that gates in Python:
    ``if not result.passed: raise CheckFailed("...")``; the CLI's error boundary turns it into one
    stderr line and exit 1. bnscope's own commands report a verdict as data instead (the result's
    ``passed``) and return exit 1 after printing the full report, which raising would cut short.
    """

    exit_code = ExitCode.CHECK_FAILED
