"""The command line: thin typer commands over the library. The only module that imports typer.

Each command parses options, makes one library call, renders the result on stdout and returns an
exit code. ``BnscopeError`` becomes one line on stderr and exit 2 (1 for ``CheckFailed``);
anything else is a bug: exit 3, with the traceback only under ``--debug``.
"""

from __future__ import annotations

import functools
import logging
import sys
from enum import Enum
from pathlib import Path
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
stdout = Console(soft_wrap=False)
stderr = Console(stderr=True)
_state = {"debug": False}


class Format(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"


class FailOn(str, Enum):
    warning = "warning"
    error = "error"
    never = "never"


ModelArg = Annotated[Path, typer.Argument(help="The ONNX model file.", show_default=False)]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format on stdout.")]


def _version_callback(value: bool) -> None:
    if value:
        from bnscope.runtime import ort_distribution

        dist, version = ort_distribution()
        import onnx

        typer.echo(f"bnscope {__version__} (onnx {onnx.__version__}, {dist} {version})")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging on stderr (-vv for debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for internal errors.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version_callback, is_eager=True,
                                                    help="Show versions (bnscope, onnx, onnxruntime package) and exit.")] = None,
) -> None:
    _state["debug"] = debug
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose + debug * 2, 2)]
    _setup_logging(level)


def _setup_logging(level: int) -> None:
    root = logging.getLogger("bnscope")
    root.handlers[:] = [RichHandler(console=stderr, show_time=False, show_path=False, rich_tracebacks=False)]
    root.setLevel(level)
    root.propagate = False


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
                    "(rerun with --debug for the traceback and please report it)", highlight=False, soft_wrap=True,
                )
            raise typer.Exit(int(ExitCode.INTERNAL)) from None
        raise typer.Exit(int(code or 0))

    return wrapper


@app.command()
@guarded
def inspect(
    model: ModelArg,
    fmt: FormatOpt = Format.table,
    fail_on: Annotated[FailOn, typer.Option("--fail-on", help="Exit 1 when a flag of this severity or worse is found.")] = FailOn.never,
    keep_overridable: Annotated[bool, typer.Option("--keep-overridable", help="Treat initializers listed as graph inputs as non-constant.")] = False,
) -> int:
    """List every BatchNormalization layer: neighbours, fold decision and parameter health."""
    from bnscope.analysis import inspect_model
    from bnscope.fold_patterns import FoldOptions
    from bnscope.lint import SEVERITY_RANK
    from bnscope.report import emit_inspect

    result = inspect_model(model, FoldOptions(keep_overridable=keep_overridable))
    emit_inspect(result, fmt.value, stdout)
    if fail_on is FailOn.never:
        return ExitCode.OK
    threshold = SEVERITY_RANK[fail_on.value]
    failed = any(SEVERITY_RANK[f.severity] >= threshold for f in result.flags)
    return ExitCode.CHECK_FAILED if failed else ExitCode.OK


def main() -> None:
    """Console-script entry point."""
    app(prog_name="bnscope")


if __name__ == "__main__":  # pragma: no cover
    main()
