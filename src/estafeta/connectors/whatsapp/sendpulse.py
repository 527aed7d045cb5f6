"""SendPulse chatbots, WhatsApp channel: send one message (contracts §9.5–§9.8).

Token (§9.6): `POST {api_base}/oauth/access_token` with the JSON body `{"grant_type":
"client_credentials", "client_id", "client_secret"}` → `{"access_token", "token_type":
"Bearer", "expires_in": 3600}`. The token is cached until shortly before it expires (a
minute, or a tenth of its life when that is shorter) and shared by concurrent sends (one
fetch at a time). A send answered 401 drops it, fetches a new one and is retried once, as
SendPulse's own SDK does; a second 401 is PERMANENT `sendpulse_401`. A token request
answered 401 (`{"error": "invalid_client", …}`: wrong client_id/secret) is PERMANENT
`sendpulse_invalid_client`; one answered with the rate-limit code 2020202020 (token requests
count against the 10 a second too) is a RETRYABLE slow-down on any status, as a send is.

Send (§9.5, §9.8): the hub knows a customer's number, not their SendPulse contact id, so it
sends by phone: `POST {api_base}/whatsapp/contacts/sendByPhone` `{"bot_id", "phone": digits,
"message": {"type": "text", "text": {"body"}}}` (media: `image`/`document` `{link,
caption?}`, `audio` `{link}`; SendPulse's message types have no video → PERMANENT
`unsupported_message`), and templates by `POST …/sendTemplateByPhone` `{"bot_id", "phone",
"template": {"name", "language": {"code"}, "components"}}`. `api_base` defaults to
`https://api.sendpulse.com`.

Answer: 200 `{"success": true, "data": <Message>}`; `data.id` (SendPulse's message id) is the
outcome's `external_id`; a 2xx with neither `"success": true` nor `data.id` is not
SendPulse's answer: RETRYABLE `sendpulse_no_message_id`. SendPulse sends no status webhooks
(§9.1, §9.10 item 5), so no inbound event names it; statuses can only be polled
(`GET /whatsapp/chats/messages`).

Errors (§9.7, third-party): `{"message", "error_code"}`. HTTP 429, or `error_code`
2020202020 ("More than 10 requests per second") on any status — a `{"success": false}` 200
included, since SendPulse maps its codes to no status — are RETRYABLE slow-downs; 5xx are
RETRYABLE; any other `success: false` in a 200 and other 4xx are PERMANENT. The whole
attempt, token included, is bounded by `timeout_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import msgspec
import orjson

from estafeta.connectors.exchange import elapsed_ms
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

PROVIDER = "sendpulse"
DEFAULT_API_BASE = "https://api.sendpulse.com"
RATE_CODES = frozenset({2020202020})
# §9.5: "text with emoji of up to 1024 unicode characters" (and media links must be HTTPS).
# Not checked before a send (SendPulse's own answer says it best); the API refuses at the door.
MAX_TEXT = 1024
_JSON = {"content-type": "application/json"}


def build_request(message: OutboundMessage, bot_id: str) -> tuple[str, dict[str, Any]] | str:
    """(path, JSON body) for `message`, or the reason SendPulse cannot send it."""
    base = {"bot_id": bot_id, "phone": message.digits}
    if message.template is not None:
        name = message.template.get("name")
        if not isinstance(name, str) or not name:
            return "a SendPulse template needs a name (content_sid is Twilio's)"
        language = message.template.get("language")
        template: dict[str, Any] = {
            "name": name,
            "language": dict(language) if isinstance(language, Mapping) else {"code": language},
            "components": list(message.template.get("components") or []),
        }
        return "whatsapp/contacts/sendTemplateByPhone", base | {"template": template}
    if message.text is not None:
        body: dict[str, Any] = {"type": "text", "text": {"body": message.text}}
    else:
        assert message.media is not None  # noqa: S101 - one of the three, by construction
        kind = str(message.media["kind"])
        if kind == "video":
            return "SendPulse's WhatsApp messages have no video type (§9.5)"
        media: dict[str, Any] = {"link": message.media["url"]}
        if message.media.get("caption") is not None:
            media["caption"] = message.media["caption"]
        body = {"type": kind, kind: media}
    return "whatsapp/contacts/sendByPhone", base | {"message": body}


def outcome_of(reply: Reply) -> Outcome:
    """What a send answer means (module docstring); pure, for table-driven tests."""
    document = reply.json()
    fields = document if isinstance(document, dict) else {}
    code: int | str | None = fields.get("error_code")
    if not isinstance(code, int) or isinstance(code, bool):
        code = fields.get("error") if isinstance(fields.get("error"), str) else None
    message = fields.get("message") or fields.get("error_description")
    title = message if isinstance(message, str) else None
    throttled = code in RATE_CODES
    if 200 <= reply.status <= 299:
        if fields.get("success") is False:
            kind = OutcomeKind.RETRYABLE if throttled else OutcomeKind.PERMANENT
            return provider_error(
                reply, kind, PROVIDER, code or "unsuccessful", title, throttled=throttled
            )
        data = fields.get("data")
        message_id = data.get("id") if isinstance(data, dict) else None
        message_id = message_id if isinstance(message_id, str) and message_id else None
        # No status webhook ever names the id (§9.10 item 5): SendPulse's `success: true`
        # is enough, but a 2xx with neither is not SendPulse's answer.
        if fields.get("success") is not True and message_id is None:
            return no_message_id(reply, PROVIDER, '"success": true', "SendPulse")
        return success(reply, message_id)
    if reply.status == 429 or throttled:
        kind = OutcomeKind.RETRYABLE
    else:
        kind = classify_status(reply.status)
    return provider_error(reply, kind, PROVIDER, code, title, throttled=throttled)


def token_of(reply: Reply) -> tuple[str, float] | Outcome:
    """(access_token, expires_in seconds) from a token answer, or the failure (§9.6)."""
    document = reply.json()
    fields = document if isinstance(document, dict) else {}
    token = fields.get("access_token")
    if 200 <= reply.status <= 299 and isinstance(token, str) and token:
        expires_in = fields.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
            return token, 3600.0  # §9.6: "valid for 1 hour"
        return token, float(expires_in) if expires_in > 0 else 3600.0
    description = fields.get("error_description") or fields.get("message")
    code = fields.get("error_code")
    if code in RATE_CODES:  # the 10 requests a second count token requests too (§9.7)
        title = description if isinstance(description, str) else None
        kind = OutcomeKind.RETRYABLE
        return provider_error(reply, kind, PROVIDER, code, title, throttled=True)
    if 200 <= reply.status <= 299:
        return provider_error(reply, OutcomeKind.RETRYABLE, PROVIDER, "token", "no access_token")
    error = fields.get("error")
    return provider_error(
        reply,
        classify_status(reply.status),
        PROVIDER,
        error if isinstance(error, str) else None,
        description if isinstance(description, str) else None,
    )


class SendPulseClient:
    """Sends through one SendPulse bot (`client_id`, `client_secret`, `bot_id`)."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        bot_id: str,
        session: aiohttp.ClientSession,
        timeout_s: float,
        api_base: str | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        base = api_base or DEFAULT_API_BASE
        self._base = base
        self._token_url = join_url(base, "oauth/access_token")
        self._credentials = orjson.dumps(
            {
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": client_secret,
            }
        )
        self._bot_id = bot_id
        self._session = session
        self._timeout_s = timeout_s
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._expires_at = 0.0  # time.monotonic()

    async def send(self, message: OutboundMessage) -> Outcome:
        request = build_request(message, self._bot_id)
        if isinstance(request, str):
            return refused("unsupported_message", request)
        path, body = request
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                outcome = await self._send(join_url(self._base, path), orjson.dumps(body))
        except TimeoutError:
            return Outcome(
                kind=OutcomeKind.RETRYABLE,
                duration_ms=elapsed_ms(started),
                error_class="timeout",
                response_excerpt=f"no answer from SendPulse within {self._timeout_s:g} s",
            )
        return msgspec.structs.replace(outcome, duration_ms=elapsed_ms(started))

    async def _send(self, url: str, body: bytes) -> Outcome:
        for attempt in (1, 2):
            token = await self._access_token()
            if isinstance(token, Outcome):
                return token
            reply = await exchange(
                self._session,
                url,
                timeout_s=self._timeout_s,
                headers=_JSON | {"authorization": f"Bearer {token}"},
                body=body,
            )
            if isinstance(reply, Outcome):
                return reply
            if reply.status == 401 and attempt == 1:
                self._forget(token)  # expired or revoked early: one fresh token, one retry
                continue
            return outcome_of(reply)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _access_token(self) -> str | Outcome:
        async with self._lock:
            if self._token is not None and time.monotonic() < self._expires_at:
                return self._token
            reply = await exchange(
                self._session,
                self._token_url,
                timeout_s=self._timeout_s,
                headers=_JSON,
                body=self._credentials,
            )
            if isinstance(reply, Outcome):
                return reply
            fetched = token_of(reply)
            if isinstance(fetched, Outcome):
                return fetched
            token, expires_in = fetched
            self._token = token
            self._expires_at = time.monotonic() + expires_in - min(60.0, expires_in / 10)
            return token

    def _forget(self, token: str) -> None:
        """Drop `token` unless a concurrent send has already replaced it."""
        if self._token == token:
            self._token = None
