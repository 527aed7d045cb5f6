"""What estafeta can store and deliver as sent: the walk matches orjson's own limits."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from estafeta.jsonvalues import NOT_FINITE, ORJSON_MAX_DEPTH, WIDE_INTEGER, unstorable
from tests.deep_json import nested


def wrapped(value: Any, levels: int) -> Any:
    for _ in range(levels):
        value = {"data": value}
    return value


def writable(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


@pytest.mark.parametrize("levels_above", [0, 2, 5])
def test_the_deepest_value_refused_is_the_shallowest_orjson_cannot_write(levels_above: int) -> None:
    room = ORJSON_MAX_DEPTH - levels_above
    fits, too_deep = nested(room), nested(room + 1)
    assert writable(wrapped(fits, levels_above))
    assert unstorable(fits, levels_above=levels_above) is None
    assert not writable(wrapped(too_deep, levels_above))
    problem = unstorable(too_deep, levels_above=levels_above)
    assert problem is not None
    assert problem.at("body") == f"body: arrays and objects nested more than {room} deep"


def test_a_value_deeper_than_pythons_stack_is_answered() -> None:
    assert unstorable(nested(50_000), levels_above=2) is not None


@pytest.mark.parametrize(
    ("value", "place", "reason"),
    [
        ({"lines": [{"id": 2**64}]}, "data.lines.0.id", WIDE_INTEGER),
        ({"n": -(2**63) - 1}, "data.n", WIDE_INTEGER),
        ({"a": [1, 2, float("nan")]}, "data.a.2", NOT_FINITE),
        ({"a": {"b": float("-inf")}}, "data.a.b", NOT_FINITE),
    ],
)
def test_the_first_value_orjson_would_not_write_as_sent_is_named(
    value: Any, place: str, reason: str
) -> None:
    problem = unstorable(value, levels_above=2)
    assert problem is not None and problem.at("data") == f"{place}: {reason}"


def test_the_edges_of_64_bits_and_ordinary_values_are_storable() -> None:
    value = {"max": 2**64 - 1, "min": -(2**63), "t": True, "f": 1.5, "s": "9" * 40, "n": None}
    assert unstorable(value, levels_above=2) is None
    assert orjson.loads(orjson.dumps(value)) == value
