"""JSON nested as deep as a test needs, past what orjson writes (estafeta/jsonvalues.py)."""

from __future__ import annotations

import json
from typing import Any


def nested(depth: int) -> Any:
    """`depth` objects and arrays in turn around `1`, the outermost an object:
    `{"a": [{"a": … 1 …}]}`."""
    value: Any = 1
    for level in range(depth):
        value = {"a": value} if (depth - level) % 2 else [value]
    return value


def nested_text(depth: int) -> bytes:
    """`nested(depth)` as JSON text, written by the standard library (orjson writes no deeper
    than 254)."""
    return json.dumps(nested(depth)).encode()
