"""``bnscope stats`` and ``bnscope merge``: batch statistics against running statistics."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from bnscope import report
from bnscope.choices import Diagnose, Mode, Strategy
from bnscope.cli.app import guarded, stderr, stdout
from bnscope.cli.options import (
    AllowFallbackOpt,
    BatchSizeOpt,
    DataOpt,
    EpLibraryOpt,
    HtmlOpt,
    LoaderOpt,
    MaxBatchesOpt,
    ModelArg,
    ProviderOpt,
    RandomOpt,
    RayOpt,
    SeedOpt,
    WorkersOpt,
    choices,
    cluster_options,
    format_choices,
    format_option,
    fraction,
    limit,
    parse_per_layer,
    parse_shard,
    register_ep_libraries,
)
from bnscope.errors import ExitCode

Format = format_choices("StatsResult")


FAIL_ON_DRIFT_HELP = (
    "Exit 1 when a layer's drift is decided (drift, stale, inherited, dead, broken); unsure, where the data "
    "cannot tell, passes with a warning naming the layer and the samples that would decide it."
)
FailOnDriftOpt = Annotated[bool, typer.Option("--fail-on-drift", help=FAIL_ON_DRIFT_HELP)]
StrictOpt = Annotated[bool, typer.Option("--strict", help="--fail-on-drift that fails on unsure layers too.")]


@guarded
def stats(
    model: ModelArg,
    data: DataOpt = None,
    random: RandomOpt = False,
    loader: LoaderOpt = None,
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = None,
    max_batches: MaxBatchesOpt = None,
    mode: Annotated[
        Mode,
        typer.Option(
            "--mode", metavar=choices(Mode), help="eval: BN uses running stats (as deployed); train: batch stats."
        ),
    ] = Mode.eval,
    provider: ProviderOpt = "cpu",
    ep_library: EpLibraryOpt = [],
    allow_fallback: AllowFallbackOpt = False,
    strategy: Annotated[
        Strategy, typer.Option("--strategy", metavar=choices(Strategy), help="How statistics are tapped in the graph.")
    ] = Strategy.auto,
    per_channel: Annotated[
        bool, typer.Option("--per-channel", help="Per-channel rows in table/markdown/csv; per-channel arrays in JSON.")
    ] = False,
    shard: Annotated[
        Optional[str],
        typer.Option("--shard", metavar="I/N", help="I/N: process only every N-th batch, starting at the I-th."),
    ] = None,
    max_d: Annotated[
        float,
        typer.Option(
            "--max-d", metavar="D", callback=limit, help="A channel drifts beyond this |d| (standardised mean shift)."
        ),
    ] = 0.5,
    max_log_r: Annotated[
        float,
        typer.Option(
            "--max-log-r", metavar="LOG_R", callback=limit, help="A channel drifts beyond this |log r| (log std ratio)."
        ),
    ] = 0.25,
    max_fraction: Annotated[
        float,
        typer.Option(
            "--max-fraction",
            metavar="FRACTION",
            callback=fraction,
            help="A layer drifts when more than this fraction of channels do.",
        ),
    ] = 0.05,
    layer_max_d: Annotated[
        list[str], typer.Option("--layer-max-d", metavar="LAYER:D", help="Per-layer override LAYER:VALUE (repeatable).")
    ] = [],
    fail_on_drift: FailOnDriftOpt = False,
    strict: StrictOpt = False,
    save_moments: Annotated[
        Optional[Path],
        typer.Option("--save-moments", metavar="FILE", help="Also write mergeable moments (for bnscope merge)."),
    ] = None,
    allow_nonfinite: Annotated[
        bool,
        typer.Option(
            "--allow-nonfinite",
            help="Collect even when the data hold NaN/Inf (the layers they reach are reported broken); by default that is an input error.",
        ),
    ] = False,
    diagnose: Annotated[
        Diagnose,
        typer.Option(
            "--diagnose",
            metavar=choices(Diagnose),
            help="auto: a second pass in the other mode (train <-> eval) for the diagnosis, only when a layer "
            "is not ok; always; never (eval-only diagnosis, no second pass).",
        ),
    ] = Diagnose.auto,
    html: HtmlOpt = None,
    ray: RayOpt = None,
    workers: WorkersOpt = 2,
    fmt: Annotated[Format, format_option(Format)] = Format.table,
) -> int:
    """Batch statistics of every BN input over calibration data against the stored running statistics."""
    from bnscope.stats.collect import StatsOptions
    from bnscope.stats.summary import Thresholds
    from bnscope.workflows.outputs import check_run_outputs
    from bnscope.workflows.stats import collect_stats

    cluster = cluster_options(ray, workers)
    check_run_outputs(model, {"--save-moments": save_moments, "--html": html}, data=data, loader=loader)
    register_ep_libraries(ep_library)

    options = StatsOptions(
        batch_size=batch_size,
        max_batches=max_batches,
        mode=mode.value,
        provider=provider,
        allow_fallback=allow_fallback,
        strategy=strategy.value,
        shard=parse_shard(shard),
        allow_nonfinite=allow_nonfinite,
    )
    thresholds = Thresholds(
        max_d=max_d,
        max_log_r=max_log_r,
        max_fraction=max_fraction,
        per_layer_max_d=parse_per_layer(layer_max_d, "--layer-max-d"),
    )
    bar, update = _progress_bar()
    with bar or contextlib.nullcontext():
        result = collect_stats(
            model,
            data,
            options=options,
            thresholds=thresholds,
            random=random,
            loader=loader,
            seed=seed,
            progress=update,
            save_moments=save_moments,
            diagnose=diagnose.value,
            cluster=cluster,
        )
    report.emit(result, fmt.value, stdout, per_channel=per_channel)
    if html is not None:
        from bnscope.workflows.inspect import inspect_model

        _write_html(html, stats=result, inspect=inspect_model(model))
    return gate_exit(result, fail_on_drift, strict)


@guarded
def merge(
    parts: Annotated[
        list[Path], typer.Argument(metavar="MOMENTS", help="Moments files written by stats --shard I/N --save-moments.")
    ],
    per_channel: Annotated[
        bool, typer.Option("--per-channel", help="Per-channel rows in table/markdown/csv; per-channel arrays in JSON.")
    ] = False,
    max_d: Annotated[
        float, typer.Option("--max-d", metavar="D", callback=limit, help="A channel drifts beyond this |d|.")
    ] = 0.5,
    max_log_r: Annotated[
        float,
        typer.Option("--max-log-r", metavar="LOG_R", callback=limit, help="A channel drifts beyond this |log r|."),
    ] = 0.25,
    fail_on_drift: FailOnDriftOpt = False,
    strict: StrictOpt = False,
    allow_partial: Annotated[
        bool,
        typer.Option("--allow-partial", help="Merge an incomplete set of shards (a report over part of the data)."),
    ] = False,
    fmt: Annotated[Format, format_option(Format)] = Format.table,
) -> int:
    """Merge sharded moments into the report one run over all the data would give."""
    from bnscope.stats.shards import merge_moments
    from bnscope.stats.summary import Thresholds

    result = merge_moments(parts, Thresholds(max_d=max_d, max_log_r=max_log_r), allow_partial)
    report.emit(result, fmt.value, stdout, per_channel=per_channel)
    return gate_exit(result, fail_on_drift, strict)


def gate_exit(result, fail_on_drift: bool, strict: bool) -> int:
    """The CI gate (:mod:`bnscope.stats.gate`, the one ``check`` asks): exit 1 when a layer fails it;
    one warning line for the unsure layers. ``--strict`` gates without ``--fail-on-drift`` too."""
    from bnscope.stats.gate import unsure_warning

    if not (fail_on_drift or strict):
        return ExitCode.OK
    warning = unsure_warning(result.unsure(), strict)
    if warning:
        logging.getLogger("bnscope").warning(warning)
    return ExitCode.OK if result.passes(strict) else ExitCode.CHECK_FAILED


def _progress_bar():
    """Progress on stderr: a rich bar on a terminal; in a log (CI), plain lines (``progress_lines``)."""
    if not stderr.is_terminal:
        return None, progress_lines()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        # The console interprets no markup (names from models are text), so the column says so too:
        # rich's default "[progress.description]..." string would be printed as it is.
        TextColumn("{task.description}", style="progress.description", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    )
    task = bar.add_task("batches", total=None)

    def update(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def progress_lines(every_s: float = 5.0, clock=time.monotonic):
    """Progress for a log (CI): a plain stderr line at each tenth of the batches (each 50th when the total
    is unknown), at most one every ``every_s`` seconds, so short runs print none. ``-q`` silences it.
    """
    last = [clock()]

    def update(done: int, total: int | None) -> None:
        step = max(1, -(-total // 10)) if total else 50
        quiet = not logging.getLogger("bnscope").isEnabledFor(logging.WARNING)
        if quiet or (done % step and done != total) or clock() - last[0] < every_s:
            return
        last[0] = clock()
        stderr.print(f"progress: batches {done}/{total if total else '?'}")

    return update


def _write_html(path: Path, **results) -> None:
    from bnscope.onnxio.outputs import writing
    from bnscope.report.html import render_html, write_html

    with writing(path, "the HTML report"):
        write_html(path, render_html(**results, title=f"bnscope report: {path.stem}"))
    logging.getLogger("bnscope").info("wrote %s", path)
