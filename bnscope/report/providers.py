"""Rendering of ``providers`` results: table and JSON."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnscope.report.sink import renders

if TYPE_CHECKING:
    from bnscope.runtime.probe import ProvidersResult


@renders("ProvidersResult", "table")
def _providers_table(result: ProvidersResult, console: Console) -> None:
    installed = ", ".join(f"{n} {v}" for n, v in result.distributions) or "none found by pip"
    console.print(
        Text.assemble(("onnxruntime: ", "bold"), f"{result.package} {result.version} (installed: {installed})")
    )
    table = Table(header_style="bold")
    for col in ("provider", "kind", "devices", "usable", "reason"):
        table.add_column(col, overflow="fold")
    for p in result.providers:
        devices = ", ".join(f"{d.index}: {d.type} {d.vendor}" for d in p.devices) or "-"
        usable = Text("yes", style="green") if p.usable else Text("no", style="bold red")
        table.add_row(p.name, p.kind, devices, usable, p.reason or "")
    console.print(table)
    for p in result.providers:
        if not p.usable and p.fix:
            console.print(f"{p.name}: fix: {p.fix}", highlight=False, soft_wrap=True)
        if p.library:
            console.print(f"{p.name}: library {p.library}", highlight=False, soft_wrap=True)
    for lib in result.libraries:
        if lib.error:
            console.print(f"plugin library {lib.name} ({lib.source}) not registered: {lib.error}", highlight=False)
        elif not lib.ep_names:
            console.print(
                f"plugin library {lib.name} ({lib.source}) registered, but it offers no device here, "
                "so onnxruntime does not say which EPs it holds",
                highlight=False,
            )
