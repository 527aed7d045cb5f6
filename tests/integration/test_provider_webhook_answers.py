"""The hub answers each provider's webhooks as that provider expects (contracts §1.3, §2.2,
§2.5, §3.1, §9.3), judged by the fake providers themselves over real HTTP: a message is
queued through the API, sent by the worker to the fake, and followed through its status
webhooks (and, for Twilio, a customer's message) with no failure and no redelivery.

The hub once answered these webhooks 202 with JSON: Meta retries anything but 200 for 7
days, and Twilio logs an incoming message answered with JSON as error 12300. The last test
points the fakes at an app answering so, to show they would have said."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import pytest
from aiohttp import web

from estafeta.store.sqlstore import SqlStore
from estafeta.testing.fakes import FakeMeta, FakeProvider, FakeSendPulse, FakeTwilio, FakeZApi
from estafeta.testing.server import LocalServer
from tests.conftest import base_config
from tests.integration.hub_loop import MessagesClient, served_hub

KEY = "est_webhook_answers_key_000000000000000000"
META = {
    "access_token": "meta-token",
    "phone_number_id": "114950281736452",
    "app_secret": "fake-meta-app-secret",
}
TWILIO = {
    "account_sid": "AC8f3e2d1c0b9a87654321fedcba098765",
    "auth_token": "c8a1f4e7b2d95a3e6f0b1c7d4e9a2f58",
    "from": "whatsapp:+551140028922",
}
ZAPI = {
    "instance_id": "3D9F1A2B4C6E8F0A1B2C3D4E5F6A7B8C",
    "instance_token": "A1B2C3D4E5F6A7B8C9D0E1F2",
    "client_token": "Fa1b2c3d4e5f60718293a4b5c6d7e8f9aS",
}
SENDPULSE = {
    "client_id": "sp-client-7f3a",
    "client_secret": "sp-secret-9c1e4b",
    "bot_id": "66a1f2c3d4e5f60718293a4b",
}
WEBHOOK_TOKEN = "tok_9Yq2mX7vK3pL8sR4"


@dataclass
class Loop(MessagesClient):
    fakes: dict[str, FakeProvider]  # source id → its provider


def new_fakes() -> dict[str, FakeProvider]:
    return {
        "wa-sol": FakeMeta(
            access_token=META["access_token"],
            phone_number_id=META["phone_number_id"],
            app_secret=META["app_secret"],
        ),
        "tw-sol": FakeTwilio(
            account_sid=TWILIO["account_sid"],
            auth_token=TWILIO["auth_token"],
            sender=TWILIO["from"],
        ),
        "za-sol": FakeZApi(**ZAPI, webhook_token=WEBHOOK_TOKEN),
        "sp-sol": FakeSendPulse(
            client_id=SENDPULSE["client_id"],
            client_secret=SENDPULSE["client_secret"],
            bot_id=SENDPULSE["bot_id"],
            webhook_token=WEBHOOK_TOKEN,
        ),
    }


@pytest.fixture
async def loop_(store: SqlStore, database_url: str) -> AsyncIterator[Loop]:
    fakes = new_fakes()
    for fake in fakes.values():
        await fake.start()
    data = base_config(database_url)
    inbound = {
        "wa-sol": ("whatsapp_cloud", {**META, "verify_token": "v"}),
        "tw-sol": ("twilio", TWILIO),
        "za-sol": ("zapi", {**ZAPI, "token": WEBHOOK_TOKEN}),
        "sp-sol": ("sendpulse", {**SENDPULSE, "token": WEBHOOK_TOKEN}),
    }
    for source_id, (kind, keys) in inbound.items():
        data["sources"].append(
            {
                "id": source_id,
                "tenant": "clinica-sol",
                "kind": kind,
                "api_base": fakes[source_id].url,
                **keys,
            }
        )
    async with served_hub(store, data, KEY) as client:
        yield Loop(client.base, client.key, client.http, fakes)
    for fake in fakes.values():
        await fake.stop()


@pytest.mark.parametrize(
    ("source", "statuses", "last"),
    [
        ("wa-sol", ["delivered", "read"], "read"),
        ("tw-sol", ["sent", "delivered", "read"], "read"),
        ("za-sol", ["delivered", "read"], "read"),
        # SendPulse posts no statuses (contracts §9.1): only `outgoing_message`, for `sent`.
        ("sp-sol", ["sent"], "sent"),
    ],
)
async def test_no_provider_sees_a_failed_webhook_for_a_message_followed_to_its_end(
    loop_: Loop, source: str, statuses: list[str], last: str
) -> None:
    fake = loop_.fakes[source]
    queued = (await loop_.send(source, text="Sua consulta está confirmada."))["id"]
    view = await loop_.until(queued, "sent")
    provider_id = view["provider_message_id"]
    assert provider_id == fake.sent[0].message_id
    webhook = f"{loop_.base}/in/{source}"
    for status in statuses:
        # Each once more, as providers redeliver: a duplicate must be taken as well.
        assert await fake.send_status(webhook, provider_id, status, duplicate=True) == [200, 200]
    if isinstance(fake, FakeTwilio):  # the customer answers: Twilio wants TwiML back
        assert await fake.send_incoming(webhook, "Obrigada!") == [200]
    await loop_.until(queued, last)
    assert fake.webhook_failures == []
    assert fake.redeliveries == 0
    if isinstance(fake, FakeTwilio):
        assert fake.debugger_errors == []


class OldHub(LocalServer):
    """What the hub used to answer every provider webhook: 202 with its JSON."""

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/in/{source}", self._accept)

    async def _accept(self, request: web.Request) -> web.Response:
        await request.read()
        body = orjson.dumps({"id": "evt_01J1ZK6Q4M8R2T5W7Y9B3C6D8G", "duplicate": False})
        return web.Response(status=202, body=body, content_type="application/json")


async def test_the_fakes_refuse_a_202_with_json_as_meta_and_twilio_do() -> None:
    async with OldHub() as old:
        fakes = new_fakes()
        for fake in fakes.values():
            await fake.start()
        try:
            answers = {}
            for source, fake in fakes.items():
                message_id = "wamid.X" if isinstance(fake, FakeMeta) else "3EB0F1A9C2D47E8B6A15"
                status = "sent" if isinstance(fake, FakeSendPulse) else "delivered"
                answers[source] = await fake.send_status(
                    f"{old.url}/in/{source}", message_id, status
                )
            twilio = fakes["tw-sol"]
            assert isinstance(twilio, FakeTwilio)
            assert await twilio.send_incoming(f"{old.url}/in/tw-sol", "Oi") == [202]
        finally:
            for fake in fakes.values():
                await fake.stop()
    # Meta: anything but 200 fails and is posted again at once, a bounded number of times.
    meta = fakes["wa-sol"]
    assert answers["wa-sol"] == [202] * (1 + FakeMeta.webhook_redeliveries)
    assert meta.redeliveries == FakeMeta.webhook_redeliveries == 3
    assert [f.status for f in meta.webhook_failures] == [202] * 4
    # Twilio: a status callback may get any 2xx, an incoming message only TwiML.
    assert answers["tw-sol"] == [202]
    assert twilio.debugger_errors == ["12300"]
    [failure] = twilio.webhook_failures
    assert (failure.kind, failure.content_type) == ("incoming", "application/json")
    assert twilio.redeliveries == 0
    # Z-API and SendPulse document no answer: any 2xx is taken (contracts §3.1, §9.3).
    for source in ("za-sol", "sp-sol"):
        assert answers[source] == [202]
        assert fakes[source].webhook_failures == []


async def test_a_non_2xx_answer_is_a_failure_for_every_provider() -> None:
    async with OldHub() as old:
        fakes = new_fakes()
        for fake in fakes.values():
            await fake.start()
        try:
            for source, fake in fakes.items():
                status = "sent" if isinstance(fake, FakeSendPulse) else "delivered"
                # No such route on the old hub: 404.
                await fake.send_status(
                    f"{old.url}/nowhere/{source}", "3EB0F1A9C2D47E8B6A15", status
                )
        finally:
            for fake in fakes.values():
                await fake.stop()
    for source, fake in fakes.items():
        assert {f.status for f in fake.webhook_failures} == {404}, source
    twilio = fakes["tw-sol"]
    assert isinstance(twilio, FakeTwilio)
    assert twilio.debugger_errors == ["11200"]
