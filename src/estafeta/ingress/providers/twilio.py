"""Twilio Programmable Messaging, WhatsApp channel: signature and normalization.

* contracts §2.1: `X-Twilio-Signature` = base64(HMAC-SHA1(auth_token, url + every POST
  parameter's name and value, sorted by name)). The URL is the source's `public_url` + the
  request's path and query when set (behind a proxy the hub does not see the URL Twilio
  called), else the request's URL; as Twilio's own validator does, it is also tried with
  the default port added or the explicit port removed. A JSON body is signed through the
  URL's `bodySHA256` parameter instead.
* contracts §2.2: an inbound message → `message.received`, keyed by `MessageSid`.
* contracts §2.3: a status callback (`MessageStatus`, and no `Body`/`NumMedia`, which
  only inbound messages carry) → `message.status`, keyed by `{MessageSid}:{MessageStatus}`.

Status decisions (DESIGN §3.4 knows sent, delivered, read, failed): `sent`, `delivered`,
`read` and `failed` map to themselves, `undelivered` and `canceled` to `failed` (the message
will never arrive); `queued`, `sending`, `accepted`, `scheduled`, `receiving`, `received`
and `partially_delivered` are steps before an outcome (or not about WhatsApp) and give no
event. `provider_status` keeps Twilio's word, so undelivered is still told from failed.
A status called back at the URL the hub's send gave (`connectors/whatsapp/twilio.py`)
carries the sent message's `msg_…` id from its `sent_message_id` query parameter, which
Twilio signs with the rest of the URL, as `data.sent_message_id`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from estafeta.errors import HttpError
from estafeta.ingress.generic import ParsedEvent
from estafeta.ingress.providers.base import (
    InboundRequest,
    bounded_key,
    dumps,
    e164,
    equal,
    flag,
    no_handshake,
    number,
    phone_digits,
    require_all,
    sent_message_id,
    whole,
)
from estafeta.messaging.facts import SENT_MESSAGE_PARAM

if TYPE_CHECKING:
    from estafeta.config import SourceConfig

PROVIDER = "twilio"
FORM = "application/x-www-form-urlencoded"
_STATUSES = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "read",
    "failed": "failed",
    "undelivered": "failed",
    "canceled": "failed",
}
_MEDIA_KINDS = ("image", "audio", "video", "document", "sticker")
_MAX_MEDIA = 10  # contracts §2.2: NumMedia is "0".."10"

Params = dict[str, list[str]]


def signature(auth_token: bytes, url: str, params: Mapping[str, list[str]]) -> str:
    """contracts §2.1: the `X-Twilio-Signature` of a request to `url` with `params`."""
    signed = url + "".join(
        name + value for name in sorted(params) for value in sorted(params[name])
    )
    digest = hmac.new(auth_token, signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


class TwilioSource:
    """A `kind = "twilio"` source: `auth_token`, and `public_url` behind a proxy."""

    kind: str = PROVIDER
    methods: tuple[str, ...] = ("POST",)
    accepted_status = 200
    answers_twiml = True

    def __init__(self, config: SourceConfig) -> None:
        # Several while rotated (docs/operations.md): Twilio signs with its primary token.
        self._auth_tokens = tuple(
            token.encode() for token in require_all(config, PROVIDER, "auth_token")
        )
        self._public_url = config.public_url.rstrip("/") if config.public_url else None

    def handshake(self, request: InboundRequest) -> str:
        raise no_handshake(PROVIDER)

    def signed_url(self, request: InboundRequest) -> str:
        """The URL Twilio signed: `public_url` + path and query, or the request's URL."""
        return self._public_url + request.path_qs if self._public_url else request.url

    def verify(self, request: InboundRequest, signed_url: str | None = None) -> None:
        """contracts §2.1, constant time, over every URL variant Twilio's validator accepts;
        `signed_url`: the URL signed, when the request came to another source's
        (ingress/endpoint.py: `owned`), else this source's `signed_url`."""
        given = request.headers.get("x-twilio-signature")
        if not given:
            raise HttpError(401, "missing_signature", "missing X-Twilio-Signature header")
        params = _signed_params(request)
        if params is not None:
            for url in _url_variants(signed_url or self.signed_url(request)):
                for token in self._auth_tokens:
                    if equal(given, signature(token, url, params)):
                        return
        raise HttpError(
            401,
            "invalid_signature",
            "X-Twilio-Signature does not match the URL, the parameters and the auth token "
            "(behind a proxy, set the source's public_url)",
        )

    def parse(self, request: InboundRequest) -> list[ParsedEvent]:
        """contracts §2.2/§2.3: one inbound message or one status callback per request."""
        if request.content_type != FORM:
            raise HttpError(
                415,
                "unsupported_media_type",
                f"expected Content-Type {FORM}, got {request.content_type or 'none'!r}",
            )
        params = form(request.body)
        if params is None:
            raise HttpError(400, "invalid_body", "the form body is not UTF-8")
        fields = {name: values[0] for name, values in params.items()}
        raw = dumps({name: v[0] if len(v) == 1 else v for name, v in params.items()})
        sid = fields.get("MessageSid") or fields.get("SmsMessageSid") or fields.get("SmsSid")
        if not sid:
            raise HttpError(
                400, "invalid_body", "expected a Twilio message webhook: MessageSid is missing"
            )
        status = fields.get("MessageStatus")
        if status is not None and "Body" not in fields and "NumMedia" not in fields:
            # The send's StatusCallback names the message it was (Twilio signs the URL).
            ours = sent_message_id(request.query.get(SENT_MESSAGE_PARAM))
            return _status_events(fields, sid, status, raw, ours)
        return [_message_event(fields, sid, raw)]


