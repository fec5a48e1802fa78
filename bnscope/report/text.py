"""Untrusted text on a terminal: names from a model are shown as text, never as markup or escapes.

A node may be named ``"\\x1b]0;pwned\\x07"`` (an OSC title) or ``"[bold red]x[/]"``: printed raw the
first drives the terminal and the second renders as markup, so a report could name a layer that
is not in the model. :class:`SafeConsole` interprets no markup unless a call asks for it, and
escapes control characters (C0, DEL, C1, and the bidirectional overrides) in every piece of text it
writes, whatever renderable it came from; its own styles and cursor controls are kept.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from rich.console import Console
from rich.segment import Segment

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with control characters written as escapes (``\\x1b``, ``\\u202e``); tabs and newlines
    are kept."""
    return _UNSAFE.sub(_escape, str(text))


def one_line(text: str) -> str:
    """``printable(text)`` on one line: newlines and tabs become spaces (for error messages)."""
    return printable(" ".join(str(text).split()))


class OutputClosed(Exception):
    """The reader of stdout went away (``bnscope stats ... | head``): stop quietly."""


class SafeConsole(Console):
    """A ``rich`` console that interprets no markup by default and escapes control characters."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("markup", False)
        super().__init__(**kwargs)

    def on_broken_pipe(self) -> None:
        # rich's default raises SystemExit(1); a closed pipe is the reader's choice, not an error.
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.file.fileno())
        raise OutputClosed

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        # rich's own cursor movements are control segments; everything else is text to show.
        safe = (seg if seg.control else Segment(printable(seg.text), seg.style, seg.control) for seg in buffer)
        return super()._render_buffer(safe)
