"""The typer app, the error boundary and logging: what every command shares.

``BnscopeError`` becomes one line on stderr and its exit code (2, or 1 for a failed check);
anything else is a bug: exit 3, with the traceback only under ``--debug``. SIGTERM (CI
cancellation, ``timeout``) takes the same path as Ctrl-C, so staging is cleaned up either way.
Usage errors (typer's own), log lines and errors are one line each; text from a model is shown
as text (see :mod:`bnscope.report.text`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.logging import RichHandler
from rich.text import Text

from bnscope import __version__
from bnscope.cli.group import OneLineErrorsGroup
from bnscope.errors import BnscopeError, ExitCode
from bnscope.report.text import OutputClosed, OutputFailed, SafeConsole, one_line, printable

app = typer.Typer(
    name="bnscope",
    help="Inspect, measure, fold and recalibrate BatchNormalization in trained ONNX models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    cls=OneLineErrorsGroup,
)
stdout = SafeConsole(soft_wrap=False)
stderr = SafeConsole(stderr=True)
_state = {"debug": False}
PIPE_WIDTH = 160  # tables written to a pipe or file when COLUMNS is not set


def _set_widths() -> None:
    """``COLUMNS`` when set (also in a pipe), else the terminal's width, else ``PIPE_WIDTH``."""
    columns = os.environ.get("COLUMNS", "")
    for console in (stdout, stderr):
        width = int(columns) if columns.isdigit() and int(columns) > 0 else None
        if width is None and not console.is_terminal:
            width = PIPE_WIDTH
        console.width = width if width is not None else console.size.width


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python code runs, so every cleanup path for Ctrl-C runs too."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises ``Terminated`` while a command runs; the previous handler comes back after."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding application): leave its handler
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _version_callback(value: bool) -> None:
    if value:
        _import_onnxruntime_quietly()
        from bnscope.workflows.providers import ort_distribution

        dist, version = ort_distribution()
        import onnx

        typer.echo(f"bnscope {__version__} (onnx {onnx.__version__}, {dist} {version})")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More logging on stderr (-vv for debug).")
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for internal errors.")] = False,
    version: Annotated[
        Optional[bool],
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Show versions (bnscope, onnx, onnxruntime package) and exit.",
        ),
    ] = None,
) -> None:
    _state["debug"] = debug
    _tolerant_streams()
    warnings.showwarning = _warning_as_log
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose + debug * 2, 2)]
    setup_logging(level)
    _set_widths()


def setup_logging(level: int) -> None:
    """One handler on stderr for the ``bnscope`` loggers, at ``level``; the library configures none."""
    root = logging.getLogger("bnscope")
    root.handlers[:] = [_log_handler()]
    root.setLevel(level)
    root.propagate = False


def _log_handler() -> logging.Handler:
    """rich on a terminal; elsewhere (CI logs, pipes) one plain line per message, never wrapped."""
    if stderr.is_terminal:
        handler = RichHandler(console=stderr, show_time=False, show_path=False, rich_tracebacks=False, markup=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LowerLevelFormatter("%(levelname)s: %(message)s"))
    handler.addFilter(_printable_message)
    return handler


def _printable_message(record: logging.LogRecord) -> bool:
    """One line, control characters escaped: messages carry names from the model."""
    record.msg, record.args = one_line(record.getMessage()), None
    return True


