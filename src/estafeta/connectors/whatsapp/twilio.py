"""Twilio Programmable Messaging, WhatsApp channel: send one message (contracts §2.4).

Request: `POST {api_base}/2010-04-01/Accounts/{account_sid}/Messages.json`, basic auth
`account_sid:auth_token`, form fields `To=whatsapp:+…`, `From=whatsapp:+…` (the source's
`from`; the `whatsapp:` prefix is added when missing) and the content:

* text → `Body`;
* media → `MediaUrl` (+ the caption as `Body`; Twilio has no file name for WhatsApp);
* template → `ContentSid` (`HX…`, a Content API template: the template's `content_sid`, or
  its `name` when that is a Content SID) + `ContentVariables`, a JSON object: the
  template's `variables`, else the text parameters of its `body` components numbered from
  "1". A Cloud-style template name is not something Twilio can send.

`StatusCallback` is `{public_url}/in/{source}?sent_message_id={msg_…}` when the source has a
`public_url`, so the status callbacks come back to this source's ingress (§2.3) and say
which of our messages they are about (ingress `twilio.py` → `data.sent_message_id`).

Answer: 201 with the Message resource; its `sid` (`SM…`) is the outcome's `external_id`, and
the status callbacks name it `MessageSid` (ingress `twilio.py` → `data.message_id`). A 2xx
without a `sid` that carries Twilio's error body is read as that error, by its code (else
by the `status` its body names, else PERMANENT); with neither it is not Twilio's answer:
RETRYABLE `twilio_no_message_id`.

Errors (`{"code", "message", "more_info", "status"}`, §2.4): HTTP 429, or codes 20429,
63017 and 63018 (rate limits) → RETRYABLE with Retry-After, a slow-down; 63038 (the
account's daily message limit) → PERMANENT whatever the status; 5xx → RETRYABLE; any other
4xx (20003 authentication, 21211 invalid `To`, 63016 outside the 24 h window, …) →
PERMANENT, `twilio_{code}` and `{code} {message}`.

63038 is not a rate to slow down to: Twilio's page for it says the account sent more than
its limit "within a rolling 24 hour window" and to "wait until the next day for the 24 hour
window to reset, or contact Twilio Support". Retries minutes apart can only repeat it and
spend the delivery's attempts, so the delivery goes to the dead-letter queue at once, named
`twilio_63038`, for an operator to replay when the limit allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson

from estafeta.connectors.whatsapp.base import (
    Reply,
    basic_auth,
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
from estafeta.messaging.facts import SENT_MESSAGE_PARAM

PROVIDER = "twilio"
DEFAULT_API_BASE = "https://api.twilio.com"
RATE_CODES = frozenset({20429, 63017, 63018})
# Refusals that no retry within the backoff's minutes can change, whatever the HTTP status.
LIMIT_CODES = frozenset({63038})

Form = list[tuple[str, str]]


def messages_url(api_base: str | None, account_sid: str) -> str:
    """`{api_base}/2010-04-01/Accounts/{account_sid}/Messages.json` (contracts §2.4)."""
    path = f"2010-04-01/Accounts/{account_sid}/Messages.json"
    return join_url(api_base or DEFAULT_API_BASE, path)


def whatsapp_address(number: str) -> str:
    """`whatsapp:+…` (contracts §2.2/§2.4), whether or not `number` has the prefix."""
    return number if number.startswith("whatsapp:") else f"whatsapp:{number}"


def build_form(
    message: OutboundMessage, sender: str, status_callback: str | None = None
) -> Form | str:
    """The form fields for `message`, or the reason Twilio cannot send it."""
    fields: Form = [("To", whatsapp_address(message.to)), ("From", whatsapp_address(sender))]
    if message.text is not None:
        fields.append(("Body", message.text))
    elif message.media is not None:
        fields.append(("MediaUrl", str(message.media["url"])))
        if message.media.get("caption"):
            fields.append(("Body", str(message.media["caption"])))
    else:
        assert message.template is not None  # noqa: S101 - one of the three, by construction
        content = _content(message.template)
        if isinstance(content, str):
            return content
        fields.extend(content)
    if status_callback:
        if message.reference is not None:
            # Twilio echoes nothing of a send in its callbacks but the URL it calls (and
            # signs): the message's own id rides there, for its statuses to name it.
            joiner = "&" if "?" in status_callback else "?"
            query = urlencode({SENT_MESSAGE_PARAM: message.reference})
            status_callback = f"{status_callback}{joiner}{query}"
        fields.append(("StatusCallback", status_callback))
    return fields


def _content(template: Mapping[str, Any]) -> Form | str:
    sid = template.get("content_sid")
    name = template.get("name")
    if sid is None and isinstance(name, str) and name.startswith("HX"):
        sid = name
    if not isinstance(sid, str) or not sid:
        return (
            "Twilio sends WhatsApp templates as Content API templates: give the template's "
            "content_sid (HX…), not a Cloud API template name"
        )
    variables = template.get("variables")
    if isinstance(variables, Mapping):
        values = {str(key): str(value) for key, value in variables.items()}
    else:
        texts = [
            str(parameter.get("text"))
            for component in template.get("components") or []
            if isinstance(component, Mapping) and component.get("type") == "body"
            for parameter in component.get("parameters") or []
            if isinstance(parameter, Mapping) and parameter.get("type") == "text"
        ]
        values = {str(index): text for index, text in enumerate(texts, start=1)}
    fields: Form = [("ContentSid", sid)]
    if values:
        fields.append(("ContentVariables", orjson.dumps(values).decode()))
    return fields


def outcome_of(reply: Reply) -> Outcome:
    """What a Twilio answer means (module docstring); pure, for table-driven tests."""
    document = reply.json()
    code = document.get("code") if isinstance(document, dict) else None
    if not isinstance(code, int) or isinstance(code, bool):
        code = None
    if 200 <= reply.status <= 299:
        sid = document.get("sid") if isinstance(document, dict) else None
        if isinstance(sid, str) and sid:
            return success(reply, sid)
        if code is None:
            return no_message_id(reply, PROVIDER, "sid", "Twilio")
    message = document.get("message") if isinstance(document, dict) else None
    title = message if isinstance(message, str) else None
    if code in LIMIT_CODES:
        kind = OutcomeKind.PERMANENT
    elif reply.status == 429 or code in RATE_CODES:
        kind = OutcomeKind.RETRYABLE
    elif 200 <= reply.status <= 299:
        # Twilio's error body under a 2xx: the status its body names (`status`), else a
        # refusal, as a 4xx would be.
        named = document.get("status") if isinstance(document, dict) else None
        if isinstance(named, int) and not isinstance(named, bool) and named >= 300:
            kind = classify_status(named)
        else:
            kind = OutcomeKind.PERMANENT
    else:
        kind = classify_status(reply.status)
    throttled = code in RATE_CODES
    return provider_error(reply, kind, PROVIDER, code, title, throttled=throttled)


class TwilioClient:
    """Sends from one WhatsApp sender (`account_sid`, `auth_token`, `from`)."""

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        sender: str,
        session: aiohttp.ClientSession,
        timeout_s: float,
        api_base: str | None = None,
        status_callback: str | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        self._url = messages_url(api_base, account_sid)
        self._sender = sender
        self._status_callback = status_callback
        self._headers = {
            "authorization": basic_auth(account_sid, auth_token),
            "content-type": "application/x-www-form-urlencoded",
        }
        self._session = session
        self._timeout_s = timeout_s

    async def send(self, message: OutboundMessage) -> Outcome:
        fields = build_form(message, self._sender, self._status_callback)
        if isinstance(fields, str):
            return refused("unsupported_message", fields)
        reply = await exchange(
            self._session,
            self._url,
            timeout_s=self._timeout_s,
            headers=self._headers,
            body=urlencode(fields).encode(),
        )
        return reply if isinstance(reply, Outcome) else outcome_of(reply)
