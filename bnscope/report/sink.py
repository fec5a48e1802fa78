"""The one output sink: ``emit(result, fmt, console)`` writes a workflow result on stdout.

Each renderer module registers the formats it writes for its result type with :func:`renders`:
``table`` (the default, printed through rich: styles, the terminal's width) and the text formats
(markdown, csv, junit), whose renderers return the text that is written as it is. JSON (the
result's ``to_dict()`` through :mod:`bnscope.schema`) is written here for every result: compact
(summary and per-layer figures) unless ``per_channel`` asks for the per-channel arrays of a result
that has them; its shape is ``bnscope/schemas/<command>.schema.json`` (docs/json.md). The CLI's
``--format`` choices are :func:`formats`, so a format is named once, where it is written.

Light to import (no numpy, onnx or onnxruntime): renderers name their result type by its class
name and import it only for type checking, so ``bnscope --help`` lists the choices without loading
the library.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

Render = Callable[..., object]
"""``table(result, console, **options)`` prints; any other format's ``render(result, **options)`` returns text."""

RENDERER_MODULES = ("inspect", "stats", "fold", "run", "recalibrate", "check", "providers", "quantize")
"""The modules of ``bnscope.report`` that register renderers."""

_RENDERERS: dict[str, dict[str, Render]] = {}


def renders(result_type: str, fmt: str) -> Callable[[Render], Render]:
    """Register the decorated function as the ``fmt`` renderer of results of class ``result_type``."""

    def register(render: Render) -> Render:
        _RENDERERS.setdefault(result_type, {})[fmt] = render
        return render

    return register


def formats(result_type: str) -> tuple[str, ...]:
    """The formats a ``result_type`` is written in: table (the default), json, then the others it registered."""
    return ("table", "json", *(f for f in _renderers(result_type) if f != "table"))


def emit(result, fmt: str, console, **options) -> None:
    """Write ``result`` on ``console`` (stdout) in ``fmt``; ``options`` (``per_channel``) go to its renderer."""
    from bnscope.report.common import print_raw
    from bnscope.report.text import single_line_strings

    if fmt != "json":
        result = single_line_strings(result)  # a name with a newline must not start a line
    if fmt == "json":
        from bnscope.schema import to_json

        wants = "per_channel" in inspect.signature(result.to_dict).parameters
        data = result.to_dict(per_channel=bool(options.get("per_channel"))) if wants else result.to_dict()
        print_raw(console, to_json(data))
    elif fmt == "table":
        _renderers(type(result).__name__)["table"](result, console, **options)
    else:
        print_raw(console, _renderers(type(result).__name__)[fmt](result, **options))


def _renderers(result_type: str) -> dict[str, Render]:
    if result_type not in _RENDERERS:
        for module in RENDERER_MODULES:
            importlib.import_module(f"bnscope.report.{module}")
    return _RENDERERS[result_type]
