"""Rendering of the workflows' results: table, JSON, Markdown, HTML. Nothing below imports it.

:func:`emit` is the one output sink; :func:`formats` the ``--format`` choices for a result type.
"""

from bnscope.report.sink import emit, formats

__all__ = ["emit", "formats"]
