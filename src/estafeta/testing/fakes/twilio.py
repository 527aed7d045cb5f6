"""A fake Twilio Messaging API, WhatsApp channel: the send endpoint and status callbacks.

* contracts §2.4: `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, basic auth
  `AccountSid:AuthToken`, form fields `To`/`From` (`whatsapp:+…`), `Body`, `MediaUrl`
  (repeatable), `ContentSid` + `ContentVariables`, `StatusCallback`; 201 with the Message
  resource (`sid` `SM…`, `status: queued`, …).
* Errors are `{"code", "message", "more_info", "status"}`: 20003 for bad credentials (401),
  20404 for another account's URL, 21604/21603/21602 for a missing To/From/content, 21211
  for a `To` that is not a number, 63007 for a `From` that is not this sender (400); 20429
  with HTTP 429 (+ Retry-After when given) for throttling; 63016 (outside the 24 h window)
  and the other codes of §2.4 on demand.
* Enforced on its own: a `Body` over `max_body` (1600) characters is 21617 (HTTP 400;
  Twilio's support article: the 1600-character limit applies to WhatsApp too, contracts
  §2.2 gives the same figure for inbound bodies). Credentials may also be an API key
  (`api_keys`: SID → secret, §2.4). The sender's throughput (§2.4: 10 MPS text) is not
  answered with an error: Twilio queues what goes over it (up to 4 h), so does this fake.
* contracts §2.1/§2.3: `send_status` posts the status callback form (`MessageSid`,
  `MessageStatus`, `AccountSid`, `From`, `To`, `ChannelPrefix=whatsapp`, `ErrorCode` when
  failed or undelivered) signed with `X-Twilio-Signature` = base64(HMAC-SHA1(auth_token,
  url + the sorted parameters)), the url being the send's `StatusCallback` (Twilio calls
  that one; the console's URL for a send without it). None for `queued`, as Twilio.
* contracts §2.2: `send_incoming` posts a customer's message (the inbound form, signed the
  same way). Twilio expects TwiML (XML) or an empty 200 for it: any other body is its
  debugger's error 12300 (Invalid Content-Type). contracts §2.5: a non-2xx answer to either
  webhook is error 11200 and is not retried. Both land in `webhook_failures` (the codes in
  `debugger_errors`); a status callback may get any 2xx.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from aiohttp import web

from estafeta.testing.fakes.base import (
    Answer,
    FakeProvider,
    StatusWebhook,
    hex_id,
    json_answer,
    retry_after,
)

TITLES: dict[int, str] = {
    20001: "Unknown parameter",
    20003: "Authenticate",
    20404: "The requested resource was not found",
    20429: "Too Many Requests",
    20500: "Internal Server Error",
    20503: "Service Unavailable",
    21211: "The 'To' number is not a valid phone number.",
    21617: "The concatenated message body exceeds the 1600 character limit.",
    21602: "Message body is required.",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21610: "Attempt to send to unsubscribed recipient",
    63007: "Twilio could not find a Channel with the specified From address",
    63016: "Failed to send freeform message because you are outside the allowed window. "
    "If you are using WhatsApp, please use a Message Template.",
    63017: "Rate limit exceeded",
    63018: "Rate limit exceeded for Channel",
    63038: "Account exceeded the daily messages limit",
    63112: "The Meta Business Manager account has been disabled",
}
_HTTP_STATUS = {20003: 401, 20404: 404, 20429: 429, 20500: 500, 20503: 503}
# §2.3: no callback is sent for the initial `queued`/`accepted`/`scheduled` state.
STATUSES = frozenset({"sending", "sent", "delivered", "undelivered", "failed", "read"})
_TWIML_TYPES = frozenset({"text/xml", "application/xml"})
_FAILED_CODE = "63016"  # the ErrorCode of a failed/undelivered callback (fixture status_failed)


def twilio_error(code: int, message: str | None = None, status: int | None = None) -> Answer:
    """The §2.4 error answer for `code`."""
    http_status = status or _HTTP_STATUS.get(code, 400)
    document = {
        "code": code,
        "message": message or TITLES.get(code, "Error"),
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": http_status,
    }
    return json_answer(http_status, document)


def twilio_signature(auth_token: str, url: str, params: dict[str, list[str]]) -> str:
    """contracts §2.1: base64(HMAC-SHA1(auth_token, url + sorted name+value pairs))."""
    signed = url + "".join(
        name + value for name in sorted(params) for value in sorted(params[name])
    )
    digest = hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


class FakeTwilio(FakeProvider):
    """One Twilio account with one WhatsApp sender."""

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        sender: str = "whatsapp:+551140028922",
        api_keys: Mapping[str, str] | None = None,  # API key SID (SK…) → secret (§2.4)
        max_body: int | None = 1600,  # Body limit (error 21617); None: no limit
    ) -> None:
        super().__init__()
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.sender = sender
        self.api_keys = dict(api_keys or {})
        self.max_body = max_body

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/2010-04-01/Accounts/{account}/Messages.json", self._messages)

    @property
    def debugger_errors(self) -> list[str]:
        """The codes Twilio's debugger would show for the hub's answers (11200, 12300)."""
        return [failure.error for failure in self.webhook_failures]

    def webhook_problem(
        self, kind: str, status: int, content_type: str, body: bytes
    ) -> tuple[str, str] | None:
        if not 200 <= status <= 299:
            return "11200", f"HTTP retrieval failure: HTTP {status}"
        if kind == "incoming" and body.strip() and content_type not in _TWIML_TYPES:
            shown = content_type or "no Content-Type"
            return "12300", f"Invalid Content-Type: {shown} is not TwiML"
        return None

    def error_answer(self, status: int) -> Answer:
        code = {401: 20003, 404: 20404, 429: 20429, 500: 20500, 503: 20503}.get(status)
        return twilio_error(code or (20500 if status >= 500 else 20001), None, status)

    def throttle_answer(self, retry_after_s: float | None) -> Answer:
        answer = twilio_error(20429)
        return Answer(answer.status, answer.body, retry_after(retry_after_s))

    def reject_answer(self, code: int | str) -> Answer:
        return twilio_error(int(code))

    async def _messages(self, request: web.Request) -> web.Response:
        await self.arrive()
        answer = await self._answer(request)
        response = await self.answer(answer)
        if answer.status == 401:
            response.headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
        return response

    def _authenticated(self, header: str) -> bool:
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = f"{self.account_sid}:{self.auth_token}".encode()
        if hmac.compare_digest(f"{user}:{password}".encode(), expected):
            return True
        secret = self.api_keys.get(user)
        return secret is not None and hmac.compare_digest(password.encode(), secret.encode())

    async def _answer(self, request: web.Request) -> Answer:
        if not self._authenticated(request.headers.get("Authorization", "")):
            return twilio_error(20003)
        account = request.match_info["account"]
        if account != self.account_sid:
            path = f"/2010-04-01/Accounts/{account}/Messages.json"
            return twilio_error(20404, f"The requested resource {path} was not found")
        params: dict[str, list[str]] = {}
        for name, value in parse_qsl((await request.read()).decode(), keep_blank_values=True):
            params.setdefault(name, []).append(value)
        fields = {name: values[0] for name, values in params.items()}
        to, sender = fields.get("To", ""), fields.get("From", "")
        if not to:
            return twilio_error(21604)
        if not sender and not fields.get("MessagingServiceSid"):
            return twilio_error(21603)
        if sender and sender != self.sender:
            return twilio_error(63007)
        if not to.startswith("whatsapp:+") or not to[10:].isdigit():
            return twilio_error(21211, f"The 'To' number {to} is not a valid phone number.")
        if not (fields.get("Body") or fields.get("MediaUrl") or fields.get("ContentSid")):
            return twilio_error(21602)
        if self.max_body is not None and len(fields.get("Body", "")) > self.max_body:
            text = f"The concatenated message body exceeds the {self.max_body} character limit."
            return twilio_error(21617, text)
        planned = self.planned()
        if planned is not None:
            return planned
        sid = "SM" + hex_id(32, upper=False)
        recorded = {name: v[0] if len(v) == 1 else v for name, v in params.items()}
        self.record(sid, request, recorded)
        return json_answer(201, self._resource(sid, fields, len(params.get("MediaUrl", []))))

    def _resource(self, sid: str, fields: dict[str, str], media: int) -> dict[str, Any]:
        """The Message resource of §2.4 (field list UNCONFIRMED there, §8 item 8)."""
        now = formatdate(usegmt=True)
        return {
            "sid": sid,
            "account_sid": self.account_sid,
            "messaging_service_sid": fields.get("MessagingServiceSid"),
            "to": fields["To"],
            "from": fields.get("From") or None,
            "body": fields.get("Body", ""),
            "status": "queued",
            "num_media": str(media),
            "num_segments": "1",
            "direction": "outbound-api",
            "api_version": "2010-04-01",
            "date_created": now,
            "date_updated": now,
            "date_sent": None,
            "error_code": None,
            "error_message": None,
            "price": None,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }

    async def send_incoming(
        self, hub_url: str, body: str, *, sender: str = "whatsapp:+5511987654321"
    ) -> list[int]:
        """POST a message from `sender` to the business (§2.2) to `hub_url`; the hub's
        statuses."""
        return await self.post_webhook(self.incoming_webhook(hub_url, body, sender), "incoming")

    def incoming_webhook(self, hub_url: str, body: str, sender: str) -> StatusWebhook:
        """The §2.2 incoming-message webhook, signed as §2.1 says."""
        sid = "SM" + hex_id(32, upper=False)
        pairs = [
            ("SmsMessageSid", sid),
            ("NumMedia", "0"),
            ("ProfileName", "Maria"),
            ("MessageType", "text"),
            ("SmsSid", sid),
            ("WaId", sender.removeprefix("whatsapp:+")),
            ("SmsStatus", "received"),
            ("Body", body),
            ("To", self.sender),
            ("NumSegments", "1"),
            ("ReferralNumMedia", "0"),
            ("MessageSid", sid),
            ("AccountSid", self.account_sid),
            ("From", sender),
            ("ApiVersion", "2010-04-01"),
        ]
        return self._signed(hub_url, pairs)

    def _signed(
        self, hub_url: str, pairs: list[tuple[str, str]], signed_url: str | None = None
    ) -> StatusWebhook:
        """The form posted to `hub_url`, signed for `signed_url` (the URL Twilio called;
        `hub_url` unless a proxy stands in between)."""
        params = {name: [value] for name, value in pairs}
        signature = twilio_signature(self.auth_token, signed_url or hub_url, params)
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": signature,
            "I-Twilio-Idempotency-Token": hex_id(32, upper=False),
        }
        return StatusWebhook(hub_url, headers, urlencode(pairs).encode())

    def status_webhook(self, hub_url: str, message_id: str, status: str) -> StatusWebhook:
        """The §2.3 status callback for `message_id`, signed as §2.1 says.

        Twilio calls, and signs, the `StatusCallback` URL the send gave; `hub_url` is where
        that request reaches the hub (through a proxy when the two differ). A send without
        one is called back at the URL set in Twilio's console, which `hub_url` then is.
        """
        if status not in STATUSES:
            raise ValueError(f"Twilio statuses are {sorted(STATUSES)}, not {status!r}")
        sent = self.find(message_id)
        to = str(sent.request["To"]) if sent else "whatsapp:+5511987654321"
        callback = sent.request.get("StatusCallback") if sent else None
        pairs = [
            ("ChannelPrefix", "whatsapp"),
            ("ApiVersion", "2010-04-01"),
            ("MessageStatus", status),
            ("SmsSid", message_id),
            ("SmsStatus", status),
            ("ChannelInstallSid", "XE" + hex_id(32, upper=False)),
            ("To", to),
            ("From", self.sender),
            ("MessageSid", message_id),
            ("StructuredMessage", "false"),
            ("AccountSid", self.account_sid),
        ]
        if status in ("failed", "undelivered"):
            pairs.append(("ErrorCode", _FAILED_CODE))
        signed_url = callback if isinstance(callback, str) and callback else hub_url
        query = urlsplit(signed_url).query
        if query and "?" not in hub_url:
            hub_url = f"{hub_url}?{query}"  # the proxy hands over the path and the query
        return self._signed(hub_url, pairs, signed_url)
