"""WhatsApp Business Cloud API (Meta): handshake, signature and normalization.

* contracts §1.1: the GET subscription handshake echoes `hub.challenge` when
  `hub.verify_token` matches the source's `verify_token` (constant time), else 403.
* contracts §1.2: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(app_secret, raw body)>`.
* contracts §1.3–§1.5: one POST may batch updates at every level (`entry[]`, `changes[]`,
  `messages[]`/`statuses[]`); every item becomes its own event, `message.received` or
  `message.status`, normalized as DESIGN §3.4 says.
* contracts §1.9/§7: the WAMID is a message's key; `{wamid}:{status}` a status's.

Decisions: a message of a type we do not model is kept as kind `unsupported` with its part
(never dropped); `played` (a voice note was played) is reported as status `read` with
`provider_status: "played"`; a status echoing one of our message ids (`msg_…`, sent as
`biz_opaque_callback_data`) names it as `sent_message_id`; a group message's status is
about one member (`recipient_participant_id`): `recipient` is that member, `data.group` the
group, and the member is part of the key, `{wamid}:{status}:{member}`; a status value outside
sent/delivered/read/failed/played, a change whose `field` is not `messages`, and
account-level `value.errors[]` give no event.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from estafeta.errors import HttpError
from estafeta.ingress.generic import ParsedEvent
from estafeta.ingress.providers.base import (
    InboundRequest,
    bounded_key,
    digest_key,
    dumps,
    e164,
    equal,
    flag,
    load_json,
    nonempty,
    number,
    obj,
    objects,
    phone_digits,
    require_all,
    seconds_to_ms,
    sent_message_id,
    text,
    whole,
)

if TYPE_CHECKING:
    from estafeta.config import SourceConfig

PROVIDER = "whatsapp_cloud"
MEDIA_KINDS = frozenset({"image", "audio", "video", "document", "sticker"})
# Meta's status → ours (DESIGN §3.4: sent, delivered, read, failed).
_STATUSES = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "read",
    "played": "read",
    "failed": "failed",
}


class WhatsAppCloudSource:
    """A `kind = "whatsapp_cloud"` source: `app_secret` and `verify_token` (DESIGN §3.2)."""

    kind: str = PROVIDER
    methods: tuple[str, ...] = ("GET", "POST")  # GET: Meta's verification handshake
    accepted_status = 200  # Meta retries anything else for 7 days
    answers_twiml = False

    def __init__(self, config: SourceConfig) -> None:
        # Several while rotated (docs/operations.md): a webhook signed with any is Meta's.
        self._app_secrets = tuple(
            secret.encode() for secret in require_all(config, PROVIDER, "app_secret")
        )
        self._verify_tokens = config.secrets_of("verify_token")

    def handshake(self, request: InboundRequest) -> str:
        """contracts §1.1: `hub.challenge`, verbatim, when mode and verify token match."""
        if not self._verify_tokens:
            raise HttpError(
                403,
                "invalid_verify_token",
                "this source has no verify_token, so it cannot answer Meta's handshake",
            )
        if request.query.get("hub.mode") != "subscribe":
            raise HttpError(403, "invalid_verify_token", "hub.mode must be 'subscribe'")
        token = request.query.get("hub.verify_token")
        if token is None or not any(equal(token, known) for known in self._verify_tokens):
            raise HttpError(
                403, "invalid_verify_token", "hub.verify_token does not match this source"
            )
        challenge = request.query.get("hub.challenge")
        if challenge is None:
            raise HttpError(400, "missing_challenge", "the handshake has no hub.challenge")
        return challenge

    def verify(self, request: InboundRequest) -> None:
        """contracts §1.2: HMAC-SHA256 of the raw body with the app secret, constant time."""
        given = request.headers.get("x-hub-signature-256")
        if not given:
            raise HttpError(401, "missing_signature", "missing X-Hub-Signature-256 header")
        given = given.strip().lower()
        if not any(
            equal(given, f"sha256={hmac.digest(secret, request.body, 'sha256').hex()}")
            for secret in self._app_secrets
        ):
            raise HttpError(
                401,
                "invalid_signature",
                "X-Hub-Signature-256 does not match the body and the app secret",
            )

    def parse(self, request: InboundRequest) -> list[ParsedEvent]:
        """contracts §1.3–§1.5: every message and status of every change of every entry."""
        document = load_json(request)
        if not isinstance(document, dict) or not isinstance(document.get("entry"), list):
            raise HttpError(
                400,
                "invalid_body",
                'expected a WhatsApp Cloud webhook: a JSON object with "entry" (a list)',
            )
        events: list[ParsedEvent] = []
        for entry in objects(document["entry"]):
            waba_id = nonempty(entry.get("id"))
            for change in objects(entry.get("changes")):
                if change.get("field", "messages") != "messages":
                    continue  # account_update, template status …: not messages
                events.extend(_value_events(obj(change.get("value")), waba_id))
        return events


@dataclass(frozen=True, slots=True)
class _Business:
    """The business side of one `value`: its number and ids."""

    to: str | None
    phone_number_id: str | None
    waba_id: str | None


def _value_events(value: Mapping[str, Any], waba_id: str | None) -> list[ParsedEvent]:
    metadata = obj(value.get("metadata"))
    business = _Business(
        to=e164(metadata.get("display_phone_number")),
        phone_number_id=nonempty(metadata.get("phone_number_id")),
        waba_id=waba_id,
    )
    contacts = objects(value.get("contacts"))
    messages = objects(value.get("messages"))
    # Match names by wa_id, never by position: a batch lists contacts in its own order.
    names: dict[str, str] = {}
    for contact in contacts:
        wa_id, name = (
            _wa_key(contact.get("wa_id")),
            nonempty(obj(contact.get("profile")).get("name")),
        )
        if wa_id is not None and name is not None:
            names.setdefault(wa_id, name)
    # One message, one contact: that contact is the sender, however its wa_id is written.
    sole = next(iter(names.values())) if len(contacts) == len(messages) == len(names) == 1 else None
    events = [
        _message_event(message, business, names.get(_wa_key(message.get("from")) or "", sole))
        for message in messages
    ]
    for status in objects(value.get("statuses")):
        event = _status_event(status, business)
        if event is not None:
            events.append(event)
    return events


def _wa_key(value: object) -> str | None:
    return phone_digits(value) or nonempty(value)


def _message_event(
    message: Mapping[str, Any], business: _Business, contact_name: str | None
) -> ParsedEvent:
    raw = dumps(message)
    wamid = nonempty(message.get("id"))
    sender = message.get("from")
    data: dict[str, Any] = {
        "channel": "whatsapp",
        "provider": PROVIDER,
        "message_id": wamid,
        "conversation_id": _wa_key(sender),
        "from": e164(sender),
        "to": business.to,
        "phone_number_id": business.phone_number_id,
        "waba_id": business.waba_id,
        "contact_name": contact_name,
        **message_content(message),
    }
    context = obj(message.get("context"))
    replied_to = nonempty(context.get("id"))
    if replied_to is not None:
        data["context"] = {"message_id": replied_to, "from": e164(context.get("from"))}
        if isinstance(context.get("referred_product"), dict):  # a question about a product
            data["context"]["referred_product"] = context["referred_product"]
    for forward in ("forwarded", "frequently_forwarded"):
        if context.get(forward) is True:
            data[forward] = True
    if isinstance(message.get("referral"), dict):
        data["referral"] = message["referral"]
    errors = objects(message.get("errors"))
    if errors:
        data["error"] = error_of(errors[0])
    key = bounded_key(wamid) if wamid else digest_key(PROVIDER, raw)
    return ParsedEvent(
        type="message.received",
        data=data,
        idempotency_key=key,
        occurred_at=seconds_to_ms(message.get("timestamp")),
        raw=raw,
    )


def _status_event(status: Mapping[str, Any], business: _Business) -> ParsedEvent | None:
    provider_status = nonempty(status.get("status"))
    normalized = _STATUSES.get(provider_status or "")
    if provider_status is None or normalized is None:
        return None
    raw = dumps(status)
    wamid = nonempty(status.get("id"))
    recipient = status.get("recipient_id")
    # contracts §1.5: in a group, `recipient_id` is the group and the member this status is
    # about is `recipient_participant_id`; each member reads the same message.
    member = _wa_key(status.get("recipient_participant_id"))
    in_group = member is not None or status.get("recipient_type") == "group"
    data: dict[str, Any] = {
        "channel": "whatsapp",
        "provider": PROVIDER,
        "status": normalized,
        "provider_status": provider_status,
        "message_id": wamid,
        "recipient": e164(member if in_group else recipient),
        "conversation_id": _wa_key(recipient),
        "phone_number_id": business.phone_number_id,
        "waba_id": business.waba_id,
    }
    if in_group:
        data["group"] = {"id": nonempty(recipient), "name": None}
    errors = objects(status.get("errors"))
    if errors:
        data["error"] = error_of(errors[0])
    elif normalized == "failed":
        data["error"] = {"code": None, "title": None, "message": None, "details": None}
    for passthrough in ("pricing", "conversation"):
        if isinstance(status.get(passthrough), dict):
            data[passthrough] = status[passthrough]
    callback_data = text(status.get("biz_opaque_callback_data"))
    if callback_data is not None:
        data["biz_opaque_callback_data"] = callback_data
        ours = sent_message_id(callback_data)
        if ours is not None:  # our `msg_…` id, echoed (connectors/whatsapp/cloud.py)
            data["sent_message_id"] = ours
    # One member's `read` must not be dropped as a repeat of another's: the member is keyed.
    keyed = f"{wamid}:{provider_status}" + (f":{member}" if member else "")
    key = bounded_key(keyed) if wamid else digest_key(PROVIDER, raw)
    return ParsedEvent(
        type="message.status",
        data=data,
        idempotency_key=key,
        occurred_at=seconds_to_ms(status.get("timestamp")),
        raw=raw,
    )


def error_of(error: Mapping[str, Any]) -> dict[str, Any]:
    """contracts §1.5/§1.7: `{code, title, message, error_data.details}` of one error."""
    return {
        "code": whole(error.get("code")),
        "title": text(error.get("title")),
        "message": text(error.get("message")),
        "details": text(obj(error.get("error_data")).get("details")),
    }


def message_content(message: Mapping[str, Any]) -> dict[str, Any]:
    """`kind`, `text` and the kind's own block of a Cloud API message (contracts §1.4).

    `text` is what the customer said in words: the body, a media caption, or the title of
    the button or list row they tapped. Also used for SendPulse, which passes Meta's
    message object through (contracts §9.4).
    """
    kind = nonempty(message.get("type"))
    block = obj(message.get(kind)) if kind else {}
    if kind == "text":
        return {"kind": "text", "text": text(block.get("body"))}
    if kind in MEDIA_KINDS:
        # An empty caption says nothing: null, as Twilio's empty `Body` reads.
        caption = nonempty(block.get("caption"))
        media = {
            "id": nonempty(block.get("id")),
            "mime_type": text(block.get("mime_type")),
            "sha256": text(block.get("sha256")),
            "caption": caption,
            "filename": text(block.get("filename")),
            "url": text(block.get("url")),
            "voice": flag(block.get("voice")) is True if kind == "audio" else None,
        }
        return {"kind": kind, "text": caption, "media": media}
    if kind == "location":
        return {"kind": "location", "text": None, "location": location_of(block)}
    if kind == "contacts":
        return {"kind": "contacts", "text": None, "contacts": objects(message.get("contacts"))}
    if kind == "interactive":
        interactive = _interactive(block)
        return {"kind": "interactive", "text": interactive["title"], "interactive": interactive}
    if kind == "button":
        button = {"text": text(block.get("text")), "payload": text(block.get("payload"))}
        return {"kind": "button", "text": button["text"], "button": button}
    if kind == "reaction":
        reaction = {
            "message_id": nonempty(block.get("message_id")),
            "emoji": nonempty(block.get("emoji")),  # absent when a reaction is removed
        }
        return {"kind": "reaction", "text": None, "reaction": reaction}
    # Meta's own `unsupported` names the real type inside; any other type is kept whole.
    if kind == "unsupported":
        unsupported = {"type": nonempty(block.get("type")), "part": message.get(kind)}
    else:
        unsupported = {"type": kind, "part": message.get(kind) if kind else None}
    return {"kind": "unsupported", "text": None, "unsupported": unsupported}


def location_of(block: Mapping[str, Any]) -> dict[str, Any]:
    """`{latitude, longitude, name, address, url}` of a location block."""
    return {
        "latitude": number(block.get("latitude")),
        "longitude": number(block.get("longitude")),
        "name": text(block.get("name")),
        "address": text(block.get("address")),
        "url": text(block.get("url")),
    }


def _interactive(block: Mapping[str, Any]) -> dict[str, Any]:
    reply_type = nonempty(block.get("type"))
    part = obj(block.get(reply_type)) if reply_type else {}
    interactive: dict[str, Any] = {
        "type": reply_type,
        "id": text(part.get("id")),
        "title": text(part.get("title")),
        "description": text(part.get("description")),
    }
    if reply_type == "nfm_reply":  # a WhatsApp Flow's answer
        interactive["title"] = text(part.get("body"))
        interactive["response_json"] = text(part.get("response_json"))
    return interactive
