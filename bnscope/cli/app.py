"""The typer app, the error boundary and logging: what every command shares.

``BnscopeError`` becomes one line on stderr and its exit code (2, or 1 for a failed check);
anything else is a bug: exit 3, with the traceback only under ``--debug``.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from bnscope import __version__
from bnscope.errors import BnscopeError, ExitCode

app = typer.Typer(
    name="bnscope",
    help="Inspect, measure, fold and recalibrate BatchNormalization in trained ONNX models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
stdout = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True)
_state = {"debug": False}


def _version_callback(value: bool) -> None:
    if value:
        from bnscope.runtime.providers import ort_distribution

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
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose + debug * 2, 2)]
    setup_logging(level)


def setup_logging(level: int) -> None:
    """One handler on stderr for the ``bnscope`` loggers, at ``level``; the library configures none."""
    root = logging.getLogger("bnscope")
    root.handlers[:] = [_log_handler()]
    root.setLevel(level)
    root.propagate = False


def _log_handler() -> logging.Handler:
    """rich on a terminal; elsewhere (CI logs, pipes) one plain line per message, never wrapped."""
    if stderr.is_terminal:
        return RichHandler(console=stderr, show_time=False, show_path=False, rich_tracebacks=False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowerLevelFormatter("%(levelname)s: %(message)s"))
    return handler


class _LowerLevelFormatter(logging.Formatter):
    """``warning: ...`` like bnscope's ``error: ...`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()}))


def guarded(command):
    """The error boundary: BnscopeError -> one line + its exit code; other errors -> exit 3."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            code = command(*args, **kwargs)
        except BnscopeError as exc:
            stderr.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(int(exc.exit_code)) from None
        except KeyboardInterrupt:
            stderr.print("interrupted", highlight=False)
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as exc:  # a bug in bnscope, not in the input
            if _state["debug"]:
                stderr.print_exception(show_locals=False)
            else:
                stderr.print(
                    f"[bold red]internal error:[/] {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                    "(rerun with --debug for the traceback and please report it)",
                    highlight=False,
                    soft_wrap=True,
                )
            raise typer.Exit(int(ExitCode.INTERNAL)) from None
        raise typer.Exit(int(code or 0))

    return wrapper
