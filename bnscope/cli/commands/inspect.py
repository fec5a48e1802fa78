"""``bnscope inspect``: every BN layer, its neighbours, fold decision and parameter health."""

from __future__ import annotations

from typing import Annotated

import typer

from bnscope import report
from bnscope.cli.app import guarded, stdout
from bnscope.cli.options import FailOn, ModelArg, choices, format_choices, format_option
from bnscope.errors import ExitCode

Format = format_choices("InspectResult")


@guarded
def inspect(
    model: ModelArg,
    fmt: Annotated[Format, format_option(Format)] = Format.table,
    fail_on: Annotated[
        FailOn,
        typer.Option(
            "--fail-on", metavar=choices(FailOn), help="Exit 1 when a flag of this severity or worse is found."
        ),
    ] = FailOn.never,
    keep_overridable: Annotated[
        bool, typer.Option("--keep-overridable", help="Treat initializers listed as graph inputs as non-constant.")
    ] = False,
) -> int:
    """List every BatchNormalization layer: neighbours, fold decision and parameter health."""
    from bnscope.fold.plan import FoldOptions
    from bnscope.workflows.inspect import inspect_model

    result = inspect_model(model, FoldOptions(keep_overridable=keep_overridable))
    report.emit(result, fmt.value, stdout)
    if fail_on is FailOn.never:
        return ExitCode.OK
    return ExitCode.CHECK_FAILED if result.fails_on(fail_on.value) else ExitCode.OK
