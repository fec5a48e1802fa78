"""``bnscope check``: the CI gate."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from bnscope import report
from bnscope.cli.app import guarded, stdout
from bnscope.cli.options import (
    BatchSizeOpt,
    DataOpt,
    EpLibraryOpt,
    HtmlOpt,
    LoaderOpt,
    MaxBatchesOpt,
    ProviderOpt,
    data_choice,
    format_choices,
    format_option,
    limit,
    parse_per_layer,
    register_ep_libraries,
)
from bnscope.errors import BnscopeError, ExitCode

Format = format_choices("CheckResult")


@guarded
def check(
    models: Annotated[
        list[Path],
        typer.Argument(
            metavar="MODEL",
            help="ONNX model files; each gets its own result (a pre-commit hook passes several).",
            show_default=False,
        ),
    ],
    data: DataOpt = None,
    loader: LoaderOpt = None,
    baseline: Annotated[
        Optional[Path],
        typer.Option("--baseline", metavar="FILE", help="Fail when statistics moved from this baseline."),
    ] = None,
    save_baseline: Annotated[
        Optional[Path],
        typer.Option("--save-baseline", metavar="FILE", help="Write this model's baseline (params and stats)."),
    ] = None,
    config: Annotated[
        Optional[Path],
        typer.Option(
            "--config",
            metavar="FILE",
            help="bnscope.toml or pyproject.toml ([tool.bnscope]); default: ./bnscope.toml or ./pyproject.toml.",
        ),
    ] = None,
    max_layer_d: Annotated[
        Optional[float],
        typer.Option(
            "--max-layer-d",
            metavar="D",
            callback=limit,
            help="Limit on each layer's worst channel |d| (default 1.0; rule max_d).",
        ),
    ] = None,
    max_layer_log_r: Annotated[
        Optional[float],
        typer.Option(
            "--max-layer-log-r",
            metavar="LOG_R",
            callback=limit,
            help="Limit on each layer's worst channel |log r| (default 0.5; rule max_log_r).",
        ),
    ] = None,
    old_max_d: Annotated[Optional[float], typer.Option("--max-d", metavar="D", hidden=True, callback=limit)] = None,
    old_max_log_r: Annotated[
        Optional[float], typer.Option("--max-log-r", metavar="LOG_R", hidden=True, callback=limit)
    ] = None,
    layer_max_d: Annotated[
        list[str],
        typer.Option("--layer-max-d", metavar="LAYER:D", help="--max-layer-d for one layer: LAYER:VALUE (repeatable)."),
    ] = [],
    layer_max_log_r: Annotated[
        list[str],
        typer.Option(
            "--layer-max-log-r",
            metavar="LAYER:LOG_R",
            help="--max-layer-log-r for one layer: LAYER:VALUE (repeatable).",
        ),
    ] = [],
    enable: Annotated[
        list[str],
        typer.Option(
            "--enable", metavar="RULE", help="Turn a rule on (repeatable): all_foldable, no_bn, fold_verified, ..."
        ),
    ] = [],
    disable: Annotated[list[str], typer.Option("--disable", metavar="RULE", help="Turn a rule off (repeatable).")] = [],
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Fail on unsure layers too (over a limit only within the noise); config key strict."
        ),
    ] = False,
    batch_size: BatchSizeOpt = None,
    max_batches: MaxBatchesOpt = None,
    provider: ProviderOpt = "cpu",
    ep_library: EpLibraryOpt = [],
    html: HtmlOpt = None,
    fmt: Annotated[Format, format_option(Format)] = Format.table,
) -> int:
    """CI gate: lint rules, statistics against thresholds and an optional baseline. Exit 0 pass, 1 fail, 2 input error.

    Several models are checked one after the other in one process, each against the same rules, data and
    configuration; the report has one result per model, and the exit code is 1 when any model fails. A
    model that cannot be checked (missing, corrupt, wrong inputs for the data) is an input error naming it,
    and nothing is printed.
    """
    from bnscope.workflows.check.config import load_config, with_overrides
    from bnscope.workflows.check.result import CheckResults
    from bnscope.workflows.check.rules import check_model

    configs = (
        {"the config": config} if config else {f"the config {n}": Path(n) for n in ("bnscope.toml", "pyproject.toml")}
    )
    config_files = {k: p for k, p in configs.items() if p.exists()}
    _one_model_options(models, baseline=baseline, save_baseline=save_baseline, html=html)
    register_ep_libraries(ep_library, config)

    settings = with_overrides(
        load_config(config),
        enable=enable,
        disable=disable,
        max_layer_d=_renamed(old_max_d, "--max-d", max_layer_d, "--max-layer-d"),
        max_layer_log_r=_renamed(old_max_log_r, "--max-log-r", max_layer_log_r, "--max-layer-log-r"),
        layer_max_d=parse_per_layer(layer_max_d, "--layer-max-d"),
        layer_max_log_r=parse_per_layer(layer_max_log_r, "--layer-max-log-r"),
        strict=strict or None,
    )
    choice = data_choice(data, loader=loader, batch_size=batch_size, max_batches=max_batches)
    results = []
    for model in models:
        with _naming(model, several=len(models) > 1):
            results.append(
                check_model(
                    model,
                    settings,
                    data=choice,
                    baseline=baseline,
                    save_baseline=save_baseline,
                    provider=provider,
                    fold_for_report=html is not None,
                    html=html,
                    inputs=config_files,
                )
            )
    from bnscope.workflows.stats import unsure_warning

    for result in results:
        warning = unsure_warning(result.unsure(), settings.strict)
        if warning:
            logging.getLogger("bnscope").warning("%s%s", f"{result.model}: " if len(results) > 1 else "", warning)
    report.emit(results[0] if len(results) == 1 else CheckResults(tuple(results)), fmt.value, stdout)
    if html is not None:
        (result,) = results
        report.write_html(html, stats=result.stats, inspect=result.inspect, fold=result.fold)
    return ExitCode.OK if all(r.passed for r in results) else ExitCode.CHECK_FAILED


def _one_model_options(models: list[Path], **values: Path | None) -> None:
    """A baseline and an HTML report describe one model: with several, each is an input error."""
    given = [f"--{name.replace('_', '-')}" for name, value in values.items() if value is not None]
    if len(models) > 1 and given:
        raise BnscopeError(
            f"{' and '.join(given)} {'describes' if len(given) == 1 else 'describe'} one model, but {len(models)} models were given. "
            f"Hint: run bnscope check once per model with {given[0]}"
        )


@contextlib.contextmanager
def _naming(model: Path, *, several: bool):
    """With several models, an input error says which model it is about (same exit code)."""
    try:
        yield
    except BnscopeError as exc:
        if not several or str(model) in str(exc):
            raise
        raise type(exc)(f"{model}: {exc}") from None


def _renamed(old_value: float | None, old: str, value: float | None, new: str) -> float | None:
    """check's old spelling of a layer limit: still read, with a one-line warning (stats's
    ``--max-d`` is a per-channel limit; check's is a limit on each layer's worst channel)."""
    if old_value is None:
        return value
    if value is not None:
        raise BnscopeError(f"both {old} and {new} given. Hint: keep {new} ({old} is its deprecated name in check)")
    logging.getLogger(__name__).warning(
        "check %s is deprecated; use %s (the limit on each layer's worst channel)", old, new
    )
    return old_value
