"""Page cursors: a `next` reads back as the position it names; anything else is a 400."""

from __future__ import annotations

import base64
import json

import pytest

from estafeta.api.cursors import encode_cursor, page_of, read_cursor
from estafeta.errors import HttpError


def forged(*items: object) -> str:
    """A cursor made by hand, as a client could, in encode_cursor's format."""
    return base64.urlsafe_b64encode(json.dumps(list(items)).encode()).decode().rstrip("=")


@pytest.mark.parametrize("at", [0, -(2**63), 2**63 - 1, 1_751_371_200_000])
def test_a_next_reads_back_as_the_position_it_names(at: int) -> None:
    cursor = encode_cursor("messages", at, "inbound", "msg_1")
    assert read_cursor("messages", cursor, ties=2) == (at, ["inbound", "msg_1"])


@pytest.mark.parametrize(
    "cursor",
    [
        "nonsense!",
        forged("m", 1, "a"),  # another kind's mark
        forged("d", True, "a"),  # a bool is not a time
        forged("d", 1.5, "a"),
        forged("d", 2**63, "a"),  # past a BIGINT: the query would fail
        forged("d", -(2**63) - 1, "a"),
        forged("d", 1),  # too few ties
        forged("d", 1, "a", "b"),  # too many
        forged("d", 1, 7),  # a tie that is not a string
        forged("d", 1, "a\x00b"),  # PostgreSQL refuses NUL in text
    ],
)
def test_a_cursor_this_api_did_not_give_is_a_400(cursor: str) -> None:
    with pytest.raises(HttpError) as refused:
        read_cursor("dead", cursor, ties=1)
    assert (refused.value.status, refused.value.detail) == (
        400,
        "query.cursor: not a `next` this API gave",
    )


@pytest.mark.parametrize(("found", "following"), [(2, None), (3, None), (4, "c2")])
def test_a_page_has_a_next_only_when_more_rows_follow(found: int, following: str | None) -> None:
    rows = list(range(found))
    page, cursor = page_of(rows, 3, lambda row: f"c{row}")
    assert (list(page), cursor) == (rows[:3], following)