class _LowerLevelFormatter(logging.Formatter):
    """``warning: ...`` like bnscope's ``error: ...`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()}))


def guarded(command=None, *, runtime: bool = True):
    """The error boundary: BnscopeError -> one line + its exit code; other errors -> exit 3.

    ``runtime``: the command runs models, so onnxruntime is imported (quietly) before it; a command
    that only reads graphs (``@guarded(runtime=False)``: inspect) never pays that import (0.09 s)."""
    if command is None:
        return functools.partial(guarded, runtime=runtime)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            _refuse_relative_paths_without_cwd(kwargs)
            with _sigterm_as_interrupt():
                if runtime:
                    _import_onnxruntime_quietly()  # before the command's modules import it
                code = command(*args, **kwargs)
        except BnscopeError as exc:
            _error_line("error:", one_line(exc))
            raise typer.Exit(int(exc.exit_code)) from None
        except Terminated:
            stderr.print("terminated", highlight=False)
            raise typer.Exit(128 + signal.SIGTERM) from None
        except KeyboardInterrupt:
            stderr.print("interrupted", highlight=False)
            raise typer.Exit(130) from None
        except OutputClosed:
            raise typer.Exit(128 + signal.SIGPIPE) from None  # as a process killed by SIGPIPE (cat, grep)
        except OutputFailed as exc:  # > /dev/full: the environment's fault, said once on stderr
            _discard_stdout()
            _error_line("error:", one_line(exc))
            raise typer.Exit(int(ExitCode.USAGE)) from None
        except (typer.Exit, SystemExit) as exc:
            _refuse_exit_from_user_code(exc)
            raise
        except Exception as exc:  # a bug in bnscope, not in the input
            if _state["debug"]:
                stderr.print_exception(show_locals=False)
            else:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                text = f"{type(exc).__name__}: {first} (rerun with --debug for the traceback and please report it)"
                _error_line("internal error:", one_line(text))
            raise typer.Exit(int(ExitCode.INTERNAL)) from None
        raise typer.Exit(int(code or 0))

    return wrapper


def _refuse_relative_paths_without_cwd(kwargs: dict) -> None:
    """A relative path names nothing once the working directory is deleted (``getcwd`` fails)."""
    try:
        os.getcwd()
        return
    except OSError:
        pass
    values = [v for value in kwargs.values() for v in (value if isinstance(value, list) else [value])]
    relative = [v for v in values if isinstance(v, Path) and not v.is_absolute()]
    if relative:
        raise BnscopeError(
            f"the working directory no longer exists, so the relative path {relative[0]} names nothing. "
            "Hint: cd to an existing folder, or give absolute paths"
        )


_warned: set = set()


def _warning_as_log(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning from a library bnscope calls (numpy's "invalid value encountered", Pillow's
    decompression-bomb warning) as one log line on stderr, not two raw lines with the source line."""
    origin = os.path.basename(str(filename))
    key = (category, str(message), origin, lineno)
    if key in _warned:  # once per place, as Python's default filter means to
        return
    _warned.add(key)
    logging.getLogger("bnscope").warning("%s: %s (%s:%s)", category.__name__, message, origin, lineno)


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so what is still buffered does not fail again at exit."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _tolerant_streams() -> None:
    """stdout and stderr write a character their encoding lacks (a Cyrillic name under LC_ALL=C or
    cp1252) as a backslash escape instead of failing, as Python's own stderr does; bnscope's symbols
    get ASCII stand-ins (:func:`bnscope.report.text.for_encoding`)."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            with contextlib.suppress(Exception):
                stream.reconfigure(errors="backslashreplace")


def _import_onnxruntime_quietly() -> None:
    from bnscope.workflows.providers import import_onnxruntime_quietly

    import_onnxruntime_quietly()


def _error_line(label: str, message: str) -> None:
    message = re.sub(r"(?<!\.)\.\.(?=\s|$)", ".", message)  # "...failed: reason.." from nested messages
    stderr.print(Text.assemble((label, "bold red"), " ", message), highlight=False, soft_wrap=True)


def _refuse_exit_from_user_code(exc: BaseException) -> None:
    """``typer.Exit`` is ours; bnscope never calls ``sys.exit``, so a ``SystemExit`` inside a command
    came from user code (a ``--loader`` script): an input error, never a silent success."""
    if isinstance(exc, SystemExit):
        text = f"code bnscope ran for you called sys.exit({exc.code!r}). Hint: a loader script must not exit"
        _error_line("error:", printable(text))
        raise typer.Exit(int(ExitCode.USAGE)) from None
