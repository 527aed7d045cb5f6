"""A message's whole life over real HTTP: queued through the API, sent by the worker to a
fake WhatsApp Cloud API (or Z-API), its status webhooks posted back (signed, redelivered),
on both engines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from estafeta.store.sqlstore import SqlStore
from estafeta.testing.fakes.meta import FakeMeta
from estafeta.testing.fakes.zapi import FakeZApi
from tests.conftest import base_config
from tests.integration.hub_loop import MARIA, MessagesClient, fake_meta, served_hub, wa_sol

KEY = "est_send_loop_key_00000000000000000000000"
ZAPI = {
    "instance_id": "3D9F1A2B4C6E8F0A1B2C3D4E5F6A7B8C",
    "instance_token": "A1B2C3D4E5F6A7B8C9D0E1F2",
    "client_token": "Fa1b2c3d4e5f60718293a4b5c6d7e8f9aS",
}
ZAPI_WEBHOOK_TOKEN = "zapi-webhook-token"


@dataclass
class Loop(MessagesClient):
    meta: FakeMeta
    zapi: FakeZApi


@pytest.fixture
async def loop_(store: SqlStore, database_url: str) -> AsyncIterator[Loop]:
    meta = fake_meta()
    await meta.start()
    zapi = FakeZApi(**ZAPI, webhook_token=ZAPI_WEBHOOK_TOKEN)
    await zapi.start()
    data = base_config(database_url)
    data["sources"].append(wa_sol(meta.url))
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
    async with served_hub(store, data, KEY) as client:
        yield Loop(client.base, client.key, client.http, meta, zapi)
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


async def test_statuses_naming_another_wa_id_reach_the_message(loop_: Loop) -> None:
    """contracts §1.4: the customer's WhatsApp id can differ from the number sent to (a
    Brazilian mobile registered before the ninth digit); Meta's statuses name that id."""
    loop_.meta.wa_ids[MARIA[1:]] = "551187654321"
    queued = await loop_.send(text="Sua consulta está confirmada.")
    wamid = (await loop_.until(queued["id"], "sent"))["provider_message_id"]
    webhook = f"{loop_.base}/in/wa-sol"
    assert (
        b'"recipient_id":"551187654321"' in loop_.meta.status_webhook(webhook, wamid, "read").body
    )
    assert await loop_.meta.send_status(webhook, wamid, "delivered") == [200]
    view = await loop_.until(queued["id"], "delivered")
    assert view["to"] == MARIA


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


async def test_a_providers_refusal_holding_a_nul_fails_the_message_on_both_engines(
    loop_: Loop,
) -> None:
    """The provider's words become the message's error; a NUL in them (PostgreSQL text
    holds none) failed the completion on PostgreSQL, so the message stayed `queued` and was
    sent again when its lease expired. Kept as U+FFFD, as the attempt and the delivery keep
    it, on both engines alike."""
    loop_.zapi.reject_next("number\x00invalid")
    queued = await loop_.send(source="za-sol", text="Oi")
    view = await loop_.until(queued["id"], "failed")
    assert view["error"] == "zapi_http_400: 400 number\ufffdinvalid"
    assert loop_.zapi.requests == 1
    headers = {"authorization": f"Bearer {loop_.key}"}
    async with loop_.http.get(f"{loop_.base}/api/v1/dlq", headers=headers) as r:
        [dead] = (await r.json())["deliveries"]
    assert dead["last_error"] == view["error"]  # SQLite kept the NUL here, PostgreSQL not


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
