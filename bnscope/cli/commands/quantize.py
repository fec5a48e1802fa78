"""``bnscope quantize``: fold, plan the fewest 16-bit tensors from the BN statistics, write a QDQ model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from bnscope.cli.app import guarded, stderr, stdout
from bnscope.cli.options import ModelArg, data_choice, data_option, format_choices, format_option
from bnscope.errors import ExitCode

Format = format_choices("QuantizeResult")


@guarded
def quantize(
    model: ModelArg,
    data: Annotated[Path, data_option("Calibration data, a part held out")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT", help="Where to write the QDQ model.")],
    eval_data: Annotated[
        Optional[Path],
        typer.Option(
            "--eval-data", metavar="PATH", help="Data to report the SQNR on (default: the held-out part of --data)."
        ),
    ] = None,
    target_sqnr: Annotated[
        float, typer.Option("--target-sqnr", metavar="DB", help="Mean output SQNR in dB the plan must reach.")
    ] = 18.0,
    per_channel: Annotated[
        bool, typer.Option("--per-channel/--per-tensor", help="int8 weight scales per output channel or per tensor.")
    ] = True,
    no_equalize: Annotated[
        bool, typer.Option("--no-equalize", help="Skip the exact cross-layer equalisation.")
    ] = False,
    holdout: Annotated[
        float,
        typer.Option("--holdout", metavar="FRACTION", help="Fraction of --data batches held out to measure the plan."),
    ] = 0.25,
    batch_size: Annotated[
        Optional[int],
        typer.Option("--batch-size", "-b", metavar="N", help="Samples per batch (default: the model's, else 1)."),
    ] = None,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Skip timing float vs QDQ.")] = False,
    fmt: Annotated[Format, format_option(Format)] = Format.table,
) -> int:
    """Fold BN, rank layers by int8 risk from their BN statistics, put the fewest tensors at 16 bits to reach
    --target-sqnr (measured), and write a standard QDQ model (onnxruntime.quantization)."""
    from bnscope import report
    from bnscope.workflows.quantize import QuantizeSettings, quantize_model

    settings = QuantizeSettings(
        output=output,
        data=data_choice(data, batch_size=batch_size),
        eval_data=eval_data,
        target_sqnr_db=target_sqnr,
        per_channel=per_channel,
        equalize=not no_equalize,
        holdout=holdout,
        latency=not no_latency,
    )
    result = quantize_model(model, settings, progress=_progress)
    report.emit(result, fmt.value, stdout)
    return ExitCode.OK if result.reached else ExitCode.CHECK_FAILED


def _progress(text: str) -> None:
    """One line per step on stderr, unless -q."""
    if logging.getLogger("bnscope").getEffectiveLevel() <= logging.WARNING:
        stderr.print(f"quantize: {text}", highlight=False, soft_wrap=True)
