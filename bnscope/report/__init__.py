"""Rendering of the workflows' results: table, JSON, Markdown, HTML. Nothing below imports it.

:func:`emit` is the one output sink; :func:`formats` the ``--format`` choices for a result type.
"""

from bnscope.report.sink import emit, formats

__all__ = ["emit", "formats", "write_html"]


def write_html(path, **results):
    """``--html FILE``: the HTML report of ``results`` (stats, inspect, fold), written atomically.
    Imported on use: the renderer pulls in the result types (and onnx)."""
    from bnscope.report.html import write_report

    return write_report(path, **results)