def own_number(request: InboundRequest, event: ParsedEvent) -> str | None:
    """The number of the source `event` is for, `+<digits>` (`SourceConfig.own_number`): an
    incoming message's `To`, a status callback's `From` (the number that sent it)."""
    if event.type == "message.received":
        to = event.data.get("to")
        return to if isinstance(to, str) else None
    sender = (form(request.body) or {}).get("From")
    return e164(sender[0]) if sender else None


def form(body: bytes) -> Params | None:
    """The parameters of a form body, each name with its values; None if it is not UTF-8."""
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        return None
    params: Params = {}
    for name, value in pairs:
        params.setdefault(name, []).append(value)
    return params


def _signed_params(request: InboundRequest) -> Params | None:
    """The parameters the signature covers, or None when the body cannot match any."""
    body_hash = request.query.get("bodySHA256")
    if body_hash is not None:
        # The URL is signed alone and the body only through this hash, so the hash is
        # checked whatever the Content-Type says: a replayed URL must not carry another body.
        actual = hashlib.sha256(request.body).hexdigest()
        return {} if equal(body_hash.lower(), actual) else None
    if request.content_type == FORM:
        params = form(request.body)
        if params is None:
            # No signature can match a form that cannot be read: said so, where the usual
            # detail sent the operator to mend a public_url or an auth token that were right.
            raise HttpError(
                401,
                "invalid_signature",
                "the form body is not UTF-8: no X-Twilio-Signature can match it",
            )
        return params
    return {}  # GET, or a POST without form parameters: the URL alone is signed


def _url_variants(url: str) -> list[str]:
    """`url`, and `url` with its default port added or its explicit port removed."""
    variants = [url]
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return variants
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return variants
    if port is None:
        default = 443 if parts.scheme == "https" else 80
        variants.append(urlunsplit(parts._replace(netloc=f"{parts.netloc}:{default}")))
    else:
        variants.append(urlunsplit(parts._replace(netloc=parts.netloc.rsplit(":", 1)[0])))
    return variants


def _channel(address: str | None, fallback: str | None = None) -> str:
    """`whatsapp` for `whatsapp:+…` addresses; Twilio's plain numbers are SMS."""
    if fallback:
        return fallback
    if address and ":" in address:
        return address.split(":", 1)[0]
    return "sms"


