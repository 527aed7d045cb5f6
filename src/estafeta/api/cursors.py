"""Opaque page cursors: a page's `next` says where the next page starts.

A position is a time (Unix ms) and the strings that break its ties, in the order the page
is sorted. Each kind of page marks its cursors, so that one kind's `next` is never read as
another's, and anything this API did not give is a 400, never a query.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import orjson

from estafeta.errors import HttpError

Row = TypeVar("Row")

CursorKind = Literal["conversations", "messages", "dead"]
_CURSOR_MARK: dict[CursorKind, str] = {"conversations": "c", "messages": "m", "dead": "d"}


def not_given() -> HttpError:
    return HttpError(400, "invalid_request", "query.cursor: not a `next` this API gave")


def encode_cursor(kind: CursorKind, at: int, *ties: str) -> str:
    """The `next` of a page of `kind` whose last row is at (`at`, *`ties`)."""
    marked = [_CURSOR_MARK[kind], at, *ties]
    return base64.urlsafe_b64encode(orjson.dumps(marked)).decode().rstrip("=")


def read_cursor(kind: CursorKind, cursor: str, ties: int) -> tuple[int, list[str]]:
    """The position an `encode_cursor` of this kind names: its time and its `ties` strings."""
    try:
        mark, at, *strings = orjson.loads(
            base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        )
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise not_given() from None
    if not (
        mark == _CURSOR_MARK[kind]
        and isinstance(at, int)
        and not isinstance(at, bool)
        and -(2**63) <= at < 2**63  # a BIGINT column's range: anything else fails the query
        and len(strings) == ties
        and all(isinstance(s, str) and "\x00" not in s for s in strings)  # PostgreSQL refuses NUL
    ):
        raise not_given()
    return at, strings


def page_of(
    found: Sequence[Row], limit: int, cursor_of: Callable[[Row], str]
) -> tuple[Sequence[Row], str | None]:
    """The page and its `next`, from up to `limit + 1` rows read for a page of `limit`: the
    one more says whether another page follows, without a count."""
    page = found[:limit]
    return page, cursor_of(page[-1]) if len(found) > limit else None
