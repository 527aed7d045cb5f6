"""Field types the API's request bodies share."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from pydantic import AfterValidator


def _storable_json(value: Any) -> Any:
    """Free-form JSON is stored and delivered as orjson writes it: refused here, with the
    reason, when it cannot be (an integer beyond 64 bits), not failed later with a 500."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"cannot be stored as JSON: {exc}") from None
    return value


# A JSON object of any shape, as an event's `data` or a template's component.
JsonObject = Annotated[dict[str, Any], AfterValidator(_storable_json)]
