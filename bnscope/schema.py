"""The JSON documents bnscope writes (reports, baselines, moment files): one schema version and
one conversion of result values to plain JSON (NaN/Inf become null, so any parser reads them).
"""

from __future__ import annotations

import json
import math

import numpy as np

SCHEMA_VERSION = 1
"""Version of every JSON document bnscope emits; bumped when a field changes meaning."""


def to_json(data: dict) -> str:
    """``data`` as indented, strict JSON."""
    return json.dumps(json_safe(data), indent=2, allow_nan=False)


def json_safe(value):
    """``value`` with numpy types and arrays turned into plain Python, non-finite floats into None."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
