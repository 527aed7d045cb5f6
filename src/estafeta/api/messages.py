"""`POST /api/v1/messages` (send through the tenant's provider) and `GET /api/v1/messages/{id}`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.requests import Request
from starlette.responses import Response

from estafeta.api.deps import (
    Caller,
    IdempotencyKeyHeader,
    TenantCaller,
    hub_of,
    json_body,
)
from estafeta.api.fields import NOT_ONLY_BLANKS, RequestBody, TemplateComponent
from estafeta.api.responses import json_response, key_used_elsewhere
from estafeta.clock import iso_from_ms
from estafeta.errors import HttpError
from estafeta.ingress.endpoint import SPOOLED, rate_limit
from estafeta.messaging.facts import current_status
from estafeta.messaging.outbound import check_sendable, missing_outbound_keys
from estafeta.store.records import MessageView, StatusChange

router = APIRouter(prefix="/api/v1", tags=["messages"])

# What people write between a number's digits: `+55 (11) 98765-4321`.
_SEPARATOR = r"[\s().-]"
_NUMBER_SEPARATORS = re.compile(_SEPARATOR)
# `to` as a client may write it (what `_plain_number` makes E.164), for /openapi.json: the
# stored form's pattern there refused, in a client checking bodies against the document,
# the formatted numbers the API takes.
_NUMBER_AS_WRITTEN = (
    f"^{_SEPARATOR}*\\+{_SEPARATOR}*[1-9](?:{_SEPARATOR}*[0-9]){{6,14}}{_SEPARATOR}*$"
)


class Template(RequestBody):
    """`{name, language, components?}`, or on Twilio a Content template `{content_sid,
    variables?}` (docs/http-api.md); which one a source's provider takes is checked by
    `check_sendable`."""

    name: str | None = Field(default=None, min_length=1, max_length=512)
    language: str | None = Field(default=None, min_length=2, max_length=15, examples=["pt_BR"])
    components: list[TemplateComponent] = Field(default_factory=list)
    content_sid: str | None = Field(
        default=None, min_length=1, max_length=64, examples=["HXb5b62575e6e4ff6129ad7c8efe1f983e"]
    )
    variables: dict[str, str] | None = Field(default=None, examples=[{"1": "Maria"}])

    @model_validator(mode="after")
    def _named(self) -> Template:
        if self.content_sid is None and (self.name is None or self.language is None):
            # Not a ValueError, which pydantic would show as "Value error, give …".
            raise PydanticCustomError(
                "template_unnamed", "give name and language, or (on Twilio) content_sid"
            )
        return self


class Media(RequestBody):
    kind: Literal["image", "audio", "video", "document"]
    url: str = Field(pattern=r"^https?://", max_length=2048)
    caption: str | None = Field(default=None, max_length=1024)
    filename: str | None = Field(default=None, max_length=240)

    @field_validator("caption")
    @classmethod
    def _empty_caption_is_none(cls, value: str | None) -> str | None:
        """An empty caption is no caption, as a received one is (`null` everywhere): not
        sent to the provider as `""`, nor refused on an audio."""
        return value or None


class SendMessage(RequestBody):
    """One of `text`, `template` or `media`, to one customer, through one provider source."""

    source: str = Field(min_length=1, max_length=63, examples=["wa-sol"])
    to: str = Field(
        pattern=r"^\+[1-9][0-9]{6,14}$",
        examples=["+5511987654321", "+55 (11) 98765-4321"],
        json_schema_extra={"pattern": _NUMBER_AS_WRITTEN},
    )
    text: str | None = Field(
        default=None, min_length=1, max_length=4096, json_schema_extra=NOT_ONLY_BLANKS
    )
    template: Template | None = None
    media: Media | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)
    priority: int = Field(default=1, ge=0, le=4)

    @field_validator("to", mode="before")
    @classmethod
    def _plain_number(cls, value: object) -> object:
        """A number as staff copy it from a patient's record (`+55 (11) 98765-4321`) is the
        E.164 number of its digits: the customer's conversation is keyed by them, whatever
        the formatting, and providers want E.164. Without its `+` it is still refused: no
        country is guessed."""
        return _NUMBER_SEPARATORS.sub("", value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_content(self) -> SendMessage:
        given = [k for k in ("text", "template", "media") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of text, template or media")
        return self

    def content(self) -> dict[str, Any]:
        if self.text is not None:
            return {"text": self.text}
        if self.template is not None:
            return {"template": self.template.model_dump(exclude_none=True)}
        assert self.media is not None  # noqa: S101 - _one_content guarantees it
        return {"media": self.media.model_dump(exclude_none=True)}


@router.post(
    "/messages",
    status_code=202,
    responses={
        200: {"description": "a duplicate: the original message"},
        409: {"description": "idempotency_key_reused: the key was used by a published event"},
    },
    dependencies=[Depends(json_body)],
)
async def send_message(
    request: Request,
    body: SendMessage,
    caller: TenantCaller,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    hub = hub_of(request)
    assert caller.tenant_id is not None  # noqa: S101 - tenant_principal guarantees it
    source = hub.sources.get(body.source)
    if source is None or source.tenant != caller.tenant_id:
        raise HttpError(404, "unknown_source", f"no source named {body.source!r}")
    missing = missing_outbound_keys(source)
    if missing:
        raise HttpError(
            400,
            "source_cannot_send",
            f"source {body.source!r} cannot send: it needs {', '.join(missing)}",
        )
    check_sendable(source, {"to": body.to, **body.content()})
    await rate_limit(hub, caller.tenant_id)
    key = body.idempotency_key or idempotency_key
    message_id, result = await hub.send_message(
        tenant_id=caller.tenant_id,
        source_id=source.id,
        to=body.to,
        content=body.content(),
        idempotency_key=key,
        priority=body.priority,
    )
    if message_id is None:
        assert key is not None  # noqa: S101 - only a keyed event is a duplicate
        raise key_used_elsewhere(
            key, result.event_id, "the event", "send the message (POST /api/v1/messages)"
        )
    state = "queued"
    if result.duplicate and not result.spooled:  # the original may be past queued by now
        original = await hub.store.get_message(caller.tenant_id, message_id)
        if original is not None:
            state = current_status(original.state, [c.status for c in original.provider_statuses])
    return json_response(
        {
            "id": message_id,
            "event_id": result.event_id,
            "state": state,
            "duplicate": result.duplicate,
        },
        200 if result.duplicate else 202,
        SPOOLED if result.spooled else None,
    )


@router.get("/messages/{message_id}")
async def get_message(request: Request, message_id: str, caller: Caller) -> Response:
    view = await hub_of(request).store.get_message(caller.scope(), message_id)
    if view is None:
        raise HttpError(404, "not_found", f"no message {message_id!r}")
    return json_response(message_json(view))


def message_json(m: MessageView) -> dict[str, Any]:
    timeline: list[dict[str, Any]] = [{"state": "queued", "at": m.created_at}]
    if m.sent_at is not None:
        timeline.append({"state": "sent", "at": m.sent_at})
    for change in m.provider_statuses:
        if change.status == "sent" and m.sent_at is not None:
            continue  # the provider's own word for the acceptance above: one step, not two
        entry: dict[str, Any] = {"state": change.status, "at": change.at}
        if change.error:
            entry["error"] = change.error
        timeline.append(entry)
    if m.state == "failed":
        # Timed as every other step, so that a client can order or show them all by `at`.
        timeline.append({"state": "failed", "at": m.failed_at, "error": m.error})
    in_time_order(timeline)
    for step in timeline:
        step["at"] = None if step["at"] is None else iso_from_ms(step["at"])
    state = current_status(m.state, [c.status for c in m.provider_statuses])
    return {
        "id": m.id,
        "source": m.source_id,
        "to": m.recipient,
        "conversation_id": m.conversation_id,
        "content": m.content,
        "state": state,
        "provider_message_id": m.provider_message_id,
        "error": m.error or (provider_failure(m.provider_statuses) if state == "failed" else None),
        "timeline": timeline,
        "event_id": m.event_id,
        "delivery_id": m.delivery_id,
    }


def in_time_order(timeline: list[dict[str, Any]]) -> None:
    """Each step's `at` (ms) made at the latest the next step's, in place. The steps are in
    the order the message went through them, but a step can be known late: the send's
    answer recorded after the provider's `delivered` was stored, or a Twilio callback (timed
    as it arrives) after the later step's. The step did happen before the next one, so its
    time is then the next one's: a bound that is true, where the late one went back in time."""
    bound: int | None = None
    for step in reversed(timeline):
        if step["at"] is None:
            continue
        if bound is not None and step["at"] > bound:
            step["at"] = bound
        bound = step["at"]


def provider_failure(changes: Sequence[StatusChange]) -> str | None:
    """The last `failed` status webhook's error, written as a failed send's is
    (`{provider}_{code}: {title}`), so `error` says why whichever side failed the message."""
    failed = [c for c in changes if c.status == "failed"]
    if not failed:
        return None
    change = failed[-1]
    error = change.error or {}
    provider = change.provider or "provider"
    code = error.get("code")
    head = f"{provider}_{code}" if code is not None else f"{provider}_failed"
    reason = next(
        (error[k] for k in ("title", "message", "details") if isinstance(error.get(k), str)),
        None,
    )
    return f"{head}: {reason}" if reason else head
