"""Import onnxruntime with its own start-up log lines kept off the user's stderr.

onnxruntime's C++ logger writes straight to file descriptor 2 while the module is imported, e.g.
``[W:onnxruntime:Default, telemetry_1ds.cc] Failed to persist telemetry device ID`` (coloured)
when ``HOME`` is not writable. The CLI imports it through :func:`import_onnxruntime_quietly` before
a command runs: such lines go to bnscope's debug log (``-vv``); anything else written meanwhile is
passed on. The library never calls it (importing bnscope touches no file descriptor): a program
that imports bnscope sees onnxruntime's lines as it would without bnscope.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import tempfile

logger = logging.getLogger(__name__)

_ORT_LINE = re.compile(r"\[[VIWEF]:onnxruntime:")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def import_onnxruntime_quietly() -> None:
    """Import onnxruntime (once) with fd 2 captured; its own log lines become debug messages."""
    if "onnxruntime" in sys.modules:
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2
        importlib.import_module("onnxruntime")
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            importlib.import_module("onnxruntime")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            _pass_on(sink.read().decode("utf-8", "replace"))


def _pass_on(text: str) -> None:
    for line in text.splitlines(keepends=True):
        plain = _ANSI.sub("", line).strip()
        if _ORT_LINE.search(plain):
            logger.debug("onnxruntime: %s", plain)
        elif plain:
            os.write(2, line.encode())
