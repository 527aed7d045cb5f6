"""Z-API (z-api.io): send one message (contracts §3.1, §3.5).

Request: `POST {api_base}/instances/{instance_id}/token/{instance_token}/{endpoint}` with the
header `Client-Token: {client_token}` (§3.1) and a JSON body; `api_base` defaults to
`https://api.z-api.io`. `phone` is digits only, with the country code.

* text → `send-text` `{"phone", "message"}` (§3.5);
* image → `send-image` `{"phone", "image": url, "caption"?}`, video → `send-video`
  `{"phone", "video", "caption"?}`, audio → `send-audio` `{"phone", "audio"}`, document →
  `send-document/{extension}` `{"phone", "document", "fileName"?, "caption"?}`, the
  extension taken from the file name or the URL (Z-API's docs, `docs/message/send-message-*`;
  the same success body as send-text);
* templates: Z-API drives WhatsApp Web and has no Meta templates → PERMANENT
  `unsupported_message`, without a request.

Answer: 200 `{"zaapId", "messageId", "id"}`. The outcome's `external_id` is `messageId`
(else `id`, else `zaapId`): §3.6 says `messageId` is what the `MessageStatusCallback`'s
`ids[]` carry. Its `external_alt_id` is `zaapId`: a `DeliveryCallback` requires only
`zaapId` (§3.4; `messageId` is optional), and the ingress (`zapi.py`) reads `messageId`,
else `zaapId`, into `data.message_id`, so a callback without `messageId` — a failed send's,
with `error` — names the message by its `zaapId` alone. A 2xx with none of the three ids
is PERMANENT when it has an `error`, else not Z-API's answer: RETRYABLE `zapi_no_message_id`.

Errors: Z-API documents only 405 and 415 for send-text, and `{"error": "null not allowed"}`
for a missing Client-Token (status not documented). There are no error codes: the HTTP status
decides (`classify_status`: 429 and 5xx RETRYABLE, other 4xx PERMANENT), the class is
`zapi_http_{status}` and the excerpt starts `{status} {error}`.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import orjson

from estafeta.connectors.whatsapp.base import (
    Reply,
    exchange,
    join_url,
    no_message_id,
    provider_error,
    refused,
    success,
)
from estafeta.connectors.whatsapp.message import OutboundMessage
from estafeta.delivery.decision import classify_status
from estafeta.delivery.outcome import Outcome, OutcomeKind

PROVIDER = "zapi"
DEFAULT_API_BASE = "https://api.z-api.io"
_EXTENSION = re.compile(r"\.([A-Za-z0-9]{1,10})$")


def instance_url(api_base: str | None, instance_id: str, instance_token: str) -> str:
    """`{api_base}/instances/{instance_id}/token/{instance_token}` (contracts §3.1)."""
    return join_url(api_base or DEFAULT_API_BASE, f"instances/{instance_id}/token/{instance_token}")


def build_request(message: OutboundMessage) -> tuple[str, dict[str, Any]] | str:
    """(endpoint, JSON body) for `message`, or the reason Z-API cannot send it."""
    if message.text is not None:
        return "send-text", {"phone": message.digits, "message": message.text}
    if message.media is None:
        return "Z-API sends through WhatsApp Web and has no Meta message templates"
    kind = str(message.media["kind"])
    url = str(message.media["url"])
    body: dict[str, Any] = {"phone": message.digits, kind: url}
    caption = message.media.get("caption")
    if caption is not None and kind != "audio":
        body["caption"] = caption
    if kind != "document":
        return f"send-{kind}", body
    filename = message.media.get("filename")
    extension = _extension(str(filename)) if filename else None
    extension = extension or _extension(unquote(urlsplit(url).path))
    if extension is None:
        return "Z-API needs the document's extension: give a filename such as 'laudo.pdf'"
    if filename:
        body["fileName"] = filename
    return f"send-document/{extension}", body


def _extension(name: str) -> str | None:
    found = _EXTENSION.search(name)
    return found.group(1).lower() if found else None


def outcome_of(reply: Reply) -> Outcome:
    """What a Z-API answer means (module docstring); pure, for table-driven tests."""
    document = reply.json()
    fields = document if isinstance(document, dict) else {}
    error = fields.get("error") or fields.get("message")
    title = error if isinstance(error, str) else None
    if 200 <= reply.status <= 299:
        zaap_id = fields.get("zaapId")
        alt_id = zaap_id if isinstance(zaap_id, str) and zaap_id else None
        for key in ("messageId", "id", "zaapId"):
            value = fields.get(key)
            if isinstance(value, str) and value:
                return success(reply, value, alt_id)
        if title is not None:  # a 2xx that only says what went wrong
            return provider_error(reply, OutcomeKind.PERMANENT, PROVIDER, None, title)
        return no_message_id(reply, PROVIDER, "messageId", "Z-API")
    return provider_error(reply, classify_status(reply.status), PROVIDER, None, title)


class ZApiClient:
    """Sends through one Z-API instance (`instance_id`, `instance_token`, `client_token`)."""

    def __init__(
        self,
        *,
        instance_id: str,
        instance_token: str,
        client_token: str,
        session: aiohttp.ClientSession,
        timeout_s: float,
        api_base: str | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        self._base = instance_url(api_base, instance_id, instance_token)
        self._headers = {"Client-Token": client_token, "Content-Type": "application/json"}
        self._secrets = (instance_token,)
        self._session = session
        self._timeout_s = timeout_s

    async def send(self, message: OutboundMessage) -> Outcome:
        request = build_request(message)
        if isinstance(request, str):
            return refused("unsupported_message", request)
        endpoint, body = request
        reply = await exchange(
            self._session,
            join_url(self._base, endpoint),
            timeout_s=self._timeout_s,
            headers=self._headers,
            body=orjson.dumps(body),
            secrets=self._secrets,
        )
        return reply if isinstance(reply, Outcome) else outcome_of(reply)
