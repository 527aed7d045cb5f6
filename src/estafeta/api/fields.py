"""Field types the API's request bodies share."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

from estafeta.jsonvalues import DATA_LEVELS_ABOVE, unstorable

# For /openapi.json, on a string the API refuses when it is only blanks (a sent `text`, an
# escalation's `reason`): it must hold something else. The check itself is the model's.
NOT_ONLY_BLANKS: dict[str, Any] = {"pattern": r"\S"}


class RequestBody(BaseModel):
    """A request body as the API reads it: no key it does not name, and each value of the
    JSON type its field says — `true` is no priority and `"yes"` no boolean, as in the
    configuration (pydantic would otherwise read them as 1 and True)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _storable_json(value: dict[str, Any], *, levels_above: int) -> dict[str, Any]:
    """Free-form JSON is stored and delivered as orjson writes it: refused here, with the
    place and the reason, when it cannot be (jsonvalues.py), not failed later with a 500 or
    delivered as something the sender did not write (NaN and a number beyond a double, which
    the body's parser reads as infinity, would be written `null`)."""
    problem = unstorable(value, levels_above=levels_above)
    if problem is not None:
        place = f"at {'.'.join(problem.path)}, " if problem.path else ""
        # Not a ValueError, which pydantic would show as "Value error, cannot …".
        raise PydanticCustomError(
            "unstorable_json",
            "cannot be stored as JSON: {problem}",
            {"problem": place + problem.reason},
        )
    return value


# A JSON object of any shape as an event's `data`.
JsonObject = Annotated[
    dict[str, Any], AfterValidator(partial(_storable_json, levels_above=DATA_LEVELS_ABOVE))
]
# A template's component, in its send's event as `data.template.components[i]`.
TemplateComponent = Annotated[
    dict[str, Any], AfterValidator(partial(_storable_json, levels_above=DATA_LEVELS_ABOVE + 3))
]
