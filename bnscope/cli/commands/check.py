"""``bnscope check``: the CI gate."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from bnscope.cli.app import guarded, stdout
from bnscope.cli.options import (
    DataOpt,
    HtmlOpt,
    LoaderOpt,
    ModelArg,
    ProviderOpt,
    format_choices,
    format_option,
    parse_per_layer,
)
from bnscope.errors import ExitCode

Format = format_choices("check")


@guarded
def check(
    model: ModelArg,
    data: DataOpt = None,
    loader: LoaderOpt = None,
    baseline: Annotated[
        Optional[Path], typer.Option("--baseline", help="Fail when statistics moved from this baseline.")
    ] = None,
    save_baseline: Annotated[
        Optional[Path], typer.Option("--save-baseline", help="Write this model's baseline (params and stats).")
    ] = None,
    config: Annotated[
        Optional[Path],
        typer.Option(
            "--config",
            help="bnscope.toml or pyproject.toml ([tool.bnscope]); default: ./bnscope.toml or ./pyproject.toml.",
        ),
    ] = None,
    max_d: Annotated[
        Optional[float], typer.Option("--max-d", help="Limit on each layer's max |d| (default 1.0).")
    ] = None,
    max_log_r: Annotated[
        Optional[float], typer.Option("--max-log-r", help="Limit on each layer's max |log r| (default 0.5).")
    ] = None,
    layer_max_d: Annotated[
        list[str], typer.Option("--layer-max-d", help="Per-layer limit LAYER:VALUE (repeatable).")
    ] = [],
    layer_max_log_r: Annotated[
        list[str], typer.Option("--layer-max-log-r", help="Per-layer limit LAYER:VALUE (repeatable).")
    ] = [],
    enable: Annotated[
        list[str], typer.Option("--enable", help="Turn a rule on (repeatable): all_foldable, no_bn, fold_verified, ...")
    ] = [],
    disable: Annotated[list[str], typer.Option("--disable", help="Turn a rule off (repeatable).")] = [],
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", "-b", help="Samples per batch for the statistics.")
    ] = None,
    provider: ProviderOpt = "cpu",
    html: HtmlOpt = None,
    fmt: Annotated[Format, format_option()] = Format.table,
) -> int:
    """CI gate: lint rules, statistics against thresholds and an optional baseline. Exit 0 pass, 1 fail, 2 input error."""
    from bnscope.report.check import emit_check
    from bnscope.workflows.check.config import load_config, with_overrides
    from bnscope.workflows.check.rules import check_model

    settings = with_overrides(
        load_config(config),
        enable=enable,
        disable=disable,
        max_d=max_d,
        max_log_r=max_log_r,
        layer_max_d=parse_per_layer(layer_max_d, "--layer-max-d"),
        layer_max_log_r=parse_per_layer(layer_max_log_r, "--layer-max-log-r"),
        batch_size=batch_size,
    )
    result = check_model(
        model, settings, data=data, loader=loader, baseline=baseline, save_baseline=save_baseline, provider=provider
    )
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
