"""Z-API (z-api.io): token check and normalization.

* DESIGN §3.2, contracts §3.1: Z-API documents no webhook signature, so the webhook URL
  set in Z-API carries `?token=<the source's token>`, compared in constant time.
* contracts §3.3: `ReceivedCallback` → `message.received`, keyed by `messageId`, timed by
  `momment` (ms). One content block per message (text, image, audio …); any other is kept
  as kind `unsupported`.
* contracts §3.4: `MessageStatusCallback` → one `message.status` per id of `ids[]`, keyed by
  `{id}:{status}`; `DeliveryCallback` (Z-API handed the message to WhatsApp) → `sent`, or
  `failed` when it carries `error`, keyed as a status (`{messageId}:SENT` / `:FAILED`).

Decisions: `fromMe: true` is the business's own message echoed back (contracts §3.3 says to
filter it, or it loops): no event; nor for `isNewsletter: true`, a post of a WhatsApp
channel the business follows, which no customer wrote. These flags and `isGroup` decide
whose message it is, so one that is neither a boolean nor null (read as false) is refused
with a 400 naming it rather than guessed. A DeliveryCallback `error` that is not a string is
a failure all the same (kept as its JSON): read as absent, it made a failed send `sent`. A
group message is kept, in the group's conversation (`data.group`), from `participantPhone`.
A sender WhatsApp names by linked id (`…@lid`: `phone`, or `participantPhone` in a group, is
then that id or null) has no `from`; the id is `data.sender_lid`, from `senderLid` or a
group's `participantLid`. An empty `caption` is no caption: null, as Twilio's empty `Body`.
The ad a customer came from (`externalAdReply`) is `data.referral`, keyed as WhatsApp
Cloud's and Twilio's are. A callback with no content block but a `notification` (a missed
call, a group's membership change) is kind `unsupported` of type `notification`, its part
the notification, its parameters and call id.
Statuses map SENT → sent, RECEIVED → delivered, READ and PLAYED → read; PENDING and
READ_BY_ME (the business read the customer's message) give no event. A DeliveryCallback's
key is the one a later `SENT` status of the same message has, so the two collapse into one
`sent` event. Other callback types (connected, disconnected, presence …) give no event. The
key is `messageId` alone, not `instanceId:messageId` (contracts §3.6 says "possibly"): keys
are already scoped per source.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from estafeta.errors import HttpError
from estafeta.ingress.generic import ParsedEvent
from estafeta.ingress.providers.base import (
    InboundRequest,
    TokenInUrlSource,
    bounded_key,
    digest_key,
    dumps,
    e164,
    flag,
    load_json,
    milliseconds,
    nonempty,
    number,
    obj,
    phone_digits,
    text,
)

PROVIDER = "zapi"
_STATUSES = {"SENT": "sent", "RECEIVED": "delivered", "READ": "read", "PLAYED": "read"}
# The media blocks of contracts §3.3 and the key of each one's URL.
_MEDIA = (
    ("image", "imageUrl"),
    ("audio", "audioUrl"),
    ("video", "videoUrl"),
    ("document", "documentUrl"),
    ("sticker", "stickerUrl"),
)
# Object-valued keys of a ReceivedCallback that are not its content.
_ENVELOPE_OBJECTS = frozenset({"externalAdReply"})
# What a ReceivedCallback without content says instead (Z-API's call and group examples).
_NOTIFICATION = ("notification", "notificationParameters", "callId")


class ZApiSource(TokenInUrlSource):
    """A `kind = "zapi"` source: `token`, carried in the webhook URL (DESIGN §3.2)."""

    kind: str = PROVIDER

    def parse(self, request: InboundRequest) -> list[ParsedEvent]:
        """contracts §3.3/§3.4: one callback per request, dispatched on its `type`."""
        document = load_json(request)
        if not isinstance(document, dict) or not isinstance(document.get("type"), str):
            raise HttpError(
                400, "invalid_body", 'expected a Z-API webhook: a JSON object with "type"'
            )
        raw = dumps(document)
        # Compared without case: Z-API's own field table writes `ReceivedCallBack` where its
        # examples send `ReceivedCallback`, and a type not matched here stores nothing.
        callback = document["type"].lower()
        if callback == "receivedcallback":
            return _received(document, raw)
        if callback == "messagestatuscallback":
            return _statuses(document, raw)
        if callback == "deliverycallback":
            return _delivery(document, raw)
        return []


def _boolean(callback: Mapping[str, Any], key: str) -> bool:
    """A documented boolean that decides whose message it is (contracts §3.3): null reads as
    false; any other type is refused, since guessing could make an echo a customer's message."""
    value = callback.get(key)
    if value is None or isinstance(value, bool):
        return value is True
    raise HttpError(400, "invalid_body", f"body.{key}: expected true or false, not {_shown(value)}")


def _shown(value: object, limit: int = 40) -> str:
    shown = dumps(value)
    return shown if len(shown) <= limit else f"{shown[:limit]}…"


