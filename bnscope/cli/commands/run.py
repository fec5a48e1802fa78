"""``bnscope run``: run a model on an execution provider, with no silent CPU fallback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bnscope import report
from bnscope.cli.app import guarded, stdout
from bnscope.cli.options import (
    AllowFallbackOpt,
    EpLibraryOpt,
    LoaderOpt,
    ModelArg,
    ProviderOpt,
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

Format = format_choices("RunResult")


@guarded
def run(
    model: ModelArg,
    provider: ProviderOpt = "cpu",
    ep_library: EpLibraryOpt = [],
    data: Annotated[Optional[Path], data_option("Input data to run the model on")] = None,
    random: RandomOpt = False,
    loader: LoaderOpt = None,
    seed: SeedOpt = 0,
    batch_size: Annotated[
        Optional[int],
        typer.Option(
            "--batch-size", "-b", metavar="N", help="Samples per run (default: the model's fixed batch size, else 1)."
        ),
    ] = None,
    compare: Annotated[
        Optional[Path],
        typer.Option(
            "--compare", metavar="OTHER_MODEL", help="Another model (e.g. the folded one) to run on the same inputs."
        ),
    ] = None,
    warmup: Annotated[int, typer.Option("--warmup", metavar="N", min=0, help="Untimed runs first.")] = 5,
    runs: Annotated[int, typer.Option("--runs", metavar="N", min=1, help="Timed runs.")] = 50,
    opt_level: Annotated[
        str,
        typer.Option(
            "--opt-level",
            metavar="disable|basic|extended|all",
            help="onnxruntime optimisation: disable, basic, extended, all.",
        ),
    ] = "all",
    allow_fallback: AllowFallbackOpt = False,
    atol: Annotated[
        Optional[float], typer.Option("--atol", metavar="TOL", callback=limit, help="Absolute tolerance for --compare.")
    ] = None,
    rtol: Annotated[
        Optional[float], typer.Option("--rtol", metavar="TOL", callback=limit, help="Relative tolerance for --compare.")
    ] = None,
    fmt: Annotated[Format, format_option(Format)] = Format.table,
) -> int:
    """Run a model on an execution provider (no silent CPU fallback): latency, and with --compare the differences."""
    from bnscope.workflows.options import DataChoice
    from bnscope.workflows.run import run_model

    register_ep_libraries(ep_library)

    one_data_source(data, random, loader)
    result = run_model(
        model,
        provider=provider,
        data=DataChoice(
            path=data, loader=loader, seed=seed, batch_size=batch_size, max_batches=1, default_batch_size=1
        ),
        compare=str(compare) if compare else None,
        warmup=warmup,
        runs=runs,
        allow_fallback=allow_fallback,
        opt_level=opt_level,
        atol=atol,
        rtol=rtol,
    )
    report.emit(result, fmt.value, stdout)
    return ExitCode.OK if result.passed else ExitCode.CHECK_FAILED
