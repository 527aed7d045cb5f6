"""Field types the API's request bodies share."""

from __future__ import annotations

import math
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator


def _storable_json(value: Any) -> Any:
    """Free-form JSON is stored and delivered as orjson writes it: refused here, with the
    reason, when it cannot be (an integer beyond 64 bits), not failed later with a 500; and
    NaN, Infinity and a number beyond a double (the body's parser takes the first two and
    reads the last as infinity), which orjson would write as `null`, are refused rather than
    delivered as something the sender did not write."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"cannot be stored as JSON: {exc}") from None
    if _holds_infinity(value):
        raise ValueError(
            "cannot be stored as JSON: NaN, Infinity or a number beyond a double (read as"
            " infinity) has no JSON form"
        )
    return value


def _holds_infinity(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_holds_infinity(item) for item in value.values())
    if isinstance(value, list):
        return any(_holds_infinity(item) for item in value)
    return False


# A JSON object of any shape, as an event's `data` or a template's component.
JsonObject = Annotated[dict[str, Any], AfterValidator(_storable_json)]