def _received(callback: Mapping[str, Any], raw: str) -> list[ParsedEvent]:
    is_group = _boolean(callback, "isGroup")
    if _boolean(callback, "fromMe"):
        return []  # the business's own message, echoed: never customer input
    if _boolean(callback, "isNewsletter"):
        return []  # a post of a channel the business follows: no customer wrote it
    message_id = nonempty(callback.get("messageId"))
    chat = callback.get("phone")  # the customer, or the group id (`…-group`) in a group
    sender_name = nonempty(callback.get("senderName"))
    # In a group, chatName is the group's name: only senderName names the customer.
    contact_name = sender_name if is_group else sender_name or nonempty(callback.get("chatName"))
    data: dict[str, Any] = {
        "channel": "whatsapp",
        "provider": PROVIDER,
        "message_id": message_id,
        "conversation_id": phone_digits(chat) or nonempty(chat),
        "from": e164(callback.get("participantPhone") if is_group else chat),
        "to": e164(callback.get("connectedPhone")),
        "instance_id": nonempty(callback.get("instanceId")),
        "contact_name": contact_name,
        **_content(callback),
    }
    lid = _sender_lid(callback, chat, is_group)
    if lid is not None:
        data["sender_lid"] = lid
    if is_group:
        data["group"] = {"id": nonempty(chat), "name": nonempty(callback.get("chatName"))}
    replied_to = nonempty(callback.get("referenceMessageId"))
    if replied_to is not None:
        data["context"] = {"message_id": replied_to, "from": None}
    if flag(callback.get("forwarded")) is True:
        data["forwarded"] = True
    referral = _referral(obj(callback.get("externalAdReply")))
    if referral:
        data["referral"] = referral
    key = bounded_key(message_id) if message_id else digest_key(PROVIDER, raw)
    if flag(callback.get("isEdit")) is True:
        data["edited"] = True
        # Whether an edit reuses the edited message's id is undocumented: keyed by the id and
        # the new content, an edit is never dropped as a repeat of the original, and the same
        # edit delivered twice is still one event.
        key = bounded_key(f"{key}:edit:{digest_key(data.get('kind'), data.get('text'))}")
    return [
        ParsedEvent(
            type="message.received",
            data=data,
            idempotency_key=key,
            occurred_at=milliseconds(callback.get("momment")),
            raw=raw,
        )
    ]


def _sender_lid(callback: Mapping[str, Any], chat: object, is_group: bool) -> str | None:
    """The sender's WhatsApp linked id (`…@lid`, contracts §3.3 `senderLid`/`participantLid`):
    who wrote when WhatsApp hides their number (`phone`, or a group's `participantPhone`, is
    then that id or null), so `from` is null and only this says who it was."""
    member = [callback.get("participantLid"), callback.get("participantPhone")]
    candidates = [*(member if is_group else [chat]), callback.get("senderLid")]
    return next((lid for value in candidates if (lid := _lid(value)) is not None), None)


def _lid(value: object) -> str | None:
    found = nonempty(value)
    return found if found is not None and found.endswith("@lid") else None


# contracts §3.3 `externalAdReply` (a click-to-WhatsApp ad) → the `referral` keys WhatsApp
# Cloud (§1.4) and Twilio (§2.2) give, so one route reads the ad whatever the provider.
_REFERRAL = (
    ("sourceUrl", "source_url"),
    ("sourceId", "source_id"),
    ("sourceType", "source_type"),
    ("body", "body"),
    ("title", "headline"),
    ("thumbnailUrl", "thumbnail_url"),
    ("ctwaClid", "ctwa_clid"),
)


def _referral(ad: Mapping[str, Any]) -> dict[str, str]:
    """The ad a customer came from (which campaign brought the lead): only the keys Z-API
    gave, so a route tells an ad's lead from any other by `data.referral` alone."""
    return {key: value for name, key in _REFERRAL if (value := nonempty(ad.get(name)))}


