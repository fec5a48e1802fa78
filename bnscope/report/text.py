"""Untrusted text on a terminal: names from a model are shown as text, never as markup or escapes.

A node may be named ``"\\x1b]0;pwned\\x07"`` (an OSC title) or ``"[bold red]x[/]"``: printed raw the
first drives the terminal and the second renders as markup, so a report could name a layer that
is not in the model. :class:`SafeConsole` interprets no markup unless a call asks for it, and
escapes control characters (C0, DEL, C1, and the bidirectional overrides) in every piece of text it
writes, whatever renderable it came from; its own styles and cursor controls are kept.

A name may also hold a newline (``"in\\nerror: model is corrupt"``): printed as it is, it starts a
line of its own that reads as the tool's. :func:`single_line_strings` gives every text format a copy
of its result in which every string (names, paths, messages) is one line, its line breaks written
as ``\\n``; the renderers' own line breaks are the only ones left. JSON escapes them itself.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from pathlib import PurePath

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


_LINE_BREAKS = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSAFE_INLINE = re.compile("[\t\n\r" + _UNSAFE.pattern[1:])


def _escape_inline(match: re.Match) -> str:
    return _LINE_BREAKS.get(match.group()) or _escape(match)


def single_line(text: str) -> str:
    """``printable(text)`` with line breaks and tabs escaped too (``\\n``): a name in a table or a
    CSV row never starts a line of its own."""
    return _UNSAFE_INLINE.sub(_escape_inline, str(text))


def single_line_strings(value):
    """A copy of ``value`` (a result dataclass, and the tuples, lists and dicts in it) in which every
    string and path is :func:`single_line`; other values are shared, and an object with nothing to
    change is returned as it is."""
    if isinstance(value, str):
        text = single_line(value)
        return value if text == value else text
    if isinstance(value, PurePath):
        text = str(value)
        return value if single_line(text) == text else type(value)(single_line(text))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for f in dataclasses.fields(value):
            if f.init:
                old = getattr(value, f.name)
                new = single_line_strings(old)
                if new is not old:
                    changes[f.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    if isinstance(value, (list, tuple)):
        items = [single_line_strings(v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        items = {single_line_strings(k): single_line_strings(v) for k, v in value.items()}
        same = len(items) == len(value) and all(a is b and items[a] is value[a] for a, b in zip(items, value))
        return value if same else type(value)(items)
    return value


def one_line(text: str) -> str:
    """``printable(text)`` on one line: newlines and tabs become spaces (for error messages)."""
    return printable(" ".join(str(text).split()))


class OutputClosed(Exception):
    """The reader of stdout went away (``bnscope stats ... | head``): stop quietly."""


class OutputFailed(Exception):
    """stdout or stderr cannot be written (``> /dev/full``, a full disk, a revoked terminal)."""

    def __init__(self, exc: OSError, name: str = "stdout") -> None:
        super().__init__(
            f"cannot write to {name} ({exc.strerror or exc}). Hint: check free space, or redirect it elsewhere"
        )


# Where the output's encoding cannot hold a symbol of bnscope's own, an ASCII stand-in is printed (as
# rich draws its tables with ASCII there); any other character a name holds is written as a backslash
# escape (``\u0416``, the CLI sets errors="backslashreplace"), so a name stays recoverable and no
# output fails to encode.
_ASCII_SUBSTITUTES = {"\u00b1": "+/-", "\u2026": "...", "\u2192": "->"}


def for_encoding(text: str, encoding: str | None) -> str:
    """``text`` with bnscope's symbols replaced by ASCII where ``encoding`` is not a Unicode one."""
    if not encoding or encoding.lower().replace("-", "").replace("_", "").startswith("utf"):
        return text
    for symbol, plain in _ASCII_SUBSTITUTES.items():
        text = text.replace(symbol, plain)
    return text


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
        encoding = self.encoding
        safe = (
            seg if seg.control else Segment(for_encoding(printable(seg.text), encoding), seg.style, seg.control)
            for seg in buffer
        )
        return super()._render_buffer(safe)

    def _check_buffer(self) -> None:
        try:
            super()._check_buffer()
        except BrokenPipeError:
            raise
        except OSError as exc:
            self.quiet = True  # nothing more can be written there
            raise OutputFailed(exc, "stderr" if self.stderr else "stdout") from None

    def write_raw(self, text: str) -> None:
        """Machine formats (JSON, CSV, Markdown): written as they are, symbols fitted to the encoding."""
        try:
            self.file.write(for_encoding(text, self.encoding))
            self.file.flush()
        except BrokenPipeError:
            self.on_broken_pipe()
        except OSError as exc:
            self.quiet = True
            raise OutputFailed(exc, "stderr" if self.stderr else "stdout") from None
