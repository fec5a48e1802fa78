"""bnscope's table of a TOML configuration file, read one way for every caller (check's settings,
plugin libraries): the ``[tool.bnscope]`` table, else the whole file, except a ``pyproject.toml``
without that table (it configures nothing). Bad files are one-line input errors."""

from __future__ import annotations

import sys
from pathlib import Path

from bnscope.errors import BnscopeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_bnscope_table(path: Path) -> dict | None:
    """The bnscope settings of the TOML file ``path``, or None for a pyproject.toml without them.

    Raises:
        BnscopeError: not TOML, nested too deeply, unreadable, or ``[tool] bnscope`` not a table.
    """
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BnscopeError(f"{path} is not valid TOML ({exc}). Hint: fix the syntax") from None
    except RecursionError:
        raise BnscopeError(
            f"{path} is not valid TOML (it nests tables or arrays too deeply to read). Hint: flatten it"
        ) from None
    except OSError as exc:
        raise BnscopeError(f"cannot read {path} ({exc.strerror or exc}). Hint: check its permissions") from None
    tool = data.get("tool")
    if isinstance(tool, dict) and "bnscope" in tool:
        table = tool["bnscope"]
        if not isinstance(table, dict):
            raise BnscopeError(
                f"{path}: [tool] bnscope = {table!r} must be a table. Hint: write a [tool.bnscope] table"
            )
        return table
    return data if path.name != "pyproject.toml" else None
