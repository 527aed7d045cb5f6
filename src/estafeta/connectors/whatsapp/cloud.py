"""WhatsApp Business Cloud API (Meta): send one message (contracts §1.6–§1.8).

Request (§1.6): `POST {api_base}/{version}/{phone_number_id}/messages` with
`Authorization: Bearer {access_token}` and a JSON body `{"messaging_product": "whatsapp",
"to": "+…", "type": …}`. `api_base` defaults to `https://graph.facebook.com`; a base that
already ends in a version (`…/v19.0`) is used as it is, else `GRAPH_VERSION` is appended.
Our message id (`msg_…`) goes out as `biz_opaque_callback_data`, which Meta echoes in the
status webhooks (§1.5).

Answer: 200 with `messages[0].id`, the WAMID: the outcome's `external_id`, which the status
webhooks name as `statuses[].id` (ingress `whatsapp_cloud.py` → `data.message_id`). A 2xx
without it is read as the Graph error it carries, by its code as below (an unknown code
RETRYABLE); with neither it is not Meta's answer: RETRYABLE `whatsapp_cloud_no_message_id`.

Errors (§1.7, §1.8, §8 item 1): the Graph error `{"error": {"message": "(#code) title",
"code", "error_data": {"details"}, …}}` is classified on `error.code` first, as Meta says
(the HTTP status of the throttling codes is not even settled, §8 item 1):

* 4, 80007, 130429, 131056 (throttling), and Graph's rate-limit codes 17 and 613 →
  RETRYABLE slow-downs, whatever the status;
* the codes §1.7 says not to retry (`REFUSAL_CODES`: 0/3/10/190/200–299 token and
  permissions, 368/131031 blocks, 131005–131051 refusals such as 131026 undeliverable,
  131045 certificate and 131047 outside the window, 132xxx templates, 135000) → PERMANENT,
  whatever the status: Meta answers some of them with a 5xx (131045 on HTTP 500), and
  retried they spent a delivery's attempts for hours and counted against the number's
  circuit. 131048 (spam rate limit: the number is restricted for its quality, "no, fix
  quality") is one: Meta files it with the throttling errors, so it may come with a 429
  like them, but no wait lifts it;
* 131000 (unknown), 131016 (service unavailable), 131057 (maintenance), 131052/131053
  (media download/upload: "maybe", bounded by max_attempts), and the Graph-wide transient
  codes 1 and 2 → RETRYABLE;
* any other code, or none: the HTTP status decides (`classify_status`): HTTP 429 (and
  408/409/425) and 5xx → RETRYABLE; any other 4xx → PERMANENT (100 parameters, codes
  §1.7 does not list …).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

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

PROVIDER = "whatsapp_cloud"
DEFAULT_API_BASE = "https://graph.facebook.com"
GRAPH_VERSION = "v25.0"  # contracts §1.6/§8 item 7: the version the docs use at the crawl
# §1.7's four, and Graph's own rate-limit codes (graph-api/overview/rate-limiting): 17
# user-level and 613 custom-level throttling, answered on HTTP 400 like the others.
THROTTLING_CODES = frozenset({4, 17, 613, 80007, 130429, 131056})
TRANSIENT_CODES = frozenset({1, 2, 131000, 131016, 131052, 131053, 131057})
# Refusals no retry can change, even on a status that would be retried (429, 5xx): the
# codes §1.7 marks "no" (or "fix token", "send a template"), Graph's 200–299 permissions
# among them. Meta says to build on the code, never on the status, and its own table answers
# some of them with a 5xx (131045 on HTTP 500).
REFUSAL_CODES = frozenset(
    {0, 3, 10, 190, 368, 131005, 131008, 131009, 131021, 131026, 131030, 131031, 131042}
    | {131045, 131047, 131048, 131049, 131050, 131051, 135000}
    | {132000, 132001, 132005, 132007, 132008, 132012, 132015, 132016}
    | set(range(200, 300))
)
TEMPLATE_WITHOUT_NAME = "a Cloud API template needs a name (content_sid is Twilio's)"
_VERSIONED = re.compile(r"/v\d+\.\d+/?$")
_TITLE_PREFIX = re.compile(r"^\(#\d+\)\s*")


def messages_url(api_base: str | None, phone_number_id: str) -> str:
    """The send URL: `{api_base}[/{GRAPH_VERSION}]/{phone_number_id}/messages`."""
    base = api_base or DEFAULT_API_BASE
    if not _VERSIONED.search(base):
        base = join_url(base, GRAPH_VERSION)
    return join_url(base, f"{phone_number_id}/messages")


def build_payload(message: OutboundMessage) -> dict[str, Any] | None:
    """The §1.6 JSON body for `message`, or None when the Cloud API cannot send it."""
    payload: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": message.to,
    }
    if message.text is not None:
        payload |= {"type": "text", "text": {"body": message.text}}
    elif message.template is not None:
        template = message.template
        name = template.get("name")
        if not isinstance(name, str) or not name:
            return None  # a Twilio-only template (content_sid): nothing Meta knows
        language = template.get("language")
        template_body: dict[str, Any] = {
            "name": name,
            "language": dict(language) if isinstance(language, Mapping) else {"code": language},
        }
        if template.get("components"):
            template_body["components"] = template["components"]
        payload |= {"type": "template", "template": template_body}
    else:
        assert message.media is not None  # noqa: S101 - one of the three, by construction
        kind = str(message.media["kind"])
        media: dict[str, Any] = {"link": message.media["url"]}
        for key in ("caption", "filename"):
            if message.media.get(key) is not None:
                media[key] = message.media[key]
        payload |= {"type": kind, kind: media}
    if message.reference is not None:
        payload["biz_opaque_callback_data"] = message.reference
    return payload


def outcome_of(reply: Reply) -> Outcome:
    """What a Cloud API answer means (module docstring); pure, for table-driven tests."""
    document = reply.json()
    error = document.get("error") if isinstance(document, dict) else None
    if 200 <= reply.status <= 299:
        messages = document.get("messages") if isinstance(document, dict) else None
        first = messages[0] if isinstance(messages, list) and messages else None
        wamid = first.get("id") if isinstance(first, dict) else None
        if isinstance(wamid, str) and wamid:
            return success(reply, wamid)
        if not isinstance(error, dict):
            return no_message_id(reply, PROVIDER, "messages[0].id", "the Cloud API")
    if not isinstance(error, dict):
        return provider_error(reply, classify_status(reply.status), PROVIDER, None, None)
    code = error.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        code = None
    title = error_title(error)
    if code in REFUSAL_CODES:
        kind = OutcomeKind.PERMANENT
    elif code in THROTTLING_CODES or code in TRANSIENT_CODES:
        kind = OutcomeKind.RETRYABLE
    else:  # any other code: a 4xx is permanent (429 and 408/409/425 excepted), 5xx retried
        kind = classify_status(reply.status)
        if kind is OutcomeKind.SUCCESS:  # an unknown error under a 2xx: nothing was sent
            kind = OutcomeKind.RETRYABLE
    throttled = code in THROTTLING_CODES
    return provider_error(reply, kind, PROVIDER, code, title, throttled=throttled)


def error_title(error: dict[str, Any]) -> str | None:
    """`message` without its `(#code) ` prefix; `title` or `error_user_title` otherwise."""
    for key in ("message", "title", "error_user_title"):
        value = error.get(key)
        if isinstance(value, str) and value.strip():
            return _TITLE_PREFIX.sub("", value.strip())
    return None


class CloudClient:
    """Sends through one business phone number (`access_token`, `phone_number_id`)."""

    def __init__(
        self,
        *,
        access_token: str,
        phone_number_id: str,
        session: aiohttp.ClientSession,
        timeout_s: float,
        api_base: str | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        self._url = messages_url(api_base, phone_number_id)
        self._headers = {
            "authorization": f"Bearer {access_token}",
            "content-type": "application/json",
        }
        self._session = session
        self._timeout_s = timeout_s

    async def send(self, message: OutboundMessage) -> Outcome:
        payload = build_payload(message)
        if payload is None:
            return refused("unsupported_message", TEMPLATE_WITHOUT_NAME)
        reply = await exchange(
            self._session,
            self._url,
            timeout_s=self._timeout_s,
            headers=self._headers,
            body=orjson.dumps(payload),
        )
        return reply if isinstance(reply, Outcome) else outcome_of(reply)
