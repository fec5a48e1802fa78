"""Options shared by several commands, as ``Annotated`` aliases, and their parsing.

Format choices come from the renderers (``report.formats``), modes, strategies and methods from
``bnscope.choices``: each is defined once, and none of them imports onnx or onnxruntime (``--help``
stays fast; the commands import the library inside their functions).
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from bnscope import report
from bnscope.errors import BnscopeError


def format_choices(result_type: str) -> type[Enum]:
    """A str enum of the formats ``result_type`` (a result class name) is written in, for typer's choices."""
    return Enum(result_type.removesuffix("Result") + "Format", {f: f for f in report.formats(result_type)}, type=str)


class FailOn(str, Enum):
    warning = "warning"
    error = "error"
    never = "never"


def choices(enum: type[Enum]) -> str:
    """An option's placeholder for a choice: ``eval|train``."""
    return "|".join(member.value for member in enum)


def format_option(formats: type[Enum]):
    """``--format/-f FORMAT``, FORMAT one of the command's formats."""
    return typer.Option("--format", "-f", metavar=choices(formats), help="Output format on stdout.")


ModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help="The ONNX model file.", show_default=False)]


def data_option(what: str):
    """``--data/-d PATH``, described for the command: calibration data, verification inputs, ..."""
    return typer.Option(
        "--data", "-d", metavar="PATH", help=f"{what}: .npz/.npy/.pb file, or a folder of them or of images."
    )


DataOpt = Annotated[Optional[Path], data_option("Calibration data")]
RandomOpt = Annotated[
    bool, typer.Option("--random", help="Seeded random inputs shaped from the model (says nothing about real data).")
]
LoaderOpt = Annotated[
    Optional[str],
    typer.Option(
        "--loader",
        metavar="FILE.PY:FUNC",
        help="A Python data loader 'file.py:func' yielding feed dicts (runs that code).",
    ),
]
ProviderOpt = Annotated[
    str,
    typer.Option(
        "--provider",
        "-p",
        metavar="NAME[:DEVICE]",
        help="Execution provider, built-in or plugin, with an optional device: cpu, cuda, cuda:1, tensorrt, "
        "openvino:gpu, auto, or an onnxruntime EP name (see `bnscope providers`).",
    ),
]
AllowFallbackOpt = Annotated[
    bool,
    typer.Option(
        "--allow-fallback",
        help="Accept onnxruntime running on CPU when the provider fails to load, or running compute nodes "
        "on CPU that the provider does not take (a warning instead of an error).",
    ),
]
EpLibraryOpt = Annotated[
    list[str],
    typer.Option(
        "--ep-library",
        metavar="NAME=PATH",
        help="Register a plugin EP library NAME=PATH (repeatable); installed onnxruntime-ep-* packages are "
        "registered too (a config file's ep_libraries only when named with --config).",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="N", help="Seed for --random.")]
BatchSizeOpt = Annotated[
    Optional[int],
    typer.Option(
        "--batch-size", "-b", metavar="N", help="Samples per batch (default: the model's fixed batch size, else 32)."
    ),
]
MaxBatchesOpt = Annotated[
    Optional[int], typer.Option("--max-batches", metavar="N", min=1, help="Stop after this many batches.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Allow OUT to be the input model.")]
RayOpt = Annotated[
    Optional[str],
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        help="Run the batches on a Ray cluster: local starts one in this process; else a Ray address such as "
        'auto or ray://head:10001. Needs pip install "bnscope[ray]"; --data may then also be s3://... or parquet.',
    ),
]
WorkersOpt = Annotated[
    int,
    typer.Option("--workers", min=1, metavar="N", help="With --ray: actors, one onnxruntime session (and GPU) each."),
]


def cluster_options(address: Optional[str], workers: int):
    """``--ray``/``--workers`` -> ClusterOptions, or None without ``--ray``; exit 2 without Ray."""
    if address is None:
        return None
    from bnscope.distributed import ClusterOptions, require_ray

    require_ray()
    return ClusterOptions(address=address, workers=workers)


HtmlOpt = Annotated[
    Optional[Path],
    typer.Option("--html", metavar="FILE", help="Also write a self-contained HTML report (charts) to this file."),
]


def register_ep_libraries(values: list[str], config: Optional[Path] = None) -> None:
    """``--ep-library NAME=PATH`` (and the ``ep_libraries`` of check's ``--config FILE``): registered before
    the command creates sessions (registration is process-wide). A library given here that onnxruntime
    cannot register is an input error, whichever provider the command uses."""
    if values or config is not None:
        from bnscope.runtime.plugins import parse_ep_libraries, register_plugins

        for library in register_plugins(parse_ep_libraries(values), config=config):
            if library.error and library.source == "--ep-library":
                raise BnscopeError(
                    f"--ep-library {library.name}={library.path} was not registered: {library.error}. "
                    "Hint: give the path of the EP's shared library; `bnscope providers --ep-library ...` shows it"
                )


def limit(value: float | None) -> float | None:
    """typer callback: a threshold or tolerance is a finite number >= 0 (NaN and -1 are refused)."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"{value} is not a finite number >= 0")
    return value


def fraction(value: float | None) -> float | None:
    """typer callback: a fraction between 0 and 1."""
    if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
        raise typer.BadParameter(f"{value} is not a fraction between 0 and 1")
    return value


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
        if not sep or not name:
            raise BnscopeError(f"{option} {item!r} is not LAYER:NUMBER. Hint: e.g. {option} conv1_bn:3")
        if not (math.isfinite(out[name]) and out[name] >= 0):
            raise BnscopeError(f"{option} {item!r}: the limit must be a finite number >= 0. Hint: e.g. {name}:3")
    return out


def one_data_source(data, random, loader) -> None:
    given = [n for n, v in (("--data", data), ("--random", random), ("--loader", loader)) if v]
    if len(given) > 1:
        raise BnscopeError(f"{' and '.join(given)} given. Hint: choose one data source")
