"""The app's command group: typer's usage errors on one line, and global flags after the command;
and the command class whose ``--help`` reads like a man page.

Typer prints a usage error as three lines (usage, "Try ... --help", "Error: ..."); bnscope prints
every error as one line, ``error: what. Hint: what to do``. ``-q``, ``-v`` and ``--debug`` belong to
``bnscope`` but users write them anywhere (``bnscope stats m.onnx -q``): they are moved in front of
the command name before parsing (never after a ``--``).
"""

from __future__ import annotations

import os
import re

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from bnscope.report.text import one_line

_GLOBAL_FLAG = re.compile(r"^(-q|--quiet|--debug|--verbose|-v+)$")


def _usage_error_type() -> type:
    """typer's (vendored Click's) UsageError, found through typer's public ``BadParameter``."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


_USAGE_ERROR = _usage_error_type()


class OneLineErrorsGroup(TyperGroup):
    def parse_args(self, ctx, args: list[str]) -> list[str]:
        refuse_folder_outputs(args)
        return super().parse_args(ctx, hoist_global_flags(args))

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except _USAGE_ERROR as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _USAGE_ERROR as exc:
            raise _one_line(exc) from None


def hoist_global_flags(args: list[str]) -> list[str]:
    """``-q``/``-v``/``--debug`` after the command name moved in front of it."""
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if _GLOBAL_FLAG.match(a)]
    rest = [a for a in args[:end] if not _GLOBAL_FLAG.match(a)]
    return flags + rest + args[end:]


OUTPUT_OPTIONS = ("-o", "--output", "--save-moments", "--save-baseline", "--html")


def refuse_folder_outputs(args: list[str]) -> None:
    """An output named with a trailing ``/`` (``-o newdir/``) names a folder: refused before typer turns
    it into ``Path("newdir")``, which would write a file called newdir."""
    end = args.index("--") if "--" in args else len(args)
    for i, arg in enumerate(args[:end]):
        option, eq, value = arg.partition("=")
        if not eq:
            option, value = arg, args[i + 1] if i + 1 < end else ""
            if arg.startswith("-o") and len(arg) > 2 and not arg.startswith("--"):
                option, value = "-o", arg[2:]
        if option in OUTPUT_OPTIONS and value.endswith(("/", os.sep)) and value.strip("/" + os.sep):
            suffix = {"--save-moments": ".npz", "--save-baseline": ".json", "--html": ".html"}.get(option, ".onnx")
            raise _USAGE_ERROR(
                f"{option} {value} names a folder (it ends in '/'), not a file: give a file name, "
                f"e.g. {option} {value}out{suffix}"
            )


def _one_line(exc):
    """The same error, shown as ``error: message. Hint: bnscope CMD --help``."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # shows the help, as asked
        return exc
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "bnscope"
    message = one_line(exc.format_message()).rstrip(".")

    def show(file=None) -> None:
        typer.echo(f"error: {message}. Hint: see '{where} --help'", err=True)

    exc.show = show
    return exc


class ManPageCommand(TyperCommand):
    """A command whose ``--help`` reads like a man page.

    The usage line names the arguments as they are written (``MODEL``, ``MODEL...``; typer writes
    ``{model}``), an argument's row shows its name without a type, and the summary in ``bnscope
    --help`` is the docstring's whole first paragraph (typer cuts it at the terminal's width with
    "..."). Option placeholders are each option's ``metavar`` (``PATH``, ``N``, ``LAYER:VALUE``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.help and not self.short_help:
            self.short_help = " ".join(self.help.split("\n\n")[0].split())
        for param in self.params:
            if isinstance(param, TyperArgument):
                param.display_type_rich = lambda ctx: None  # the name says it: no "<path>" after MODEL

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [re.sub(r"^\{(.*)\}", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]
