"""``bnscope inspect``: every BN layer, its neighbours, fold decision and parameter health."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bnscope.cli.app import guarded, stderr, stdout
from bnscope.cli.options import FailOn, ModelArg, format_choices, format_option
from bnscope.errors import BnscopeError, ExitCode

Format = format_choices("inspect")


@guarded
def inspect(
    model: ModelArg,
    fmt: Annotated[Format, format_option()] = Format.table,
    fail_on: Annotated[
        FailOn, typer.Option("--fail-on", help="Exit 1 when a flag of this severity or worse is found.")
    ] = FailOn.never,
    keep_overridable: Annotated[
        bool, typer.Option("--keep-overridable", help="Treat initializers listed as graph inputs as non-constant.")
    ] = False,
) -> int:
    """List every BatchNormalization layer: neighbours, fold decision and parameter health."""
    from bnscope.fold.plan import FoldOptions
    from bnscope.numerics.lint import SEVERITY_RANK
    from bnscope.report.inspect import emit_inspect
    from bnscope.workflows.inspect import inspect_model

    result = inspect_model(model, FoldOptions(keep_overridable=keep_overridable))
    emit_inspect(result, fmt.value, stdout)
    if fail_on is FailOn.never:
        return ExitCode.OK
    threshold = SEVERITY_RANK[fail_on.value]
    failed = any(SEVERITY_RANK[f.severity] >= threshold for f in result.flags)
    return ExitCode.CHECK_FAILED if failed else ExitCode.OK


DataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", "-d", help="Calibration data: .npz/.npy/.pb file, or a folder of them or of images."),
]
RandomOpt = Annotated[
    bool, typer.Option("--random", help="Seeded random inputs shaped from the model (says nothing about real data).")
]
LoaderOpt = Annotated[
    Optional[str],
    typer.Option("--loader", help="A Python data loader 'file.py:func' yielding feed dicts (runs that code)."),
]
ProviderOpt = Annotated[
    str, typer.Option("--provider", "-p", help="Execution provider: cpu, cuda, tensorrt, auto, or an onnxruntime name.")
]
AllowFallbackOpt = Annotated[
    bool,
    typer.Option("--allow-fallback", help="Accept onnxruntime falling back to CPU when the provider fails to load."),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for --random.")]


HtmlOpt = Annotated[
    Optional[Path], typer.Option("--html", help="Also write a self-contained HTML report (charts) to this file.")
]


def _progress_bar():
    """A rich progress callback on stderr, only when stderr is a terminal."""
    if not stderr.is_terminal:
        return None, None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeRemainingColumn,
    )

    bar = Progress(
        "[progress.description]{task.description}",
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


def parse_shard(value: Optional[str]) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(p) for p in value.split("/"))
    except ValueError:
        raise BnscopeError(
            f"--shard {value!r} is not I/N. Hint: e.g. --shard 1/4 for the first of four shards"
        ) from None
    if not 1 <= i <= n:
        raise BnscopeError(f"--shard {value}: I must be between 1 and N. Hint: shards are numbered 1..N")
    return i - 1, n


def parse_per_layer(values: list[str], option: str) -> dict[str, float]:
    out = {}
    for item in values:
        name, sep, number = item.rpartition(":")
        try:
            out[name] = float(number)
        except ValueError:
            raise BnscopeError(f"{option} {item!r} is not LAYER:NUMBER. Hint: e.g. {option} conv1_bn:3") from None
        if not sep:
            raise BnscopeError(f"{option} {item!r} is not LAYER:NUMBER. Hint: e.g. {option} conv1_bn:3")
    return out
