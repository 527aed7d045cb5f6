"""The dead-letter queue over HTTP: `GET /api/v1/dlq`, `POST /api/v1/dlq/replay|discard`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from estafeta.api.auth import Principal
from estafeta.api.cursors import encode_cursor, page_of, read_cursor
from estafeta.api.deps import Caller, hub_of, json_body
from estafeta.api.fields import RequestBody
from estafeta.api.responses import json_response
from estafeta.api.views import delivery_json
from estafeta.clock import ms_from_iso
from estafeta.delivery.attempts import attempt_limits
from estafeta.errors import HttpError
from estafeta.store.dead_letters import MoveProgress
from estafeta.store.records import DeadLetterFilter, DeliveryView
from estafeta.store.sqlstore import SqlStore

router = APIRouter(prefix="/api/v1/dlq", tags=["dead-letter queue"])


def _time(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        return ms_from_iso(value)
    except ValueError:
        raise HttpError(400, "invalid_request", f"{name}: not an ISO 8601 time") from None


def _in_window(chosen: DeadLetterFilter, since: str | None, until: str | None) -> DeadLetterFilter:
    """`chosen`, unless its window ends before it begins: a 400 naming both as given, not
    an answer of nothing that reads as an empty queue."""
    if chosen.ends_before_it_begins:
        raise HttpError(400, "invalid_request", f"until: {until} is not after since {since}")
    return chosen


class DeadLetterSelection(RequestBody):
    """Which dead deliveries: by `ids`, or by filter (a tenant counts); `all: true` to mean
    every one."""

    ids: list[str] = Field(default_factory=list, max_length=10_000)
    destination: str | None = None
    event_type: str | None = None
    since: str | None = None
    until: str | None = None
    tenant: str | None = None
    all: bool = False
    # By default as many as `ids` names, else 1000: a list of ids is meant whole.
    limit: int | None = Field(default=None, ge=1, le=10_000)

    def to_filter(self, caller: Principal) -> DeadLetterFilter:
        named = (self.ids, self.tenant, self.destination, self.event_type, self.since, self.until)
        if not any(named) and not self.all:
            raise HttpError(
                400,
                "invalid_request",
                "name ids, or a tenant/destination/event_type/since/until filter, or all: true",
            )
        chosen = DeadLetterFilter(
            tenant_id=caller.scope(self.tenant),
            delivery_ids=tuple(self.ids),
            destination_id=self.destination,
            event_type=self.event_type,
            since=_time(self.since, "since"),
            until=_time(self.until, "until"),
            limit=self.limit,
        )
        return _in_window(chosen, self.since, self.until)


async def _known(store: SqlStore, chosen: DeadLetterFilter) -> DeadLetterFilter:
    """`chosen`, unless it names a tenant or destination the store does not know (a typo that
    an empty answer would hide)."""
    unknown = await store.unknown_in(chosen)
    if unknown is not None:
        what, name = unknown
        raise HttpError(404, "not_found", f"no {what} {name!r}")
    return chosen


@router.get("")
async def list_dead(
    request: Request,
    caller: Caller,
    destination: str | None = None,
    event_type: str | None = None,
    since: str | None = None,
    until: str | None = None,
    tenant: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> Response:
    store = hub_of(request).store
    chosen = await _known(
        store,
        _in_window(
            DeadLetterFilter(
                tenant_id=caller.scope(tenant),
                destination_id=destination,
                event_type=event_type,
                since=_time(since, "since"),
                until=_time(until, "until"),
                limit=limit + 1,  # page_of: whether another page follows
                after=_dead_position(cursor) if cursor is not None else None,
            ),
            since,
            until,
        ),
    )
    found = await store.list_dead(chosen)
    page, following = page_of(found, limit, _dead_cursor)
    return json_response(
        {"deliveries": [delivery_json(d) for d in page], "count": len(page), "next": following}
    )


def _dead_cursor(d: DeliveryView) -> str:
    return encode_cursor("dead", d.updated_at, d.id)


def _dead_position(cursor: str) -> tuple[int, str]:
    at, (delivery_id,) = read_cursor("dead", cursor, ties=1)
    return at, delivery_id


async def _move(
    request: Request, selection: DeadLetterSelection, caller: Principal, to: str
) -> Response:
    """Replay (`to` "replayed") or discard ("discarded") the selected dead deliveries."""
    hub = hub_of(request)
    chosen = await _known(hub.store, selection.to_filter(caller))
    now_ms = hub.clock.now_ms()
    progress = MoveProgress()
    if to == "replayed":
        # They take the configuration's max_attempts: it may have been raised to outlast
        # what killed them.
        ids = await hub.store.replay(
            chosen,
            actor=caller.actor,
            now_ms=now_ms,
            limits=attempt_limits(hub.config),
            progress=progress,
        )
    else:
        ids = await hub.store.discard(chosen, actor=caller.actor, now_ms=now_ms, progress=progress)
    if ids and to == "replayed":
        hub.deliveries_ready.set()
    # `more`: the limit left some of the selection dead (a `count` equal to the limit says
    # nothing of whether it took them all).
    return json_response({to: ids, "count": len(ids), "more": progress.more})


@router.post("/replay", dependencies=[Depends(json_body)])
async def replay(
    request: Request,
    selection: DeadLetterSelection,
    caller: Caller,
) -> Response:
    return await _move(request, selection, caller, "replayed")


@router.post("/discard", dependencies=[Depends(json_body)])
async def discard(
    request: Request,
    selection: DeadLetterSelection,
    caller: Caller,
) -> Response:
    return await _move(request, selection, caller, "discarded")
