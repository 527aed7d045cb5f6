"""A fake Z-API instance: the send endpoints and the status webhooks.

* contracts §3.1/§3.5: `POST /instances/{id}/token/{token}/send-text` `{"phone", "message"}`
  with `Client-Token`, and the media endpoints of Z-API's docs (`send-image` `{phone, image,
  caption?}`, `send-video`, `send-audio`, `send-document/{extension}` `{phone, document,
  fileName?}`); 200 `{"zaapId", "messageId", "id"}`. Ids look like the fixtures'
  (`messageId` `3EB0…`, 20 hex characters; `zaapId` 32).
* Errors are `{"error": "…"}`. Documented: `{"error": "null not allowed"}` without the
  Client-Token (status undocumented: this fake uses 401), 405 for a wrong method (aiohttp's),
  415 without `Content-Type: application/json`. Invented here, since Z-API documents
  nothing else (contracts §8 item 4): 401 `Client-Token not allowed` for a wrong token, 400
  `Instance not found` for another instance's URL, 400 for a missing field, 429 `Too Many
  Requests` for throttling (no Retry-After unless given).
* contracts §3.4: `send_status` posts a `MessageStatusCallback` (`ids: [messageId]`,
  SENT / RECEIVED / READ / READ_BY_ME / PLAYED; `sent`/`delivered`/`read`/`played` are
  accepted too), or for `failed` a `DeliveryCallback` with `error`. Z-API requires only
  `phone`, `zaapId` and `type` in a DeliveryCallback: with `delivery_callback_message_id =
  False` the fake leaves `messageId` out, and the callback names the message by its
  `zaapId` alone (the send's answer gave both; `zaap_id_of` says which). Z-API signs
  nothing: the hub's URL carries `?token=` (DESIGN §3.2), appended from `webhook_token`
  when the URL has none.
* contracts §3.1: no retry policy and no expected answer documented: any 2xx counts as
  delivered, anything else lands in `webhook_failures` (not redelivered).
"""

from __future__ import annotations

import hmac
import time
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

from estafeta.testing.fakes.base import (
    Answer,
    FakeProvider,
    StatusWebhook,
    hex_id,
    json_answer,
    retry_after,
    with_token,
)

_REQUIRED = {"send-text": "message", "send-image": "image", "send-video": "video"}
_REQUIRED |= {"send-audio": "audio", "send-document": "document"}
_STATUSES = {"sent": "SENT", "delivered": "RECEIVED", "read": "READ", "played": "PLAYED"}
# §3.4 also names READ_BY_ME: the connected phone read the customer's message.
STATUSES = frozenset({*_STATUSES, *_STATUSES.values(), "READ_BY_ME", "failed"})


def zapi_error(status: int, error: str) -> Answer:
    return json_answer(status, {"error": error})


class FakeZApi(FakeProvider):
    """One Z-API instance."""

    def __init__(
        self,
        *,
        instance_id: str,
        instance_token: str,
        client_token: str,
        connected_phone: str = "551140028922",
        webhook_token: str | None = None,
    ) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.instance_token = instance_token
        self.client_token = client_token
        self.connected_phone = connected_phone
        self.webhook_token = webhook_token
        # Whether a DeliveryCallback carries `messageId` too (Z-API may send `zaapId` alone).
        self.delivery_callback_message_id = True
        self._zaap_ids: dict[str, str] = {}

    def add_routes(self, app: web.Application) -> None:
        path = "/instances/{instance}/token/{token}/{endpoint:send-[a-z]+(?:/[A-Za-z0-9]+)?}"
        app.router.add_post(path, self._send)

    def error_answer(self, status: int) -> Answer:
        return zapi_error(status, HTTPStatus(status).phrase)

    def throttle_answer(self, retry_after_s: float | None) -> Answer:
        answer = zapi_error(429, "Too Many Requests")
        return Answer(answer.status, answer.body, retry_after(retry_after_s))

    def reject_answer(self, code: int | str) -> Answer:
        """An int is an HTTP status; a string the `error` of a 400."""
        return self.error_answer(code) if isinstance(code, int) else zapi_error(400, code)

    async def _send(self, request: web.Request) -> web.Response:
        await self.arrive()
        return await self.answer(await self._answer(request))

    async def _answer(self, request: web.Request) -> Answer:
        given = request.headers.get("Client-Token")
        if not given:
            return zapi_error(401, "null not allowed")
        if not hmac.compare_digest(given.encode(), self.client_token.encode()):
            return zapi_error(401, "Client-Token not allowed")
        instance, token = request.match_info["instance"], request.match_info["token"]
        if instance != self.instance_id or not hmac.compare_digest(
            token.encode(), self.instance_token.encode()
        ):
            return zapi_error(400, "Instance not found")
        if request.content_type != "application/json":
            return Answer(415, b"", content_type="text/plain")
        endpoint = request.match_info["endpoint"]
        required = _REQUIRED.get(endpoint.split("/", 1)[0])
        if required is None:
            return zapi_error(404, f"Unknown endpoint {endpoint}")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return zapi_error(400, "The body is not valid JSON")
        if not isinstance(body, dict):
            return zapi_error(400, "The body must be a JSON object")
        phone = body.get("phone")
        if not isinstance(phone, str) or not phone.isdigit():
            return zapi_error(400, "phone: only digits, with the country code")
        if not isinstance(body.get(required), str) or not body[required]:
            return zapi_error(400, f"{required} is required")
        planned = self.planned()
        if planned is not None:
            return planned
        message_id, zaap_id = "3EB0" + hex_id(16), hex_id(32)
        self._zaap_ids[message_id] = zaap_id
        self.record(message_id, request, body)
        return json_answer(200, {"zaapId": zaap_id, "messageId": message_id, "id": message_id})

    def zaap_id_of(self, message_id: str) -> str | None:
        """The `zaapId` the send that got `message_id` was answered with."""
        return self._zaap_ids.get(message_id)

    def status_webhook(self, hub_url: str, message_id: str, status: str) -> StatusWebhook:
        """The §3.4 callback for `message_id`: a status, or a failed DeliveryCallback."""
        if status not in STATUSES:
            raise ValueError(f"Z-API statuses are {sorted(STATUSES)}, not {status!r}")
        sent = self.find(message_id)
        phone = str(sent.request["phone"]) if sent else "5511987654321"
        document: dict[str, Any]
        if status == "failed":
            document = {
                "phone": phone,
                "zaapId": self._zaap_ids.get(message_id, hex_id(32)),
                "messageId": message_id,
                "type": "DeliveryCallback",
                "instanceId": self.instance_id,
                "error": "Message not sent: the number is not on WhatsApp",
            }
            if not self.delivery_callback_message_id:
                del document["messageId"]
        else:
            document = {
                "instanceId": self.instance_id,
                "status": _STATUSES.get(status, status),
                "ids": [message_id],
                "momment": int(time.time() * 1000),
                "phoneDevice": 0,
                "phone": phone,
                "type": "MessageStatusCallback",
                "isGroup": False,
            }
        headers = {"Content-Type": "application/json"}
        return StatusWebhook(
            with_token(hub_url, self.webhook_token), headers, orjson.dumps(document)
        )
