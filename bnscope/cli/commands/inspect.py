"""``bnscope inspect``: every BN layer, its neighbours, fold decision and parameter health."""

from __future__ import annotations

from typing import Annotated

import typer

from bnscope import report
from bnscope.cli.app import guarded, stdout
from bnscope.cli.options import FailOn, ModelArg, choices, format_choices, format_option
from bnscope.errors import ExitCode

Format = format_choices("InspectResult")


@guarded(runtime=False)
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
    from bnscope.workflows.inspect import FoldOptions, inspect_model

    result = inspect_model(model, FoldOptions(keep_overridable=keep_overridable), fail_on=fail_on.value)
    report.emit(result, fmt.value, stdout)
    return ExitCode.OK if result.passed else ExitCode.CHECK_FAILED
