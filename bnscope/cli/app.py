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
stdout = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True)
_state = {"debug": False}


class Format(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"


class StatsFormat(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    csv = "csv"


class Mode(str, Enum):
    eval = "eval"
    train = "train"


class Strategy(str, Enum):
    auto = "auto"
    input_sums = "input_sums"
    output_pool = "output_pool"


class RunFormat(str, Enum):
    table = "table"
    json = "json"


class FailOn(str, Enum):
    warning = "warning"
    error = "error"
    never = "never"


ModelArg = Annotated[Path, typer.Argument(help="The ONNX model file.", show_default=False)]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format on stdout.")]


def _version_callback(value: bool) -> None:
    if value:
        from bnscope.runtime.providers import ort_distribution

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
    root.handlers[:] = [_log_handler()]
    root.setLevel(level)
    root.propagate = False


def _log_handler() -> logging.Handler:
    """rich on a terminal; elsewhere (CI logs, pipes) one plain line per message, never wrapped."""
    if stderr.is_terminal:
        return RichHandler(console=stderr, show_time=False, show_path=False, rich_tracebacks=False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowerLevelFormatter("%(levelname)s: %(message)s"))
    return handler


class _LowerLevelFormatter(logging.Formatter):
    """``warning: ...`` like bnscope's ``error: ...`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()}))


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


DataOpt = Annotated[Optional[Path], typer.Option("--data", "-d", help="Calibration data: .npz/.npy/.pb file, or a folder of them or of images.")]
RandomOpt = Annotated[bool, typer.Option("--random", help="Seeded random inputs shaped from the model (says nothing about real data).")]
LoaderOpt = Annotated[Optional[str], typer.Option("--loader", help="A Python data loader 'file.py:func' yielding feed dicts (runs that code).")]
ProviderOpt = Annotated[str, typer.Option("--provider", "-p", help="Execution provider: cpu, cuda, tensorrt, auto, or an onnxruntime name.")]
AllowFallbackOpt = Annotated[bool, typer.Option("--allow-fallback", help="Accept onnxruntime falling back to CPU when the provider fails to load.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for --random.")]


HtmlOpt = Annotated[Optional[Path], typer.Option("--html", help="Also write a self-contained HTML report (charts) to this file.")]


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

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=stderr, transient=True)
    task = bar.add_task("batches", total=None)

    def update(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def _shard(value: Optional[str]) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(p) for p in value.split("/"))
    except ValueError:
        raise BnscopeError(f"--shard {value!r} is not I/N. Hint: e.g. --shard 1/4 for the first of four shards") from None
    if not 1 <= i <= n:
        raise BnscopeError(f"--shard {value}: I must be between 1 and N. Hint: shards are numbered 1..N")
    return i - 1, n


def _per_layer(values: list[str], option: str) -> dict[str, float]:
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


@app.command()
@guarded
def stats(
    model: ModelArg,
    data: DataOpt = None,
    random: RandomOpt = False,
    loader: LoaderOpt = None,
    seed: SeedOpt = 0,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Samples per batch (default: the model's fixed batch size, else 32).")] = None,
    max_batches: Annotated[Optional[int], typer.Option("--max-batches", help="Stop after this many batches.")] = None,
    mode: Annotated[Mode, typer.Option("--mode", help="eval: BN uses running stats (as deployed); train: batch stats.")] = Mode.eval,
    provider: ProviderOpt = "cpu",
    allow_fallback: AllowFallbackOpt = False,
    strategy: Annotated[Strategy, typer.Option("--strategy", help="How statistics are tapped in the graph.")] = Strategy.auto,
    per_channel: Annotated[bool, typer.Option("--per-channel", help="Per-channel rows in table/markdown/csv (JSON always has them).")] = False,
    shard: Annotated[Optional[str], typer.Option("--shard", help="I/N: process only every N-th batch, starting at the I-th.")] = None,
    max_d: Annotated[float, typer.Option("--max-d", help="A channel drifts beyond this |d| (standardised mean shift).")] = 0.5,
    max_log_r: Annotated[float, typer.Option("--max-log-r", help="A channel drifts beyond this |log r| (log std ratio).")] = 0.25,
    max_fraction: Annotated[float, typer.Option("--max-fraction", help="A layer drifts when more than this fraction of channels do.")] = 0.05,
    layer_max_d: Annotated[list[str], typer.Option("--layer-max-d", help="Per-layer override LAYER:VALUE (repeatable).")] = [],
    fail_on_drift: Annotated[bool, typer.Option("--fail-on-drift", help="Exit 1 when any layer's verdict is not ok.")] = False,
    save_moments: Annotated[Optional[Path], typer.Option("--save-moments", help="Also write mergeable moments (for bnscope merge).")] = None,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Collect even when the data hold NaN/Inf (the layers they reach are reported broken); by default that is an input error.")] = False,
    html: HtmlOpt = None,
    fmt: Annotated[StatsFormat, typer.Option("--format", "-f", help="Output format on stdout.")] = StatsFormat.table,
) -> int:
    """Batch statistics of every BN input over calibration data against the stored running statistics."""
    from bnscope.report.stats import emit_stats
    from bnscope.stats.collect import StatsOptions
    from bnscope.stats.summary import Thresholds
    from bnscope.workflows.stats import collect_stats

    options = StatsOptions(batch_size=batch_size, max_batches=max_batches, mode=mode.value, provider=provider,
                           allow_fallback=allow_fallback, strategy=strategy.value, shard=_shard(shard),
                           allow_nonfinite=allow_nonfinite)
    thresholds = Thresholds(max_d=max_d, max_log_r=max_log_r, max_fraction=max_fraction,
                            per_layer_max_d=_per_layer(layer_max_d, "--layer-max-d"))
    bar, update = _progress_bar()
    with bar or _nullcontext():
        result = collect_stats(model, data, options=options, thresholds=thresholds, random=random, loader=loader,
                               seed=seed, progress=update, save_moments=save_moments)
    emit_stats(result, fmt.value, stdout, per_channel)
    if html is not None:
        from bnscope.workflows.inspect import inspect_model

        _write_html(html, stats=result, inspect=inspect_model(model))
    return ExitCode.CHECK_FAILED if fail_on_drift and not result.passed else ExitCode.OK


@app.command()
@guarded
def merge(
    parts: Annotated[list[Path], typer.Argument(help="Moments files written by stats --shard I/N --save-moments.")],
    per_channel: Annotated[bool, typer.Option("--per-channel", help="Per-channel rows in table/markdown/csv.")] = False,
    max_d: Annotated[float, typer.Option("--max-d", help="A channel drifts beyond this |d|.")] = 0.5,
    max_log_r: Annotated[float, typer.Option("--max-log-r", help="A channel drifts beyond this |log r|.")] = 0.25,
    fail_on_drift: Annotated[bool, typer.Option("--fail-on-drift", help="Exit 1 when any layer's verdict is not ok.")] = False,
    fmt: Annotated[StatsFormat, typer.Option("--format", "-f", help="Output format on stdout.")] = StatsFormat.table,
) -> int:
    """Merge sharded moments into the report one run over all the data would give."""
    from bnscope.report.stats import emit_stats
    from bnscope.stats.shards import merge_moments
    from bnscope.stats.summary import Thresholds

    result = merge_moments(parts, Thresholds(max_d=max_d, max_log_r=max_log_r))
    emit_stats(result, fmt.value, stdout, per_channel)
    return ExitCode.CHECK_FAILED if fail_on_drift and not result.passed else ExitCode.OK


@app.command()
@guarded
def fold(
    model: ModelArg,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where to write the folded model.")] = None,
    data: DataOpt = None,
    random: RandomOpt = False,
    loader: LoaderOpt = None,
    seed: SeedOpt = 0,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Samples per verification batch (default: the model's fixed batch size, else 8).")] = None,
    atol: Annotated[Optional[float], typer.Option("--atol", help="Absolute tolerance (default by output dtype).")] = None,
    rtol: Annotated[Optional[float], typer.Option("--rtol", help="Relative tolerance (default by output dtype).")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the numerical verification.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would fold; write nothing.")] = False,
    only: Annotated[list[str], typer.Option("--only", help="Fold only these BN layers (repeatable).")] = [],
    skip: Annotated[list[str], typer.Option("--skip", help="Never fold these BN layers (repeatable).")] = [],
    keep_overridable: Annotated[bool, typer.Option("--keep-overridable", help="Refuse BN whose constants are also graph inputs.")] = False,
    provider: Annotated[list[str], typer.Option("--provider", "-p", help="Also verify on these providers (repeatable).")] = [],
    allow_fallback: AllowFallbackOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Allow OUT to be the input model.")] = False,
    fmt: FormatOpt = Format.table,
) -> int:
    """Fold every exactly-foldable BN into its neighbouring linear op, verify, and write atomically."""
    from bnscope.fold.plan import FoldOptions
    from bnscope.report.fold import emit_fold
    from bnscope.workflows.fold import fold_model
    from bnscope.workflows.options import DataChoice, FoldSettings

    _one_data_source(data, random, loader)
    options = FoldOptions(keep_overridable=keep_overridable, only=frozenset(only) or None, skip=frozenset(skip))
    providers = ("cpu",) + tuple(p for p in provider if p.lower() not in ("cpu", "cpuexecutionprovider"))
    settings = FoldSettings(output=output, options=options, verify=not no_verify, dry_run=dry_run, force=force,
                            data=DataChoice(path=data, loader=loader, seed=seed, batch_size=batch_size), atol=atol, rtol=rtol,
                            providers=providers, allow_fallback=allow_fallback)
    result = fold_model(model, settings)
    emit_fold(result, fmt.value, stdout)
    return ExitCode.OK if result.passed else ExitCode.CHECK_FAILED


@app.command()
@guarded
def run(
    model: ModelArg,
    provider: ProviderOpt = "cpu",
    data: DataOpt = None,
    random: RandomOpt = False,
    loader: LoaderOpt = None,
    seed: SeedOpt = 0,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Samples per run (default: the model's fixed batch size, else 1).")] = None,
    compare: Annotated[Optional[Path], typer.Option("--compare", help="Another model (e.g. the folded one) to run on the same inputs.")] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs first.")] = 5,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs.")] = 50,
    opt_level: Annotated[str, typer.Option("--opt-level", help="onnxruntime optimisation: disable, basic, extended, all.")] = "all",
    allow_fallback: AllowFallbackOpt = False,
    atol: Annotated[Optional[float], typer.Option("--atol", help="Absolute tolerance for --compare.")] = None,
    rtol: Annotated[Optional[float], typer.Option("--rtol", help="Relative tolerance for --compare.")] = None,
    fmt: Annotated[RunFormat, typer.Option("--format", "-f", help="Output format on stdout.")] = RunFormat.table,
) -> int:
    """Run a model on an execution provider (no silent CPU fallback): latency, and with --compare the differences."""
    from bnscope.report.run import emit_run
    from bnscope.workflows.options import DataChoice
    from bnscope.workflows.run import run_model

    _one_data_source(data, random, loader)
    result = run_model(model, provider=provider, data=DataChoice(path=data, loader=loader, seed=seed,
                                                                batch_size=batch_size, max_batches=1, default_batch_size=1),
                       compare=str(compare) if compare else None, warmup=warmup, runs=runs,
                       allow_fallback=allow_fallback, opt_level=opt_level, atol=atol, rtol=rtol)
    emit_run(result, fmt.value, stdout)
    return ExitCode.OK if result.passed else ExitCode.CHECK_FAILED


class Method(str, Enum):
    sequential = "sequential"
    onepass = "onepass"


@app.command()
@guarded
def recalibrate(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the recalibrated model.")],
    data: DataOpt = None,
    loader: LoaderOpt = None,
    method: Annotated[Method, typer.Option("--method", help="sequential: exact, layer by layer; onepass: torch update_bn.")] = Method.sequential,
    unbiased: Annotated[bool, typer.Option("--unbiased", help="Unbiased (n-1) running variance (sequential).")] = False,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Samples per batch (default: the model's fixed batch size, else 32).")] = None,
    max_batches: Annotated[Optional[int], typer.Option("--max-batches", help="Stop after this many batches.")] = None,
    eval_data: Annotated[Optional[Path], typer.Option("--eval-data", help="An .npz with a 'labels' array: report top-1 before/after.")] = None,
    provider: ProviderOpt = "cpu",
    allow_fallback: AllowFallbackOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Allow OUT to be the input model.")] = False,
    fmt: FormatOpt = Format.table,
) -> int:
    """Re-estimate BN running statistics on the given data (AdaBN) and write a new model."""
    from bnscope.report.recalibrate import emit_recalibrate
    from bnscope.workflows.recalibrate import RecalibrateOptions, recalibrate_model

    if data is None and loader is None:
        raise BnscopeError("recalibrate needs data. Hint: pass --data calib.npz (unlabelled data of the target domain)")
    options = RecalibrateOptions(method=method.value, unbiased=unbiased, batch_size=batch_size,
                                 max_batches=max_batches, provider=provider, allow_fallback=allow_fallback)
    result = recalibrate_model(model, data, output, options, loader=loader, eval_data=eval_data, force=force)
    emit_recalibrate(result, fmt.value, stdout)
    return ExitCode.OK


class CheckFormat(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    junit = "junit"


@app.command()
@guarded
def check(
    model: ModelArg,
    data: DataOpt = None,
    loader: LoaderOpt = None,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="Fail when statistics moved from this baseline.")] = None,
    save_baseline: Annotated[Optional[Path], typer.Option("--save-baseline", help="Write this model's baseline (params and stats).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="bnscope.toml or pyproject.toml ([tool.bnscope]); default: ./bnscope.toml or ./pyproject.toml.")] = None,
    max_d: Annotated[Optional[float], typer.Option("--max-d", help="Limit on each layer's max |d| (default 1.0).")] = None,
    max_log_r: Annotated[Optional[float], typer.Option("--max-log-r", help="Limit on each layer's max |log r| (default 0.5).")] = None,
    layer_max_d: Annotated[list[str], typer.Option("--layer-max-d", help="Per-layer limit LAYER:VALUE (repeatable).")] = [],
    layer_max_log_r: Annotated[list[str], typer.Option("--layer-max-log-r", help="Per-layer limit LAYER:VALUE (repeatable).")] = [],
    enable: Annotated[list[str], typer.Option("--enable", help="Turn a rule on (repeatable): all_foldable, no_bn, fold_verified, ...")] = [],
    disable: Annotated[list[str], typer.Option("--disable", help="Turn a rule off (repeatable).")] = [],
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Samples per batch for the statistics.")] = None,
    provider: ProviderOpt = "cpu",
    html: HtmlOpt = None,
    fmt: Annotated[CheckFormat, typer.Option("--format", "-f", help="Output format on stdout.")] = CheckFormat.table,
) -> int:
    """CI gate: lint rules, statistics against thresholds and an optional baseline. Exit 0 pass, 1 fail, 2 input error."""
    from bnscope.report.check import emit_check
    from bnscope.workflows.check.config import load_config, with_overrides
    from bnscope.workflows.check.rules import check_model

    settings = with_overrides(load_config(config), enable=enable, disable=disable, max_d=max_d, max_log_r=max_log_r,
                              layer_max_d=_per_layer(layer_max_d, "--layer-max-d"),
                              layer_max_log_r=_per_layer(layer_max_log_r, "--layer-max-log-r"), batch_size=batch_size)
    result = check_model(model, settings, data=data, loader=loader, baseline=baseline, save_baseline=save_baseline,
                         provider=provider)
    emit_check(result, fmt.value, stdout)
    if html is not None:
        fold_result = None
        if settings.enabled("fold_verified") or settings.enabled("all_foldable"):
            from bnscope.workflows.fold import fold_model
            from bnscope.workflows.options import FoldSettings

            fold_result = fold_model(model, FoldSettings(output=None, dry_run=True))
        _write_html(html, stats=result.stats, inspect=result.inspect, fold=fold_result)
    return ExitCode.OK if result.passed else ExitCode.CHECK_FAILED


def _write_html(path: Path, **results) -> None:
    from bnscope.report.html import render_html, write_html

    write_html(path, render_html(**results, title=f"bnscope report: {path.stem}"))
    logging.getLogger("bnscope").info("wrote %s", path)


def _one_data_source(data, random, loader) -> None:
    given = [n for n, v in (("--data", data), ("--random", random), ("--loader", loader)) if v]
    if len(given) > 1:
        raise BnscopeError(f"{' and '.join(given)} given. Hint: choose one data source")


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="bnscope")


if __name__ == "__main__":  # pragma: no cover
    main()
