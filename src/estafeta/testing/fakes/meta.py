"""A fake WhatsApp Business Cloud API (Meta): the send endpoint and status webhooks.

* contracts §1.6: `POST /{version}/{phone_number_id}/messages`, any `v\\d+.\\d+`, with
  `Authorization: Bearer <access_token>`; 200 `{"messaging_product", "contacts": [{input,
  wa_id}], "messages": [{"id": <WAMID>, "message_status"?}]}` (`message_status` for
  templates only). WAMIDs have the byte layout of Meta's examples (fixtures README).
  `wa_id` (and a status's `recipient_id`) is the number's digits, or what `wa_ids` says
  (§1.4: it can differ from the number sent to).
* contracts §1.7: every error is the Graph error body `{"error": {"message": "(#code) title",
  "type", "code", "error_data": {"messaging_product", "details"}, "fbtrace_id"}}`. A missing
  token is code 104 and a wrong one 190 (HTTP 401); a missing field 131008, a bad value
  131009, an unknown template 132001 (HTTP 400); another phone number id, Graph's code 100.
* contracts §1.7/§8 item 1: throttling is code 130429 on HTTP 400 by default (§1.7's
  recommendation); codes 4 and 80007 come with HTTP 429. The status is unsettled, so a
  test may ask for either. Meta documents no Retry-After.
* contracts §1.8, enforced on its own (each limit per instance, documented defaults): at
  most `throughput_mps` (80) accepted messages in any second for the number → 130429; to
  one recipient one message per `pair_interval_s` (6 s) with bursts of up to `pair_burst`
  (45) → 131056 (both HTTP 400, §1.7's recommendation). None turns a limit off. A text
  body over `max_text` (4096) characters is Graph's code 100 (the limit and code are
  Meta's and third-party docs', not in contracts.md); sending to the business's own
  number is 131021 (§1.7).
* contracts §1.2/§1.5: `send_status` posts the `statuses[]` envelope, signed with
  `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(app_secret, body)>`, echoing the send's
  `biz_opaque_callback_data`; `failed` carries `errors[]` (code `failed_code`: 131026,
  or e.g. 131047 as Meta reports a free-form message outside the window).
* contracts §1.3: a webhook is delivered only when answered **200**; any other answer is a
  failure (in `webhook_failures`) and the webhook is posted again at once, up to
  `webhook_redeliveries` (3) more times (Meta: "retried immediately, then a few more times";
  the later, days-long retries are not waited for).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from estafeta.testing.fakes.base import (
    Answer,
    FakeProvider,
    PairLimit,
    RateWindow,
    StatusWebhook,
    hex_id,
    json_answer,
    retry_after,
)

#: Titles of the codes of contracts §1.7 (Meta's error-code page wording).
TITLES: dict[int, str] = {
    0: "AuthException",
    1: "An unknown error occurred",
    2: "Service temporarily unavailable",
    3: "Capability or permissions issue",
    4: "Application request limit reached",
    10: "Permission denied",
    17: "User request limit reached",  # Graph's rate-limiting page, not in contracts.md
    100: "Invalid parameter",
    104: "An access token is required to request this resource.",
    190: "Invalid OAuth access token - Cannot parse access token",
    368: "Temporarily blocked for policies violations",
    613: "Calls to this api have exceeded the rate limit.",  # Graph's, as 17
    80007: "Rate limit issues",
    130429: "Rate limit hit",
    131000: "Something went wrong",
    131005: "Access denied",
    131008: "Required parameter is missing",
    131009: "Parameter value is not valid",
    131016: "Service unavailable",
    131021: "Recipient cannot be sender",
    131026: "Message undeliverable",
    131030: "Recipient phone number not in allowed list",
    131031: "Account has been locked",
    131042: "Business eligibility payment issue",
    131045: "Incorrect certificate",
    131047: "Re-engagement message",
    131048: "Spam rate limit hit",
    131049: "Meta chose not to deliver",
    131050: "User stopped marketing messages",
    131051: "Unsupported message type",
    131052: "Media download error",
    131053: "Media upload error",
    131056: "(Business Account, Consumer Account) pair rate limit hit",
    131057: "Account in maintenance mode",
    132000: "Number of parameters does not match the expected number of params",
    132001: "Template name does not exist in the translation",
    132005: "Translated text too long",
    132007: "Template format character policy violated",
    132012: "Template parameter format mismatch",
    132015: "Template is paused",
    132016: "Template is disabled",
    135000: "Generic user error",
}
_HTTP_STATUS = {0: 401, 104: 401, 190: 401, 4: 429, 80007: 429, 131000: 500, 131016: 503}
_UNPREFIXED = frozenset({104, 190})  # Graph's OAuth errors carry no "(#code)" prefix
_TYPES = frozenset({"text", "template", "image", "audio", "video", "document", "sticker"})
STATUSES = frozenset({"sent", "delivered", "read", "failed", "played"})


def graph_error(code: int, details: str | None = None, title: str | None = None) -> dict[str, Any]:
    """The §1.7 error body for `code`."""
    text = title or TITLES.get(code, "An unknown error occurred")
    error: dict[str, Any] = {
        "message": text if code in _UNPREFIXED else f"(#{code}) {text}",
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": base64.urlsafe_b64encode(hex_id(16).encode())[:23].decode(),
    }
    if details is not None:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    return {"error": error}


def graph_answer(code: int, details: str | None = None, status: int | None = None) -> Answer:
    """The §1.7 error answer for `code`, with its usual HTTP status unless `status`."""
    return json_answer(status or _HTTP_STATUS.get(code, 400), graph_error(code, details))


def new_wamid(recipient_digits: str) -> str:
    """`wamid.` + base64 of the layout of Meta's examples (outbound marker 0x11)."""
    phone, inner = recipient_digits.encode(), hex_id(18).encode()
    raw = b"\x1c\x18" + bytes([len(phone)]) + phone + b"\x15\x02\x00\x11\x18"
    return "wamid." + base64.b64encode(raw + bytes([len(inner)]) + inner + b"\x00").decode()