def _content(callback: Mapping[str, Any]) -> dict[str, Any]:
    """`kind`, `text` and the kind's block, shaped as for WhatsApp Cloud (DESIGN §3.4)."""
    if isinstance(callback.get("text"), dict):
        return {"kind": "text", "text": text(callback["text"].get("message"))}
    for kind, url_key in _MEDIA:
        block = callback.get(kind)
        if isinstance(block, dict):
            caption = nonempty(block.get("caption"))  # "" says nothing: null, as elsewhere
            media = {
                "id": None,
                "mime_type": text(block.get("mimeType")),
                "sha256": None,
                "caption": caption,
                "filename": text(block.get("fileName")) or text(block.get("title")),
                "url": text(block.get(url_key)),
                "voice": flag(block.get("ptt")) is True if kind == "audio" else None,
            }
            return {"kind": kind, "text": caption, "media": media}
    if isinstance(callback.get("location"), dict):
        block = callback["location"]
        location = {
            "latitude": number(block.get("latitude")),
            "longitude": number(block.get("longitude")),
            "name": text(block.get("name")),
            "address": text(block.get("address")),
            "url": text(block.get("url")),
        }
        return {"kind": "location", "text": None, "location": location}
    if isinstance(callback.get("contact"), dict):
        block = callback["contact"]
        phones = block.get("phones")
        card = {
            "name": {"formatted_name": text(block.get("displayName"))},
            "phones": [
                {"phone": phone}
                for phone in (phones if isinstance(phones, list) else [])
                if isinstance(phone, str)
            ],
            "vcard": text(block.get("vCard")),
        }
        return {"kind": "contacts", "text": None, "contacts": [card]}
    if isinstance(callback.get("reaction"), dict):
        block = callback["reaction"]
        reaction = {
            "message_id": nonempty(obj(block.get("referencedMessage")).get("messageId")),
            "emoji": nonempty(block.get("value")),
        }
        return {"kind": "reaction", "text": None, "reaction": reaction}
    if isinstance(callback.get("buttonsResponseMessage"), dict):
        block = callback["buttonsResponseMessage"]
        interactive = {
            "type": "button_reply",
            "id": text(block.get("buttonId")),
            "title": text(block.get("message")),
            "description": None,
        }
        return {"kind": "interactive", "text": interactive["title"], "interactive": interactive}
    if isinstance(callback.get("listResponseMessage"), dict):
        block = callback["listResponseMessage"]
        interactive = {
            "type": "list_reply",
            "id": text(block.get("selectedRowId")),
            "title": text(block.get("title")),
            "description": text(block.get("message")),
        }
        return {"kind": "interactive", "text": interactive["title"], "interactive": interactive}
    part_type = next(
        (
            name
            for name, value in callback.items()
            if isinstance(value, dict) and name not in _ENVELOPE_OBJECTS
        ),
        None,
    )
    unsupported = {"type": part_type, "part": callback.get(part_type) if part_type else None}
    if part_type is None and nonempty(callback.get("notification")) is not None:
        # A call, missed or not, or a group's membership change: no content block, only
        # Z-API's `notification` and its companions say what happened.
        part = {name: callback.get(name) for name in _NOTIFICATION if name in callback}
        unsupported = {"type": "notification", "part": part}
    return {"kind": "unsupported", "text": None, "unsupported": unsupported}


def _status_data(
    callback: Mapping[str, Any], message_id: str, status: str, provider_status: str
) -> dict[str, Any]:
    phone = callback.get("phone")
    return {
        "channel": "whatsapp",
        "provider": PROVIDER,
        "status": status,
        "provider_status": provider_status,
        "message_id": message_id,
        "recipient": e164(phone),
        "conversation_id": phone_digits(phone) or nonempty(phone),
        "instance_id": nonempty(callback.get("instanceId")),
    }


def _statuses(callback: Mapping[str, Any], raw: str) -> list[ParsedEvent]:
    provider_status = nonempty(callback.get("status"))
    normalized = _STATUSES.get(provider_status or "")
    ids = callback.get("ids")
    if provider_status is None or normalized is None or not isinstance(ids, list):
        return []
    occurred_at = milliseconds(callback.get("momment"))
    events: list[ParsedEvent] = []
    for message_id in dict.fromkeys(nonempty(item) for item in ids):
        if message_id is None:
            continue
        events.append(
            ParsedEvent(
                type="message.status",
                data=_status_data(callback, message_id, normalized, provider_status),
                idempotency_key=bounded_key(f"{message_id}:{provider_status}"),
                occurred_at=occurred_at,
                raw=raw,
            )
        )
    return events


def _delivery(callback: Mapping[str, Any], raw: str) -> list[ParsedEvent]:
    message_id = nonempty(callback.get("messageId")) or nonempty(callback.get("zaapId"))
    if message_id is None:
        return []
    error = _delivery_error(callback.get("error"))
    provider_status = "FAILED" if error else "SENT"
    data = _status_data(callback, message_id, "failed" if error else "sent", provider_status)
    data["zaap_id"] = nonempty(callback.get("zaapId"))
    custom_id = nonempty(callback.get("customId"))
    if custom_id is not None:
        data["custom_id"] = custom_id
    if error:
        data["error"] = {"code": None, "title": None, "message": error, "details": None}
    return [
        ParsedEvent(
            type="message.status",
            data=data,
            idempotency_key=bounded_key(f"{message_id}:{provider_status}"),
            occurred_at=milliseconds(callback.get("momment")),
            raw=raw,
        )
    ]


def _delivery_error(value: object) -> str | None:
    """contracts §3.4: a DeliveryCallback's `error` is a string when the send failed. Absent,
    null, empty or false: no error. One of another shape (an object, a list) is an error all
    the same, kept as its JSON: read as absent, it turned a failed send into `sent`."""
    if value is None or value is False or value in ("", {}, []):
        return None
    error = text(value)
    return error if error is not None else _shown(value, 200)
