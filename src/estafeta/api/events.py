"""`POST /api/v1/events` (publish) and `GET /api/v1/events/{id}` (inspect)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import Response

from estafeta.api.deps import (
    Caller,
    IdempotencyKeyHeader,
    TenantCaller,
    hub_of,
    json_body,
)
from estafeta.api.fields import JsonObject, RequestBody
from estafeta.api.responses import json_response, key_used_elsewhere
from estafeta.api.views import event_json
from estafeta.errors import HttpError
from estafeta.hub import API_SOURCE
from estafeta.ingress.endpoint import SPOOLED, rate_limit
from estafeta.routing.router import MAX_ORDERING_KEY

router = APIRouter(prefix="/api/v1", tags=["events"])


class PublishEvent(RequestBody):
    type: str = Field(min_length=1, max_length=200, examples=["appointment.booked"])
    data: JsonObject = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)
    priority: int | None = Field(default=None, ge=0, le=4)
    # "" would be one real key shared by every such event, not "no key": refused, as an
    # empty idempotency key is.
    ordering_key: str | None = Field(default=None, min_length=1, max_length=MAX_ORDERING_KEY)


class Published(BaseModel):
    id: str
    duplicate: bool


@router.post(
    "/events",
    status_code=202,
    response_model=Published,
    responses={
        200: {"description": "a duplicate: the original event's id"},
        409: {"description": "idempotency_key_reused: the key was used by a message send"},
    },
    dependencies=[Depends(json_body)],
)
async def publish_event(
    request: Request,
    body: PublishEvent,
    caller: TenantCaller,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    hub = hub_of(request)
    assert caller.tenant_id is not None  # noqa: S101 - tenant_principal guarantees it
    await rate_limit(hub, caller.tenant_id)
    key = body.idempotency_key or idempotency_key
    result = await hub.accept(
        tenant_id=caller.tenant_id,
        source_id=API_SOURCE,
        event_type=body.type,
        data=body.data,
        idempotency_key=key,
        priority=body.priority,
        ordering_key=body.ordering_key,
    )
    # A spooled duplicate (the store unreachable) cannot be looked up; it stays a duplicate.
    if result.duplicate and not result.spooled and key is not None:
        if await hub.store.message_id_for_event(result.event_id) is not None:
            raise key_used_elsewhere(key, result.event_id, "the message send", "publish the event")
        if await hub.store.escalated_conversation(caller.tenant_id, result.event_id):
            raise key_used_elsewhere(key, result.event_id, "the escalation", "publish the event")
    return json_response(
        {"id": result.event_id, "duplicate": result.duplicate},
        200 if result.duplicate else 202,
        SPOOLED if result.spooled else None,
    )


@router.get("/events/{event_id}")
async def get_event(request: Request, event_id: str, caller: Caller) -> Response:
    view = await hub_of(request).store.get_event(event_id, caller.scope())
    if view is None:  # another tenant's event is as absent as a missing one
        raise HttpError(404, "not_found", f"no event {event_id!r}")
    return json_response(event_json(view))
