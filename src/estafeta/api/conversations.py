"""Conversations: `GET /api/v1/conversations[/{id}]`, escalate to a human, close."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.requests import Request
from starlette.responses import Response

from estafeta.api.auth import Principal
from estafeta.api.cursors import encode_cursor, not_given, page_of, read_cursor
from estafeta.api.deps import Caller, IdempotencyKeyHeader, TenantCaller, hub_of, json_body
from estafeta.api.fields import NOT_ONLY_BLANKS, RequestBody
from estafeta.api.responses import json_response, key_used_elsewhere
from estafeta.clock import iso_from_ms
from estafeta.errors import HttpError
from estafeta.ingress.endpoint import SPOOLED, rate_limit
from estafeta.store.conversations import MessagePosition
from estafeta.store.records import ConversationView, Interaction

router = APIRouter(prefix="/api/v1/conversations", tags=["conversations"])

Status = Literal["open", "escalated", "closed"]
# The admin key's `?tenant=`: an empty one names no tenant, and answered an empty list (as
# if the hub held nothing) rather than the 400 that says so.
TenantParam = Annotated[str | None, Query(min_length=1)]


def conversation_json(c: ConversationView) -> dict[str, Any]:
    return {
        "id": c.id,
        "tenant": c.tenant_id,
        "status": c.status,
        "contact_name": c.contact_name,
        "first_message_at": iso_from_ms(c.first_message_at),
        "last_message_at": iso_from_ms(c.last_message_at),
        "inbound_count": c.inbound_count,
        "outbound_count": c.outbound_count,
        "escalation": None
        if c.escalated_at is None
        else {
            "at": iso_from_ms(c.escalated_at),
            "reason": c.escalation_reason,
            "priority": c.escalation_priority,
        },
    }


def _conversation_position(cursor: str) -> tuple[int, str, str]:
    at, (tenant_id, conversation_id) = read_cursor("conversations", cursor, ties=2)
    return at, tenant_id, conversation_id


def page_cursor(c: ConversationView) -> str:
    """The `next` of a page of conversations that ends with `c`."""
    return encode_cursor("conversations", c.last_message_at, c.tenant_id, c.id)


def message_position(cursor: str) -> MessagePosition:
    """The position a page of a conversation's messages ended at (`message_cursor`)."""
    at, (direction, message_id) = read_cursor("messages", cursor, ties=2)
    if direction not in ("inbound", "outbound"):
        raise not_given()
    return at, direction, message_id


# A message's own fields: an inbound event's `data` (a generic source's) may hold keys of
# these names, which must not pass for the message's position or its event's id.
_MESSAGE_FIELDS = ("at", "direction", "id")


def message_json(i: Interaction) -> dict[str, Any]:
    """One message of a conversation's page: its own fields, then its content."""
    content = {k: v for k, v in i.content.items() if k not in _MESSAGE_FIELDS}
    return {"at": iso_from_ms(i.at), "direction": i.direction, "id": i.id, **content}


def message_cursor(i: Interaction) -> str:
    """The `next` of a page of a conversation's messages that ends with `i`."""
    return encode_cursor("messages", i.at, i.direction, i.id)


