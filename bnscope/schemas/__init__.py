"""JSON Schemas (draft 2020-12) of every command's ``--format json`` output, shipped with the package.

``stats.schema.json`` also describes ``merge``; ``check.schema.json`` one model (``check MODEL``) or
several (``check MODEL...``). docs/json.md documents them; tests/test_json_schemas.py validates real
output of every command against them.
"""

from __future__ import annotations

import json
from importlib import resources

COMMANDS = ("inspect", "stats", "fold", "check", "run", "recalibrate", "providers", "quantize")
"""The commands with a schema; ``merge`` writes what ``stats`` writes."""


def schema(command: str) -> dict:
    """The JSON Schema of ``bnscope COMMAND --format json`` (``merge``: the ``stats`` schema)."""
    name = "stats" if command == "merge" else command
    if name not in COMMANDS:
        raise KeyError(f"no schema for {command!r}; commands: {', '.join(COMMANDS)}")
    return json.loads(resources.files(__name__).joinpath(f"{name}.schema.json").read_text(encoding="utf-8"))
