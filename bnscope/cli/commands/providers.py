"""``bnscope providers``: the onnxruntime installation, its built-in and plugin EPs, and which really work here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bnscope import report
from bnscope.cli.app import guarded, stdout
from bnscope.cli.options import EpLibraryOpt, format_choices, format_option
from bnscope.errors import ExitCode

Format = format_choices("ProvidersResult")


@guarded
def providers(
    ep_library: EpLibraryOpt = [],
    config: Annotated[
        Optional[Path],
        typer.Option(
            "--config",
            metavar="FILE",
            help="Also register the ep_libraries of this bnscope.toml / pyproject.toml ([tool.bnscope]).",
        ),
    ] = None,
    fmt: Annotated[Format, format_option(Format)] = Format.table,
) -> int:
    """List execution providers (built-in and plugin), their devices, and whether each really works here."""
    from bnscope.runtime.plugins import parse_ep_libraries
    from bnscope.runtime.probe import probe_providers

    result = probe_providers(parse_ep_libraries(ep_library), config=config)
    report.emit(result, fmt.value, stdout)
    return ExitCode.OK
