"""Helpers every renderer uses: number formatting, Markdown tables, raw printing, severity styles.

Renderers register their formats with :mod:`bnscope.report.sink`, which writes them on stdout
(and JSON from :mod:`bnscope.schema`).
"""

from __future__ import annotations

import math

from rich.console import Console

from bnscope.report.text import printable

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan", None: "green"}


def short_float(x: float | None) -> str:
    """Shortest text for a float32 attribute (1e-05, not 9.999999747378752e-06)."""
    import numpy as np  # on use: importing the renderers (for the --format choices) stays light

    return "-" if x is None else str(np.float32(x))


def general_float(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(text: str) -> str:
    """A text cell for CSV that a spreadsheet shows as text: one starting like a formula (``=``, ``+``,
    ``-``, ``@``, tab, CR: OWASP's list) gets a leading ``'``, so ``=HYPERLINK(...)`` stays a name."""
    text = str(text)
    return "'" + text if text.startswith(_FORMULA_START) else text


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(md_escape(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def print_raw(console: Console, text: str) -> None:
    """Machine formats, written as they are but with control characters escaped (names from a model
    may hold them; JSON escapes them itself, so JSON is unchanged)."""
    if hasattr(console, "write_raw"):
        console.write_raw(printable(text) + "\n")
    else:
        console.file.write(printable(text) + "\n")
        console.file.flush()