class FakeMeta(FakeProvider):
    """The Cloud API of one business phone number."""

    webhook_redeliveries = 3  # §1.3: "retried immediately, then a few more times"

    def __init__(
        self,
        *,
        access_token: str,
        phone_number_id: str,
        app_secret: str,
        display_phone_number: str = "551140028922",
        waba_id: str = "108372914455201",
        templates: Iterable[str] | None = None,  # approved template names; None: any
        throughput_mps: int | None = 80,  # §1.8 default throughput per number; None: none
        pair_interval_s: float = 6.0,  # §1.8 pair rate limit: 1 message / 6 s per user …
        pair_burst: int | None = 45,  # … bursting up to 45 in 6 s; None: no pair limit
        max_text: int | None = 4096,  # text.body limit (Meta's send-messages page)
    ) -> None:
        super().__init__()
        self.access_token = access_token
        self.phone_number_id = phone_number_id
        self.app_secret = app_secret
        self.display_phone_number = display_phone_number
        self.waba_id = waba_id
        self.templates = None if templates is None else frozenset(templates)
        self.throughput = RateWindow(throughput_mps, 1.0)
        self.pair_limit = PairLimit(pair_interval_s, pair_burst)
        self.max_text = max_text
        # The error a `failed` status webhook carries (§1.5): 131026 (undeliverable), or e.g.
        # 131047, which Meta reports so for a free-form message outside the 24 h window.
        self.failed_code = 131026
        # A number's WhatsApp id where it is not the number's digits (§1.4: `wa_id` can
        # differ from the number sent to, e.g. a Brazilian mobile without its ninth digit):
        # the send answer's `contacts[].wa_id` and the statuses' `recipient_id` carry it.
        self.wa_ids: dict[str, str] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(r"/{version:v\d+\.\d+}/{phone_number_id}/messages", self._messages)

    def webhook_problem(
        self, kind: str, status: int, content_type: str, body: bytes
    ) -> tuple[str, str] | None:
        """contracts §1.3: anything but 200 — a 202 too — is retried for 7 days."""
        if status == 200:
            return None
        return "http_status", f"HTTP {status}: Meta takes only 200 as delivered"

    def error_answer(self, status: int) -> Answer:
        usual = {500: 131000, 503: 131016, 429: 4, 401: 190, 403: 10}
        return graph_answer(usual.get(status, 1 if status >= 500 else 100), None, status)

    def throttle_answer(
        self, retry_after_s: float | None, code: int = 130429, status: int | None = None
    ) -> Answer:
        details = "Message failed to send because there were too many messages"
        answer = graph_answer(code, details, status)
        return Answer(answer.status, answer.body, retry_after(retry_after_s))

    def throttle_next(
        self,
        n: int = 1,
        *,
        retry_after_s: float | None = None,
        code: int = 130429,
        status: int | None = None,
    ) -> None:
        """Throttling code 130429 (HTTP 400), or 4/80007 (429), 131056 (400) when given; or
        one of Meta's other throttling errors (131048 …). `status` overrides the HTTP status,
        which §8 item 1 leaves unsettled for these codes."""
        self._plan(n, self.throttle_answer(retry_after_s, code, status))

    def reject_answer(self, code: int | str) -> Answer:
        return graph_answer(int(code), f"Rejected by the fake with code {code}")

    async def _messages(self, request: web.Request) -> web.Response:
        await self.arrive()
        return await self.answer(await self._answer(request))

    async def _answer(self, request: web.Request) -> Answer:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return graph_answer(104)
        if not hmac.compare_digest(auth[7:].strip().encode(), self.access_token.encode()):
            return graph_answer(190)
        number_id = request.match_info["phone_number_id"]
        if number_id != self.phone_number_id:
            return graph_answer(
                100,
                f"Unsupported post request. Object with ID '{number_id}' does not exist, "
                "cannot be loaded due to missing permissions, or does not support this operation",
            )
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return graph_answer(100, "The request body is not valid JSON")
        problem = self._invalid(body) if isinstance(body, dict) else (131009, "not an object")
        if problem is not None:
            return graph_answer(*problem)
        planned = self.planned()
        if planned is not None:
            return planned
        to = str(body["to"])
        limited = self._limited(to.lstrip("+"))
        if limited is not None:
            return limited
        wamid = new_wamid(to.lstrip("+"))
        self.record(wamid, request, body)
        message: dict[str, Any] = {"id": wamid}
        if body["type"] == "template":
            message["message_status"] = "accepted"
        contact = {"input": to, "wa_id": self.wa_id(to)}
        document = {"messaging_product": "whatsapp", "contacts": [contact], "messages": [message]}
        return json_answer(200, document)

    def wa_id(self, number: str) -> str:
        """The WhatsApp id of `number` (`wa_ids`, else its digits)."""
        digits = number.lstrip("+")
        return self.wa_ids.get(digits, digits)

    def _limited(self, recipient: str) -> Answer | None:
        """The §1.8 error when this send goes over a limit; else the send is counted."""
        now = self.clock()
        if not self.throughput.allows(now):
            details = (
                "Message failed to send because there were too many messages sent from "
                "this phone number in a short period of time."
            )
            return graph_answer(130429, details)
        if not self.pair_limit.allows(recipient, now):
            details = (
                "Message failed to send because there were too many messages sent from "
                "this phone number to the same phone number in a short period of time."
            )
            return graph_answer(131056, details)
        self.throughput.take(now)
        self.pair_limit.take(recipient, now)
        return None

    def _invalid(self, body: dict[str, Any]) -> tuple[int, str] | None:
        """(code, details) of the first problem of a send body (§1.6), or None."""
        if body.get("messaging_product") != "whatsapp":
            return 131008, "The parameter messaging_product is required."
        to = body.get("to")
        if not isinstance(to, str) or not to:
            return 131008, "The parameter to is required."
        if not to.lstrip("+").isdigit():
            return 131009, f"The parameter to is not a phone number: {to!r}"
        if to.lstrip("+") == self.display_phone_number:
            return 131021, "Recipient phone number cannot be the same as the sender."
        kind = body.get("type", "text")
        if kind not in _TYPES:
            return 131009, f"The parameter type has an unsupported value {kind!r}"
        part = body.get(kind)
        if not isinstance(part, dict):
            return 131008, f"The parameter {kind} is required."
        if kind == "text" and not (isinstance(part.get("body"), str) and part["body"]):
            return 131008, "The parameter text.body is required."
        if kind == "text" and self.max_text is not None and len(part["body"]) > self.max_text:
            return 100, f"Param text['body'] must be at most {self.max_text} characters long."
        if kind == "template":
            language = part.get("language")
            if not part.get("name") or not isinstance(language, dict) or not language.get("code"):
                return 131008, "The parameters template.name and template.language are required."
            if self.templates is not None and part["name"] not in self.templates:
                return 132001, f"template name ({part['name']}) does not exist in the translation"
        if kind not in ("text", "template") and not (part.get("link") or part.get("id")):
            return 131008, f"The parameter {kind}.link or {kind}.id is required."
        return None

    def status_webhook(self, hub_url: str, message_id: str, status: str) -> StatusWebhook:
        """The §1.5 status webhook for `message_id`, signed as §1.2 says."""
        if status not in STATUSES:
            raise ValueError(f"Cloud API statuses are {sorted(STATUSES)}, not {status!r}")
        sent = self.find(message_id)
        recipient = self.wa_id(str(sent.request["to"]) if sent else "5511987654321")
        item: dict[str, Any] = {
            "id": message_id,
            "status": status,
            "timestamp": str(int(time.time())),
            "recipient_id": recipient,
        }
        if sent is not None and "biz_opaque_callback_data" in sent.request:
            item["biz_opaque_callback_data"] = sent.request["biz_opaque_callback_data"]
        if status == "failed":
            # §1.5 (and fixtures status_failed.json): a webhook's error_data is `details` alone.
            title = TITLES.get(self.failed_code, "An unknown error occurred")
            item["errors"] = [
                {
                    "code": self.failed_code,
                    "title": title,
                    "message": title,
                    "error_data": {"details": f"{title}."},
                    "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
                }
            ]
        elif status in ("sent", "delivered"):
            # Per-message pricing (§1.5): a template is billed; a free-form message (only
            # possible inside the customer service window, §1.6) is free service.
            template = sent is not None and sent.request.get("type") == "template"
            item["pricing"] = {
                "billable": template,
                "pricing_model": "PMP",
                "category": "utility" if template else "service",
                "type": "regular" if template else "free_customer_service",
            }
        metadata = {
            "display_phone_number": self.display_phone_number,
            "phone_number_id": self.phone_number_id,
        }
        value = {"messaging_product": "whatsapp", "metadata": metadata, "statuses": [item]}
        change = {"value": value, "field": "messages"}
        envelope = {
            "object": "whatsapp_business_account",
            "entry": [{"id": self.waba_id, "changes": [change]}],
        }
        body = orjson.dumps(envelope)
        digest = hmac.new(self.app_secret.encode(), body, hashlib.sha256).hexdigest()
        headers = {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}"}
        return StatusWebhook(hub_url, headers, body)
