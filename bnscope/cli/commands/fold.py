"""``bnscope fold``: fold BN into its neighbouring linear op, verify, write atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bnscope import report
from bnscope.cli.app import guarded, stdout
from bnscope.cli.options import (
    AllowFallbackOpt,
    EpLibraryOpt,
    ForceOpt,
    LoaderOpt,
    ModelArg,
    RandomOpt,
    SeedOpt,
    data_option,
    format_choices,
    format_option,
    limit,
    one_data_source,
    register_ep_libraries,
)
from bnscope.errors import ExitCode

Format = format_choices("FoldResult")


@guarded
def fold(
    model: ModelArg,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output", "-o", metavar="OUT", help="Where to write the folded model.  [required unless --dry-run]"
        ),
    ] = None,
    data: Annotated[Optional[Path], data_option("Verification inputs (default: seeded random data)")] = None,
    random: RandomOpt = False,
    loader: LoaderOpt = None,
    seed: SeedOpt = 0,
    batch_size: Annotated[
        Optional[int],
        typer.Option(
            "--batch-size",
            "-b",
            metavar="N",
            help="Samples per verification batch (default: the model's fixed batch size, else 8).",
        ),
    ] = None,
    atol: Annotated[
        Optional[float],
        typer.Option("--atol", metavar="TOL", callback=limit, help="Absolute tolerance (default by output dtype)."),
    ] = None,
    rtol: Annotated[
        Optional[float],
        typer.Option("--rtol", metavar="TOL", callback=limit, help="Relative tolerance (default by output dtype)."),
    ] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the numerical verification.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would fold; write nothing.")] = False,
    only: Annotated[
        list[str], typer.Option("--only", metavar="LAYER", help="Fold only these BN layers (repeatable).")
    ] = [],
    skip: Annotated[
        list[str], typer.Option("--skip", metavar="LAYER", help="Never fold these BN layers (repeatable).")
    ] = [],
    keep_overridable: Annotated[
        bool, typer.Option("--keep-overridable", help="Refuse BN whose constants are also graph inputs.")
    ] = False,
    provider: Annotated[
        list[str],
        typer.Option("--provider", "-p", metavar="NAME[:DEVICE]", help="Also verify on these providers (repeatable)."),
    ] = [],
    ep_library: EpLibraryOpt = [],
    allow_fallback: AllowFallbackOpt = False,
    force: ForceOpt = False,
    fmt: Annotated[Format, format_option(Format)] = Format.table,
) -> int:
    """Fold every exactly-foldable BN into its neighbouring linear op, verify, and write atomically."""
    from bnscope.fold.plan import FoldOptions
    from bnscope.runtime.selection import distinct_providers
    from bnscope.workflows.fold import fold_model
    from bnscope.workflows.options import DataChoice, FoldSettings

    register_ep_libraries(ep_library)

    one_data_source(data, random, loader)
    options = FoldOptions(keep_overridable=keep_overridable, only=frozenset(only) or None, skip=frozenset(skip))
    providers = distinct_providers(provider, first="cpu")
    settings = FoldSettings(
        output=output,
        options=options,
        verify=not no_verify,
        dry_run=dry_run,
        force=force,
        data=DataChoice(path=data, loader=loader, seed=seed, batch_size=batch_size),
        atol=atol,
        rtol=rtol,
        providers=providers,
        allow_fallback=allow_fallback,
    )
    result = fold_model(model, settings)
    report.emit(result, fmt.value, stdout)
    return ExitCode.OK if result.passed else ExitCode.CHECK_FAILED
