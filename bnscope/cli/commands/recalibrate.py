"""``bnscope recalibrate``: re-estimate BN running statistics (AdaBN)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bnscope import report
from bnscope.choices import Method
from bnscope.cli.app import guarded, stdout
from bnscope.cli.options import (
    AllowFallbackOpt,
    BatchSizeOpt,
    DataOpt,
    EpLibraryOpt,
    ForceOpt,
    LoaderOpt,
    MaxBatchesOpt,
    ModelArg,
    ProviderOpt,
    RayOpt,
    WorkersOpt,
    choices,
    cluster_options,
    format_choices,
    format_option,
    register_ep_libraries,
)
from bnscope.errors import BnscopeError, ExitCode

Format = format_choices("RecalibrateResult")


@guarded
def recalibrate(
    model: ModelArg,
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="OUT", help="Where to write the recalibrated model.")
    ],
    data: DataOpt = None,
    loader: LoaderOpt = None,
    method: Annotated[
        Method,
        typer.Option(
            "--method", metavar=choices(Method), help="sequential: exact, layer by layer; onepass: torch update_bn."
        ),
    ] = Method.sequential,
    unbiased: Annotated[bool, typer.Option("--unbiased", help="Unbiased (n-1) running variance (sequential).")] = False,
    batch_size: BatchSizeOpt = None,
    max_batches: MaxBatchesOpt = None,
    eval_data: Annotated[
        Optional[Path],
        typer.Option("--eval-data", metavar="FILE", help="An .npz with a 'labels' array: report top-1 before/after."),
    ] = None,
    provider: ProviderOpt = "cpu",
    ep_library: EpLibraryOpt = [],
    allow_fallback: AllowFallbackOpt = False,
    force: ForceOpt = False,
    ray: RayOpt = None,
    workers: WorkersOpt = 2,
    fmt: Annotated[Format, format_option(Format)] = Format.table,
) -> int:
    """Re-estimate BN running statistics on the given data (AdaBN) and write a new model."""
    from bnscope.workflows.recalibrate import RecalibrateOptions, recalibrate_model

    cluster = cluster_options(ray, workers)
    register_ep_libraries(ep_library)

    if data is None and loader is None:
        raise BnscopeError("recalibrate needs data. Hint: pass --data calib.npz (unlabelled data of the target domain)")
    options = RecalibrateOptions(
        method=method.value,
        unbiased=unbiased,
        batch_size=batch_size,
        max_batches=max_batches,
        provider=provider,
        allow_fallback=allow_fallback,
    )
    result = recalibrate_model(
        model, data, output, options, loader=loader, eval_data=eval_data, force=force, cluster=cluster
    )
    report.emit(result, fmt.value, stdout)
    return ExitCode.OK if result.passed else ExitCode.CHECK_FAILED
