"""A fake SendPulse (chatbots, WhatsApp): OAuth token, send endpoints, outgoing webhook.

* contracts §9.6: `POST /oauth/access_token` (JSON or form) `{grant_type:
  client_credentials, client_id, client_secret}` → `{"access_token", "token_type": "Bearer",
  "expires_in"}` (`token_ttl_s`, 3600 by default); wrong credentials → 401 `{"error":
  "invalid_client", "error_description": "Client authentication failed", "message": …}`.
  `token_requests` counts the tokens issued; `expire_tokens()` revokes every token, so the
  next send is answered 401 as an expired token would be.
* contracts §9.5: `POST /whatsapp/contacts/sendByPhone` `{bot_id, phone, message}`,
  `…/sendTemplateByPhone` `{bot_id, phone, template}`, `…/send` `{contact_id, message}` and
  `…/sendTemplate` with `Authorization: Bearer <token>`; 200 `{"success": true, "data":
  <Message>}` with a 24-hex `id`. Message types of §9.5; text up to 1024 characters; media
  links must be HTTPS.
* contracts §9.7 (third-party): errors are `{"message", "error_code"}`; a missing or expired
  token is 401 `{"message": "Unauthorized!", "error_code": 401}`; throttling is 429 with
  `error_code` 2020202020 "More than 10 requests per second" and no Retry-After.
* contracts §9.7, enforced on its own: at most `requests_per_second` (10, [S4]) API
  requests (token and sends) in any second, or 429 with `error_code` 2020202020 and no
  Retry-After; None turns it off. Tokens expire `token_ttl_s` after issue (on `clock`).
  By phone, `message.type` is one of text/image/document/audio/interactive (§9.5), and a
  template needs `language.code`; with `audience` (the phones of the bot's active
  contacts), `sendByPhone` to anyone else is refused, 400 `Contact is not active` (§9.5:
  the contact must be active in the bot's audience; SendPulse's body for it is UNCONFIRMED).
* contracts §9.1/§9.10 item 5: SendPulse sends **no status webhooks**. `send_status` can
  only post what SendPulse does send about our message, the `outgoing_message` event (a JSON
  array, §9.3/§9.4), for status `sent`; the URL carries `?token=` (DESIGN §3.2).
* contracts §9.3: the meaning of a non-2xx answer is undocumented (answer 200, it
  recommends): any 2xx counts as delivered, anything else lands in `webhook_failures`.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from estafeta.testing.fakes.base import (
    Answer,
    FakeProvider,
    RateWindow,
    StatusWebhook,
    hex_id,
    json_answer,
    retry_after,
    with_token,
)

_TYPES = frozenset({"text", "image", "document", "audio", "interactive", "reaction"})
_BY_PHONE_TYPES = _TYPES - {"reaction"}  # §9.5: sendByPhone takes no reaction
_PATHS = ("sendByPhone", "sendTemplateByPhone", "send", "sendTemplate")


def sendpulse_error(status: int, message: str, code: int | None = None) -> Answer:
    return json_answer(status, {"message": message, "error_code": code or status})


class FakeSendPulse(FakeProvider):
    """One SendPulse account (API id and secret) with one WhatsApp bot."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        bot_id: str,
        token_ttl_s: int = 3600,
        webhook_token: str | None = None,
        bot_phone: str = "551140028922",
        requests_per_second: int | None = 10,  # §9.7 [S4]; None: no limit
        audience: Iterable[str] | None = None,  # the bot's active contacts' phones; None: any
    ) -> None:
        super().__init__()
        self.client_id, self.client_secret, self.bot_id = client_id, client_secret, bot_id
        self.token_ttl_s = token_ttl_s
        self.webhook_token = webhook_token
        self.bot_phone = bot_phone
        self.token_requests = 0  # tokens issued
        self._tokens: dict[str, float] = {}  # token → the `clock()` time it expires at
        self._contacts: dict[str, str] = {}  # phone → contact id
        self.rate = RateWindow(requests_per_second, 1.0)
        self.audience = None if audience is None else frozenset(audience)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/oauth/access_token", self._token)
        for path in _PATHS:
            app.router.add_post(f"/whatsapp/contacts/{path}", self._send)

    def expire_tokens(self) -> None:
        """Revoke every token issued so far (as if their hour had passed)."""
        self._tokens.clear()

    def error_answer(self, status: int) -> Answer:
        return sendpulse_error(status, HTTPStatus(status).phrase)

    def throttle_answer(self, retry_after_s: float | None) -> Answer:
        answer = sendpulse_error(429, "More than 10 requests per second", 2020202020)
        return Answer(answer.status, answer.body, retry_after(retry_after_s))

    def _over_rate(self) -> Answer | None:
        """§9.7's answer when this request goes over the per-second limit; else counted."""
        now = self.clock()
        if not self.rate.allows(now):
            return self.throttle_answer(None)
        self.rate.take(now)
        return None

    def reject_answer(self, code: int | str) -> Answer:
        if isinstance(code, str):
            return sendpulse_error(400, code)
        return sendpulse_error(400, f"Rejected by the fake with code {code}", code)

    async def _token(self, request: web.Request) -> web.Response:
        await self.arrive(count=False)
        over = self._over_rate()
        if over is not None:
            return over.response()
        raw = await request.read()
        try:
            loaded = orjson.loads(raw) if request.content_type == "application/json" else None
        except orjson.JSONDecodeError:
            loaded = None
        fields = loaded if isinstance(loaded, dict) else dict(parse_qsl(raw.decode()))
        if fields.get("grant_type") != "client_credentials":
            text = "The authorization grant type is not supported by the authorization server."
            error = {"error": "unsupported_grant_type", "error_description": text, "message": text}
            return json_answer(400, error).response()
        given = f"{fields.get('client_id')}:{fields.get('client_secret')}".encode()
        if not hmac.compare_digest(given, f"{self.client_id}:{self.client_secret}".encode()):
            text = "Client authentication failed"
            error = {"error": "invalid_client", "error_description": text, "message": text}
            return json_answer(401, error).response()
        token = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9." + hex_id(40, upper=False)
        self._tokens[token] = self.clock() + self.token_ttl_s
        self.token_requests += 1
        document = {"access_token": token, "token_type": "Bearer", "expires_in": self.token_ttl_s}
        return json_answer(200, document).response()

    async def _send(self, request: web.Request) -> web.Response:
        await self.arrive()
        return await self.answer(await self._answer(request))

    async def _answer(self, request: web.Request) -> Answer:
        over = self._over_rate()
        if over is not None:
            return over
        auth = request.headers.get("Authorization", "")
        expires = self._tokens.get(auth.removeprefix("Bearer ").strip())
        if not auth.startswith("Bearer ") or expires is None or expires <= self.clock():
            return sendpulse_error(401, "Unauthorized!")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return sendpulse_error(400, "The body is not valid JSON")
        if not isinstance(body, dict):
            return sendpulse_error(400, "The body must be a JSON object")
        path = request.path.rsplit("/", 1)[-1]
        problem = self._invalid(path, body)
        if problem is not None:
            return problem
        planned = self.planned()
        if planned is not None:
            return planned
        message_id = hex_id(24, upper=False)
        self.record(message_id, request, body)
        phone = str(body.get("phone", ""))
        contact_id = body.get("contact_id") or self._contacts.setdefault(
            phone, hex_id(24, upper=False)
        )
        message = {
            "id": message_id,
            "contact_id": contact_id,
            "bot_id": self.bot_id,
            "campaign_id": None,
            "data": body.get("message") or body.get("template"),
            "direction": 2,
            "status": 1,
            "is_paid": False,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        return json_answer(200, {"success": True, "data": message})

    def _invalid(self, path: str, body: dict[str, Any]) -> Answer | None:
        by_phone = path.endswith("ByPhone")
        for field in ("bot_id", "phone") if by_phone else ("contact_id",):
            if not isinstance(body.get(field), str) or not body[field]:
                return sendpulse_error(400, f"The {field} field is required.")
        if by_phone and body["bot_id"] != self.bot_id:
            return sendpulse_error(404, "Bot not found")
        if by_phone and not body["phone"].isdigit():
            return sendpulse_error(400, "The phone must be digits only, without '+'.")
        # §9.5: "The contact must be active in that bot's audience" (the body is ours;
        # templates, sendTemplateByPhone, are how a business writes first).
        audience = self.audience
        if path == "sendByPhone" and audience is not None and body["phone"] not in audience:
            return sendpulse_error(400, "Contact is not active")
        if path.startswith("sendTemplate"):
            template = body.get("template")
            language = template.get("language") if isinstance(template, dict) else None
            if (
                not isinstance(language, dict)
                or not language.get("code")
                or not template
                or not template.get("name")
            ):
                return sendpulse_error(400, "The template field must have name and language.")
            return None
        message = body.get("message")
        kind = message.get("type") if isinstance(message, dict) else None
        if not isinstance(message, dict) or kind not in (_BY_PHONE_TYPES if by_phone else _TYPES):
            return sendpulse_error(400, "The message.type field is invalid.")
        part = message.get(kind)
        if not isinstance(part, dict):
            return sendpulse_error(400, f"The message.{kind} field is required.")
        text, link = part.get("body"), str(part.get("link", ""))
        if kind == "text" and not (isinstance(text, str) and 0 < len(text) <= 1024):
            return sendpulse_error(400, "The message.text.body must be 1 to 1024 characters.")
        if kind in ("image", "document", "audio") and not link.startswith("https://"):
            return sendpulse_error(400, f"The message.{kind}.link must be an HTTPS URL.")
        return None

    def status_webhook(self, hub_url: str, message_id: str, status: str) -> StatusWebhook:
        """The `outgoing_message` event for `message_id` (status `sent` only: module doc)."""
        if status != "sent":
            raise ValueError(
                "SendPulse sends no status webhooks (contracts §9.1, §9.10 item 5); only "
                f"'sent' has an event (outgoing_message), not {status!r}"
            )
        sent = self.find(message_id)
        phone = str(sent.request.get("phone", "")) if sent else "5511987654321"
        content = (sent.request.get("message") or sent.request.get("template")) if sent else None
        event = {
            "service": "whatsapp",
            "title": "outgoing_message",
            "bot": {
                "id": self.bot_id,
                "external_id": self.bot_phone,
                "name": "Fake bot",
                "url": f"https://wa.me/{self.bot_phone}",
            },
            "contact": {
                "id": self._contacts.setdefault(phone, hex_id(24, upper=False)),
                "phone": phone,
                "name": None,
            },
            "info": {"message": {"id": message_id, "channel_data": {"message": content or {}}}},
            "date": int(time.time() * 1000),
        }
        headers = {"Content-Type": "application/json"}
        return StatusWebhook(
            with_token(hub_url, self.webhook_token), headers, orjson.dumps([event])
        )
