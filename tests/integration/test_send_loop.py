"""A message's whole life over real HTTP: queued through the API, sent by the worker to a
fake WhatsApp Cloud API (or Z-API), its status webhooks posted back (signed, redelivered),
on both engines."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from estafeta.api.app import create_app
from estafeta.api.auth import hash_key
from estafeta.config import load_config_dict
from estafeta.hub import Hub
from estafeta.server import uvicorn_server
from estafeta.store.sqlstore import SqlStore
from estafeta.testing.fakes.meta import FakeMeta
from estafeta.testing.fakes.zapi import FakeZApi
from tests.conftest import base_config

KEY = "est_send_loop_key_00000000000000000000000"
APP_SECRET = "fake-meta-app-secret"
MARIA = "+5511987654321"
ZAPI = {
    "instance_id": "3D9F1A2B4C6E8F0A1B2C3D4E5F6A7B8C",
    "instance_token": "A1B2C3D4E5F6A7B8C9D0E1F2",
    "client_token": "Fa1b2c3d4e5f60718293a4b5c6d7e8f9aS",
}
ZAPI_WEBHOOK_TOKEN = "zapi-webhook-token"


@dataclass
class Loop:
    base: str
    meta: FakeMeta
    zapi: FakeZApi
    http: aiohttp.ClientSession

    async def send(self, **body: Any) -> dict[str, Any]:
        async with self.http.post(
            f"{self.base}/api/v1/messages",
            json={"source": "wa-sol", "to": MARIA, **body},
            headers={"authorization": f"Bearer {KEY}"},
        ) as r:
            assert r.status == 202, await r.text()
            answer: dict[str, Any] = await r.json()
            return answer

    async def message(self, message_id: str) -> dict[str, Any]:
        async with self.http.get(
            f"{self.base}/api/v1/messages/{message_id}", headers={"authorization": f"Bearer {KEY}"}
        ) as r:
            found: dict[str, Any] = await r.json()
            return found

    async def until(self, message_id: str, state: str, timeout_s: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            view = await self.message(message_id)
            if view["state"] == state:
                return view
            assert time.monotonic() < deadline, view
            await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def loop_(store: SqlStore, database_url: str) -> AsyncIterator[Loop]:
    meta = FakeMeta(
        access_token="meta-token", phone_number_id="114950281736452", app_secret=APP_SECRET
    )
    await meta.start()
    zapi = FakeZApi(**ZAPI, webhook_token=ZAPI_WEBHOOK_TOKEN)
    await zapi.start()
    port = free_port()
    data = base_config(database_url)
    data["server"] = {"listen": f"127.0.0.1:{port}"}
    data["sources"].append(
        {
            "id": "wa-sol",
            "tenant": "clinica-sol",
            "kind": "whatsapp_cloud",
            "app_secret": APP_SECRET,
            "verify_token": "v",
            "access_token": "meta-token",
            "phone_number_id": "114950281736452",
            "api_base": meta.url,
            "send_max_attempts": 3,
        }
    )
    data["sources"].append(
        {
            "id": "za-sol",
            "tenant": "clinica-sol",
            "kind": "zapi",
            "token": ZAPI_WEBHOOK_TOKEN,
            **ZAPI,
            "api_base": zapi.url,
        }
    )
    config = load_config_dict(data)
    await store.sync_config(config, 1)
    await store.create_api_key(
        tenant_id="clinica-sol", key_hash=hash_key(KEY), label="", actor="test", now_ms=1
    )
    server = uvicorn_server(create_app(Hub(config, store), run_workers=True), f"127.0.0.1:{port}")
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    async with aiohttp.ClientSession() as http:
        yield Loop(f"http://127.0.0.1:{port}", meta, zapi, http)
    server.should_exit = True
    await serving
    await zapi.stop()
    await meta.stop()


async def test_a_message_is_sent_and_followed_to_read(loop_: Loop) -> None:
    queued = await loop_.send(text="Sua consulta está confirmada.")
    sent = await loop_.until(queued["id"], "sent")
    [request] = loop_.meta.sent
    assert request.request["to"] in (MARIA, MARIA[1:])
    assert request.request["text"]["body"] == "Sua consulta está confirmada."
    wamid = sent["provider_message_id"]
    assert wamid == request.message_id

    webhook = f"{loop_.base}/in/wa-sol"
    assert await loop_.meta.send_status(webhook, wamid, "delivered", duplicate=True) == [200, 200]
    assert await loop_.meta.send_status(webhook, wamid, "read") == [200]
    view = await loop_.until(queued["id"], "read")
    assert [step["state"] for step in view["timeline"]] == ["queued", "sent", "delivered", "read"]


async def test_a_throttled_send_is_retried_and_goes_through(loop_: Loop) -> None:
    loop_.meta.throttle_next(1, retry_after_s=1)
    queued = await loop_.send(text="Oi")
    view = await loop_.until(queued["id"], "sent", timeout_s=15)
    assert view["provider_message_id"]
    assert loop_.meta.requests >= 2


async def test_a_200_that_is_not_metas_answer_is_sent_again_not_left_sent_without_an_id(
    loop_: Loop,
) -> None:
    # A proxy's page on 200 was taken for Meta's acceptance: the message was `sent` for good,
    # with no provider_message_id for a status to name, and Meta had never seen it.
    loop_.meta.fail_next(1, 200, body=b"<html><body>Please log in to the proxy</body></html>")
    queued = await loop_.send(text="Oi")
    view = await loop_.until(queued["id"], "sent", timeout_s=15)
    [request] = loop_.meta.sent
    assert view["provider_message_id"] == request.message_id
    assert loop_.meta.requests == 2


async def test_outside_the_24_hour_window_goes_to_the_dlq_with_the_providers_title(
    loop_: Loop,
) -> None:
    loop_.meta.reject_next(131047)
    queued = await loop_.send(text="Oi de novo")
    view = await loop_.until(queued["id"], "failed")
    assert view["error"].startswith("whatsapp_cloud_131047: 131047 ")
    assert "Re-engagement" in view["error"]


async def test_a_zapi_message_that_failed_to_send_is_failed_though_the_callback_has_no_message_id(
    loop_: Loop,
) -> None:
    # Z-API's DeliveryCallback requires only `zaapId` (contracts §3.4): one without
    # `messageId` — as a failed send's may be — was looked up by the `messageId` the send's
    # answer gave, never found, and the message stayed `sent` for good.
    loop_.zapi.delivery_callback_message_id = False
    queued = await loop_.send(source="za-sol", text="Sua consulta está confirmada.")
    sent = await loop_.until(queued["id"], "sent")
    [request] = loop_.zapi.sent
    assert sent["provider_message_id"] == request.message_id
    webhook = f"{loop_.base}/in/za-sol"
    assert await loop_.zapi.send_status(webhook, request.message_id, "failed") == [200]
    view = await loop_.until(queued["id"], "failed")
    assert view["error"] == "zapi_failed: Message not sent: the number is not on WhatsApp"
    assert [step["state"] for step in view["timeline"]] == ["queued", "sent", "failed"]
    async with loop_.http.get(
        f"{loop_.base}/api/v1/conversations/{MARIA[1:]}",
        headers={"authorization": f"Bearer {KEY}"},
    ) as r:
        [message] = (await r.json())["messages"]
    assert (message["id"], message["state"]) == (queued["id"], "failed")
