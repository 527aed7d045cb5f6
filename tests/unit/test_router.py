"""Which deliveries an event gets, when several routes name the same destination."""

from __future__ import annotations

from typing import Any

import pytest

from estafeta.config import load_config_dict
from estafeta.routing.router import Router
from tests.conftest import base_config

EVENT = {"type": "message.received", "data": {"conversation_id": "5511987654321", "n": 7}}


def targets(*routes: dict[str, Any]) -> dict[str, tuple[int, str | None]]:
    data = base_config("sqlite:///unused.db")
    data["routes"] = [
        {"tenant": "clinica-sol", "events": ["message.*"], "destinations": ["crm"], **r}
        for r in routes
    ]
    found = Router(load_config_dict(data)).targets("clinica-sol", EVENT)
    return {t.destination_id: (t.priority, t.ordering_key) for t in found}


@pytest.mark.parametrize("keyed_first", [True, False])
def test_a_route_without_a_key_does_not_turn_another_routes_ordering_off(
    keyed_first: bool,
) -> None:
    # The more urgent route named no key, and the delivery lost the other route's: the
    # customer's messages could reach the CRM out of order.
    keyed = {"priority": 2, "ordering_key": "data.conversation_id"}
    urgent = {"priority": 0}
    routes = (keyed, urgent) if keyed_first else (urgent, keyed)
    assert targets(*routes) == {"crm": (0, "5511987654321")}


def test_the_most_urgent_routes_key_wins_and_each_destination_is_delivered_once() -> None:
    got = targets(
        {"priority": 3, "ordering_key": "data.conversation_id"},
        {"priority": 1, "ordering_key": "data.n", "destinations": ["crm", "billing"]},
    )
    assert got == {"crm": (1, "7"), "billing": (1, "7")}


def key_of(value: object) -> str | None:
    """The ordering key of a message whose `data.conversation_id` is `value`, under a route
    keyed by that path."""
    data = base_config("sqlite:///unused.db")
    data["routes"] = [
        {
            "tenant": "clinica-sol",
            "events": ["message.*"],
            "destinations": ["crm"],
            "ordering_key": "data.conversation_id",
        }
    ]
    event = {"type": "message.received", "data": {"conversation_id": value}}
    [target] = Router(load_config_dict(data)).targets("clinica-sol", event)
    return target.ordering_key


def test_a_key_longer_than_the_apis_is_kept_as_its_digest_so_equal_values_stay_in_order() -> None:
    """A route's key takes the event's value whole; over ~2.7 KB PostgreSQL's index refused
    the delivery and every webhook with such a value failed with a 500."""
    long_a, long_b = "a" * 10_000, "a" * 9_999 + "b"
    assert key_of("x" * 255) == "x" * 255  # the API's own limit: kept as it is
    assert key_of("a\x00b") == "a\ufffdb"  # PostgreSQL text holds no NUL: as ids keep one
    assert key_of(long_a) == key_of(long_a)
    assert key_of(long_a) != key_of(long_b)
    assert all(len(key_of(v) or "") <= 255 for v in (long_a, long_b, "x" * 256))


def test_an_empty_value_at_the_routes_path_gives_no_key() -> None:
    # A business system's "no contact yet" is often "": as one shared key, every such event
    # waited behind the others (and behind each one's retries), to every destination; the
    # API refuses "" as a key, and a null or missing value gives none.
    for value in ("", None):
        assert key_of(value) is None, value


@pytest.mark.parametrize(
    "order",
    [
        (
            {"priority": 0},
            {"priority": 2, "ordering_key": "data.conversation_id"},
            {"priority": 1, "ordering_key": "data.n"},
        ),
        (
            {"priority": 2, "ordering_key": "data.conversation_id"},
            {"priority": 0},
            {"priority": 1, "ordering_key": "data.n"},
        ),
        (
            {"priority": 2, "ordering_key": "data.conversation_id"},
            {"priority": 1, "ordering_key": "data.n"},
            {"priority": 0},
        ),
        (
            {"priority": 1, "ordering_key": "data.n"},
            {"priority": 2, "ordering_key": "data.conversation_id"},
            {"priority": 0},
        ),
    ],
    ids=["u-l-m", "l-u-m", "l-m-u", "m-l-u"],
)
def test_of_three_routes_the_most_urgent_keyed_ones_key_wins_in_any_file_order(
    order: tuple[dict[str, Any], ...],
) -> None:
    """docs/configuration.md: the most urgent priority, with the ordering key of the most
    urgent route that has one — here the priority-1 route's `data.n`. Merged two by two,
    the unkeyed route's 0 made the first merge look more urgent than the priority-1 route,
    and in two of these orders the priority-2 route's key won."""
    assert targets(*order) == {"crm": (0, "7")}


def test_a_route_whose_filter_does_not_match_the_event_gives_no_delivery() -> None:
    # EVENT's data.n is 7: only the route whose filter holds for it sends anything.
    got = targets(
        {"filter": "data.n >= 7", "destinations": ["crm"]},
        {"filter": "data.n > 7", "destinations": ["billing"]},
    )
    assert got == {"crm": (2, None)}


def test_of_two_equally_urgent_keyed_routes_the_earlier_routes_key_wins() -> None:
    got = targets(
        {"priority": 1, "ordering_key": "data.conversation_id"},
        {"priority": 1, "ordering_key": "data.n"},
    )
    assert got == {"crm": (1, "5511987654321")}