def _message_event(fields: Mapping[str, str], sid: str, raw: str) -> ParsedEvent:
    sender = fields.get("From")
    body = fields.get("Body") or None
    data: dict[str, Any] = {
        "channel": _channel(sender),
        "provider": PROVIDER,
        "message_id": sid,
        "conversation_id": phone_digits(fields.get("WaId")) or phone_digits(sender),
        "from": e164(sender),
        "to": e164(fields.get("To")),
        "account_sid": fields.get("AccountSid"),
        "contact_name": fields.get("ProfileName") or None,
        **_content(fields, body),
    }
    replied_to = fields.get("OriginalRepliedMessageSid")
    if replied_to:
        data["context"] = {
            "message_id": replied_to,
            "from": e164(fields.get("OriginalRepliedMessageSender")),
        }
    for name, key in (("Forwarded", "forwarded"), ("FrequentlyForwarded", "frequently_forwarded")):
        if flag(fields.get(name)) is True:
            data[key] = True
    referral = {
        key: fields[name]
        for name, key in (
            ("ReferralSourceUrl", "source_url"),
            ("ReferralSourceId", "source_id"),
            ("ReferralSourceType", "source_type"),
            ("ReferralBody", "body"),
            ("ReferralHeadline", "headline"),
            ("ReferralCtwaClid", "ctwa_clid"),
        )
        if fields.get(name)
    }
    if referral:
        data["referral"] = referral
    # contracts §2.2: what an interactive reply or a WhatsApp Flow says, as Twilio's JSON
    # strings (kept as strings, as the Cloud reader keeps a Flow's `response_json`).
    for name, key in (("InteractiveData", "interactive_data"), ("FlowData", "flow_data")):
        if fields.get(name):
            data[key] = fields[name]
    return ParsedEvent(
        type="message.received", data=data, idempotency_key=bounded_key(sid), raw=raw
    )


def _content(fields: Mapping[str, str], body: str | None) -> dict[str, Any]:
    """`kind`, `text` and the kind's block, shaped as for WhatsApp Cloud (DESIGN §3.4)."""
    message_type = fields.get("MessageType") or None
    media = _media(fields, body)
    if media:
        kind = message_type if message_type in _MEDIA_KINDS else _media_kind(media[0])
        content: dict[str, Any] = {"kind": kind, "text": body, "media": media[0]}
        if len(media) > 1:
            content["media_items"] = media
        return content
    if fields.get("Latitude") and fields.get("Longitude"):
        location = {
            "latitude": number(fields.get("Latitude")),
            "longitude": number(fields.get("Longitude")),
            "name": fields.get("Label") or None,
            "address": fields.get("Address") or None,
            "url": None,
        }
        return {"kind": "location", "text": body, "location": location}
    if fields.get("ButtonText") or fields.get("ButtonPayload"):
        button = {
            "text": fields.get("ButtonText") or body,
            "payload": fields.get("ButtonPayload") or None,
        }
        return {"kind": "button", "text": button["text"], "button": button}
    if message_type in (None, "text"):
        return {"kind": "text", "text": body}
    return {
        "kind": "unsupported",
        "text": body,
        "unsupported": {"type": message_type, "part": None},
    }


def _media(fields: Mapping[str, str], caption: str | None) -> list[dict[str, Any]]:
    count = min(whole(fields.get("NumMedia")) or 0, _MAX_MEDIA)
    media: list[dict[str, Any]] = []
    for index in range(count):
        url = fields.get(f"MediaUrl{index}")
        if not url:
            continue
        last = url.rstrip("/").rsplit("/", 1)[-1]
        media.append(
            {
                "id": last if last.startswith("ME") else None,  # the Media resource's SID
                "mime_type": fields.get(f"MediaContentType{index}") or None,
                "sha256": None,
                "caption": caption,
                "filename": None,
                "url": url,
                "voice": None,
            }
        )
    return media


def _media_kind(media: Mapping[str, Any]) -> str:
    major = str(media["mime_type"] or "").split("/", 1)[0]
    return major if major in ("image", "audio", "video") else "document"


def _status_events(
    fields: Mapping[str, str], sid: str, provider_status: str, raw: str, ours: str | None
) -> list[ParsedEvent]:
    normalized = _STATUSES.get(provider_status)
    if normalized is None:
        return []  # queued, sending … : not an outcome yet
    recipient = fields.get("To")
    data: dict[str, Any] = {
        "channel": _channel(recipient, fields.get("ChannelPrefix")),
        "provider": PROVIDER,
        "status": normalized,
        "provider_status": provider_status,
        "message_id": sid,
        "recipient": e164(recipient),
        "conversation_id": phone_digits(recipient),
        "account_sid": fields.get("AccountSid"),
    }
    if ours is not None:
        data["sent_message_id"] = ours
    if normalized == "failed" or fields.get("ErrorCode"):
        data["error"] = {
            "code": whole(fields.get("ErrorCode")),
            "title": None,
            "message": fields.get("ErrorMessage") or None,  # optional: fixtures omit it
            "details": None,
        }
    return [
        ParsedEvent(
            type="message.status",
            data=data,
            idempotency_key=bounded_key(f"{sid}:{provider_status}"),
            raw=raw,
        )
    ]