@router.get("")
async def list_conversations(
    request: Request,
    caller: Caller,
    status: Status | None = None,
    tenant: TenantParam = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> Response:
    after = _conversation_position(cursor) if cursor is not None else None
    store = hub_of(request).store
    scope = caller.scope(tenant)
    # The admin's tenant, unless the store does not know it: a typo that an empty list
    # would hide (as the DLQ's list says too). A tenant's key names only its own.
    if caller.admin and scope is not None and not await store.tenant_exists(scope):
        raise HttpError(404, "not_found", f"no tenant {scope!r}")
    found = await store.list_conversations(
        scope,
        status=status,
        limit=limit + 1,
        after=after,  # page_of
    )
    page, following = page_of(found, limit, page_cursor)
    return json_response({"conversations": [conversation_json(c) for c in page], "next": following})


async def _conversation(
    request: Request, caller: Principal, conversation_id: str, tenant: str | None
) -> tuple[str, ConversationView]:
    tenant_id = caller.scope(tenant)
    if tenant_id is None:
        raise HttpError(400, "invalid_request", "the admin key must name the tenant (?tenant=)")
    store = hub_of(request).store
    found = await store.get_conversation(tenant_id, conversation_id)
    if found is None:
        # The admin's `?tenant=` the store does not know is a typo, which "no conversation"
        # would hide (as the list says). Asked only once nothing is found.
        if caller.admin and not await store.tenant_exists(tenant_id):
            raise HttpError(404, "not_found", f"no tenant {tenant_id!r}")
        raise HttpError(404, "not_found", f"no conversation {conversation_id!r}")
    return tenant_id, found


@router.get("/{conversation_id}")
async def get_conversation(
    request: Request,
    conversation_id: str,
    caller: Caller,
    tenant: TenantParam = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> Response:
    """The conversation and a page of its messages, oldest first; `next` continues it."""
    after = message_position(cursor) if cursor is not None else None
    tenant_id, conversation = await _conversation(request, caller, conversation_id, tenant)
    found = await hub_of(request).store.conversation_messages(
        tenant_id, conversation_id, limit=limit + 1, after=after
    )
    page, following = page_of(found, limit, message_cursor)
    return json_response(
        {
            **conversation_json(conversation),
            "messages": [message_json(i) for i in page],
            "next": following,
        }
    )


class Escalate(RequestBody):
    reason: str = Field(min_length=1, max_length=500, json_schema_extra=NOT_ONLY_BLANKS)
    # The human's urgency (in the event's `data` and the conversation), not its deliveries'
    # priority, which their routes give as for any event (http-api.md).
    priority: int = Field(default=1, ge=0, le=4)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)

    @field_validator("reason")
    @classmethod
    def _says_something(cls, value: str) -> str:
        """A reason of blanks tells whoever takes over nothing (as a sent `text` of blanks
        is refused too)."""
        if not value.strip():
            # Not a ValueError, which pydantic would show as "Value error, must …".
            raise PydanticCustomError("blank", "must not be only blanks")
        return value


@router.post(
    "/{conversation_id}/escalate",
    status_code=202,
    responses={
        200: {"description": "a duplicate: the original escalation's event id"},
        409: {"description": "idempotency_key_reused: the key was used by another request"},
    },
    dependencies=[Depends(json_body)],
)
async def escalate(
    request: Request,
    conversation_id: str,
    body: Escalate,
    caller: TenantCaller,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Hand the conversation to a human: marks it and emits `conversation.escalated`."""
    tenant_id, conversation = await _conversation(request, caller, conversation_id, None)
    hub = hub_of(request)
    # An escalation is an event and its deliveries, as a publish is: it draws from the
    # tenant's ingress rate limit (before anything is stored or its key taken).
    await rate_limit(hub, tenant_id)
    key = body.idempotency_key or idempotency_key
    result = await hub.escalate(
        tenant_id=tenant_id,
        conversation_id=conversation_id,
        contact_name=conversation.contact_name,
        reason=body.reason,
        priority=body.priority,
        actor=caller.actor,
        idempotency_key=key,
    )
    # The key is one of the tenant's `api` keys (published events and sends use them too):
    # a repeat is this conversation's escalation, or nothing was escalated. A spooled
    # duplicate (the store unreachable) cannot be looked up; it stays a duplicate.
    if result.duplicate and not result.spooled and key is not None:
        escalated = await hub.store.escalated_conversation(tenant_id, result.event_id)
        if escalated != conversation_id:
            first_use = (
                "the event"
                if escalated is None
                else f"the escalation of conversation {escalated!r}, event"
            )
            raise key_used_elsewhere(key, result.event_id, first_use, "escalate the conversation")
    return json_response(
        {"event_id": result.event_id, "status": "escalated", "duplicate": result.duplicate},
        200 if result.duplicate else 202,
        SPOOLED if result.spooled else None,
    )


@router.post("/{conversation_id}/close")
async def close(
    request: Request,
    conversation_id: str,
    caller: TenantCaller,
) -> Response:
    hub = hub_of(request)
    assert caller.tenant_id is not None  # noqa: S101 - tenant_principal guarantees it
    if not await hub.store.set_conversation_status(
        caller.tenant_id, conversation_id, "closed", hub.clock.now_ms()
    ):
        raise HttpError(404, "not_found", f"no conversation {conversation_id!r}")
    return json_response({"id": conversation_id, "status": "closed"})
