"""Execution-provider setup a command asks for before its run: plugin EP libraries, the provider list,
the onnxruntime build. The CLI reaches the runtime layer only through here (an import-linter contract
keeps it so). Only :mod:`bnscope.runtime.quiet` is imported with this module: the CLI imports onnxruntime
through it (fd 2 captured) before anything else here imports onnxruntime."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from bnscope.errors import BnscopeError
from bnscope.runtime.quiet import import_onnxruntime_quietly

if TYPE_CHECKING:
    from bnscope.runtime.probe import ProvidersResult

__all__ = [
    "distinct_providers",
    "import_onnxruntime_quietly",
    "list_providers",
    "ort_distribution",
    "register_ep_libraries",
]


def ort_distribution() -> tuple[str, str]:
    """The onnxruntime package imported and its version (``bnscope --version``)."""
    from bnscope.runtime.providers import ort_distribution as distribution

    return distribution()


def distinct_providers(names: Iterable[str], *, first: str = "cpu") -> tuple[str, ...]:
    """``first``, then each of ``names`` that asks onnxruntime for something else, each checked."""
    from bnscope.runtime.selection import distinct_providers as distinct

    return distinct(names, first=first)


def register_ep_libraries(values: list[str], config: str | os.PathLike | None = None) -> None:
    """``--ep-library NAME=PATH`` (and the ``ep_libraries`` of ``--config FILE``): registered before the
    command creates sessions (registration is process-wide). A library given with ``--ep-library`` that
    onnxruntime cannot register is an input error, whichever provider the command uses."""
    from bnscope.runtime.plugins import parse_ep_libraries, register_plugins

    if not values and config is None:
        return
    for library in register_plugins(parse_ep_libraries(values), config=config):
        if library.error and library.source == "--ep-library":
            raise BnscopeError(
                f"--ep-library {library.name}={library.path} was not registered: {library.error}. "
                "Hint: give the path of the EP's shared library; `bnscope providers --ep-library ...` shows it"
            )


def list_providers(ep_library: list[str], config: str | os.PathLike | None = None) -> ProvidersResult:
    """``bnscope providers``: every built-in and plugin EP, each tried with a tiny session."""
    from bnscope.runtime.plugins import parse_ep_libraries
    from bnscope.runtime.probe import probe_providers

    return probe_providers(parse_ep_libraries(ep_library), config=config)
