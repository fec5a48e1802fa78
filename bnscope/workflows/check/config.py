"""``check``'s configuration: ``[tool.bnscope]`` in pyproject.toml or a bnscope.toml, validated,
then overridden by what the command line gives.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from bnscope.errors import BnscopeError
from bnscope.onnxio.config_file import read_bnscope_table
from bnscope.onnxio.outputs import check_input_file

log = logging.getLogger(__name__)

RULES = {
    "no_nonfinite": True,
    "no_never_updated": True,
    "no_training_mode": True,
    "max_d": True,
    "max_log_r": True,
    "all_foldable": False,
    "no_bn": False,
    "fold_verified": False,
    "baseline": True,
}


@dataclass(frozen=True)
class CheckConfig:
    """Rule switches and limits. ``max_layer_d``/``max_layer_log_r`` bound each layer's worst
    channel (the rules ``max_d``/``max_log_r``); ``layer_max_d``/``layer_max_log_r`` override them
    for named layers. Not ``stats``'s ``--max-d``, which is a limit on every channel."""

    rules: dict = field(default_factory=lambda: dict(RULES))
    max_layer_d: float = 1.0
    max_layer_log_r: float = 0.5
    layer_max_d: dict = field(default_factory=dict)
    layer_max_log_r: dict = field(default_factory=dict)
    baseline_tolerance: float = 1e-3
    baseline_batch_tolerance: float = 0.1
    batch_size: int | None = None  # None: the model's fixed batch size, else 32
    max_batches: int | None = None
    strict: bool = False  # unsure layers (beyond a limit only within the noise) fail too

    def enabled(self, rule: str) -> bool:
        return bool(self.rules.get(rule, False))


# -- configuration ---------------------------------------------------------------------------------
_KEYS = {
    "max_layer_d",
    "max_layer_log_r",
    "layer_max_d",
    "layer_max_log_r",
    "baseline_tolerance",
    "baseline_batch_tolerance",
    "batch_size",
    "max_batches",
    "rules",
    "strict",
    "ep_libraries",  # plugin EP libraries, read by bnscope.runtime.plugins
}
# the old names (they read like stats's per-channel --max-d): still read, with a warning
DEPRECATED_KEYS = {"max_d": "max_layer_d", "max_log_r": "max_layer_log_r"}


def load_config(path: str | os.PathLike | None = None, cwd: str | os.PathLike = ".") -> CheckConfig:
    """``--config FILE``, else ./bnscope.toml, else ./pyproject.toml's [tool.bnscope], else defaults."""
    candidates = [Path(path)] if path else [Path(cwd) / "bnscope.toml", Path(cwd) / "pyproject.toml"]
    for candidate in candidates:
        if path:
            check_input_file(candidate, "config file", "check the path")
        elif not candidate.is_file():
            continue
        table = read_bnscope_table(candidate)
        if table is not None:
            if not path and "ep_libraries" in table:
                log.warning(
                    "%s: ep_libraries not loaded: plugin libraries load only from a file named with --config "
                    "(a file in the working directory may come with a cloned repository)",
                    candidate,
                )
            return config_from_table(table, candidate)
        if path:  # asked for by name: a pyproject.toml without our table configures nothing
            raise BnscopeError(
                f"{candidate} has no [tool.bnscope] table, so --config would change nothing. "
                "Hint: add a [tool.bnscope] table, or leave out --config for the defaults"
            )
    return CheckConfig()


def config_from_table(table: dict, source: Path | str = "config") -> CheckConfig:
    table = _renamed_keys(table, source)
    unknown = set(table) - _KEYS
    if unknown:
        raise BnscopeError(f"{source}: unknown bnscope setting(s) {sorted(unknown)}. Hint: known: {sorted(_KEYS)}")
    _check_types(table, source)
    rules = dict(RULES)
    for rule, on in table.get("rules", {}).items():
        if rule not in RULES:
            raise BnscopeError(f"{source}: unknown rule {rule!r}. Hint: rules are {', '.join(RULES)}")
        if not isinstance(on, bool):
            raise BnscopeError(f"{source}: rules.{rule} = {on!r} must be true or false. Hint: e.g. {rule} = false")
        rules[rule] = on
    values = {k: v for k, v in table.items() if k not in ("rules", "ep_libraries")}
    return CheckConfig(rules=rules, **values)


def _renamed_keys(table: dict, source) -> dict:
    """The deprecated spellings of the layer limits under their new names (one warning each)."""
    table = dict(table)
    for old, new in DEPRECATED_KEYS.items():
        if old not in table:
            continue
        if new in table:
            raise BnscopeError(f"{source}: both {old} and {new} are set. Hint: keep {new} ({old} is its old name)")
        log.warning("%s: %s is deprecated; use %s (the limit on each layer's worst channel)", source, old, new)
        table[new] = table.pop(old)
    return table


_NUMBER_KEYS = ("max_layer_d", "max_layer_log_r", "baseline_tolerance", "baseline_batch_tolerance")


def _check_types(table: dict, source) -> None:
    def bad(key, want):
        raise BnscopeError(f"{source}: {key} = {table[key]!r} must be {want}. Hint: see README, check configuration")

    for key in _NUMBER_KEYS:
        if key in table and not is_limit(table[key]):
            bad(key, "a finite number >= 0")
    for key in ("batch_size", "max_batches"):
        if key in table and (isinstance(table[key], bool) or not isinstance(table[key], int) or table[key] < 1):
            bad(key, "a positive integer")
    if "strict" in table and not isinstance(table["strict"], bool):
        bad("strict", "true or false")
    for key in ("rules", "layer_max_d", "layer_max_log_r"):
        if key in table and not isinstance(table[key], dict):
            bad(key, "a table")
    for key in ("layer_max_d", "layer_max_log_r"):
        for layer, value in table.get(key, {}).items():
            if not is_limit(value):
                raise BnscopeError(
                    f"{source}: {key}.{layer} = {value!r} must be a finite number >= 0. Hint: e.g. {layer} = 3.0"
                )


def is_limit(value) -> bool:
    """A threshold: a finite number >= 0 (not a bool, not NaN)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def with_overrides(config: CheckConfig, *, enable=(), disable=(), **values) -> CheckConfig:
    """The CLI's options on top of the file's (None leaves a value alone)."""
    rules = dict(config.rules)
    for rule in (*enable, *disable):
        if rule not in RULES:
            raise BnscopeError(f"unknown rule {rule!r}. Hint: rules are {', '.join(RULES)}")
    both = sorted(set(enable) & set(disable))
    if both:
        raise BnscopeError(f"rule {', '.join(map(repr, both))} given to both --enable and --disable. Hint: choose one")
    for key in ("max_layer_d", "max_layer_log_r"):
        if values.get(key) is not None and not is_limit(values[key]):
            raise BnscopeError(f"--{key.replace('_', '-')} {values[key]} is not a finite number >= 0. Hint: e.g. 1.0")
    rules.update(dict.fromkeys(enable, True))
    rules.update(dict.fromkeys(disable, False))
    merged = {k: v for k, v in values.items() if v is not None and v != {}}
    for key in ("layer_max_d", "layer_max_log_r"):
        if key in merged:
            merged[key] = {**getattr(config, key), **merged[key]}
    return replace(config, rules=rules, **merged)
