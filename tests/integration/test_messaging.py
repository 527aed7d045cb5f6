"""Conversations and sent messages, kept up to date from the events, on both engines; and
another tenant's key reaching none of them, nor any other tenant data, through the API."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import orjson
import pytest
from sqlalchemy import insert, select

from estafeta.api.app import create_app
from estafeta.api.auth import hash_key
from estafeta.config import load_config_dict
from estafeta.delivery.decision import Transition
from estafeta.delivery.outcome import Outcome, OutcomeKind
from estafeta.delivery.state import DeliveryState
from estafeta.hub import Hub
from estafeta.ids import new_id
from estafeta.ingress.providers.base import bounded_key
from estafeta.ingress.providers.twilio import FORM
from estafeta.ingress.providers.twilio import signature as twilio_signature
from estafeta.ingress.spool import Spool
from estafeta.store import open_store, schema
from estafeta.store.records import CompletedAttempt, InsertResult, NewEscalation, NewEvent
from estafeta.store.sqlstore import SqlStore
from tests.conftest import base_config, lease_any, until_waiting_for_locks
from tests.deep_json import nested
from tests.integration.test_spool import Blink

SOL = "est_sol_messaging_key_000000000000000000"
OUTRA = "est_outra_messaging_key_0000000000000000"
MARIA = "5511987654321"
LONGEST = "wa-" + "l" * 60  # the longest source id the configuration allows


@dataclass
class Env:
    http: httpx.AsyncClient
    hub: Hub
    store: SqlStore

    def auth(self, key: str = SOL) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    async def inbound(
        self, text: str, wamid: str, at: int = 1_751_371_200_000, name: str = "Maria Silva"
    ) -> None:
        await self.hub.accept_all([self.message_event(text, wamid, at, name)])

    def message_event(
        self, text: str, wamid: str, at: int = 1_751_371_200_000, name: str = "Maria Silva"
    ) -> NewEvent:
        """Maria's WhatsApp message `text`, sent at `at` under the name `name`."""
        return self.hub.new_event(
            tenant_id="clinica-sol",
            source_id="wa-sol",
            event_type="message.received",
            data={
                "channel": "whatsapp",
                "provider": "whatsapp_cloud",
                "message_id": wamid,
                "conversation_id": MARIA,
                "from": f"+{MARIA}",
                "contact_name": name,
                "kind": "text",
                "text": text,
            },
            idempotency_key=wamid,
            occurred_at=at,
        )

    async def inbound_from(self, number: str, wamid: str) -> None:
        """A message of another customer of clinica-sol."""
        await self.hub.accept_all([inbound_event(self.hub, number, wamid)])

    async def send(self, text: str, source: str = "wa-sol", **extra: Any) -> httpx.Response:
        """POST /api/v1/messages: `text` to Maria through `source`, as clinica-sol."""
        body = {"source": source, "to": f"+{MARIA}", "text": text, **extra}
        return await self.http.post("/api/v1/messages", headers=self.auth(), json=body)

    async def sent_message(
        self, text: str, provider_id: str, *, source: str = "wa-sol", alt_id: str | None = None
    ) -> str:
        """`text` sent to Maria through `source`, and taken by its provider as `provider_id`
        (`finish_send`): the message's id."""
        r = await self.send(text, source)
        await self.finish_send(provider_id=provider_id, source=source, alt_id=alt_id)
        return str(r.json()["id"])

    async def message(self, message_id: str) -> Any:
        """GET /api/v1/messages/{message_id}, as clinica-sol."""
        return (await self.http.get(f"/api/v1/messages/{message_id}", headers=self.auth())).json()

    async def conversation(self) -> Any:
        """GET /api/v1/conversations/{MARIA}, as clinica-sol."""
        return (await self.http.get(f"/api/v1/conversations/{MARIA}", headers=self.auth())).json()

    async def status(
        self,
        wamid: str,
        status: str,
        at: int,
        *,
        tenant: str = "clinica-sol",
        source: str = "wa-sol",
        **extra: Any,
    ) -> None:
        await self.hub.accept(
            tenant_id=tenant,
            source_id=source,
            event_type="message.status",
            data={"message_id": wamid, "status": status, "conversation_id": MARIA, **extra},
            # keyed by the provider's own word, as the ingress keys them
            idempotency_key=f"{wamid}:{extra.get('provider_status', status)}",
            occurred_at=at,
        )

    async def finish_send(
        self,
        *,
        provider_id: str | None,
        dead: bool = False,
        source: str = "wa-sol",
        alt_id: str | None = None,
    ) -> None:
        """Play the worker: lease the send delivery and record the provider's answer."""
        now = self.hub.clock.now_ms()
        batch = await lease_any(self.store, now_ms=now, limit=10)
        [leased] = [d for d in batch if d.destination_id == f"send:{source}"]
        await self.store.release([d for d in batch if d is not leased], now)
        kind = OutcomeKind.PERMANENT if dead else OutcomeKind.SUCCESS
        outcome = Outcome(
            kind,
            12.0,
            status_code=400 if dead else 200,
            external_id=provider_id,
            external_alt_id=alt_id,
            error_class="whatsapp_cloud_131047" if dead else None,
        )
        transition = Transition(
            DeliveryState.DEAD if dead else DeliveryState.SUCCEEDED,
            1,
            None,
            "whatsapp_cloud_131047: Re-engagement message" if dead else None,
        )
        await self.store.complete(
            [CompletedAttempt(leased, outcome, transition, 1, new_id("att"))],
            self.hub.clock.now_ms(),
        )


# clinica-sol's WhatsApp Cloud number, which sends through the fake Meta.
WA_SOL: dict[str, Any] = {
    "id": "wa-sol",
    "tenant": "clinica-sol",
    "kind": "whatsapp_cloud",
    "app_secret": "s3cret",
    "access_token": "token",
    "phone_number_id": "114950281736452",
}


@pytest.fixture
async def env(store: SqlStore, database_url: str) -> AsyncIterator[Env]:
    data = base_config(database_url)
    data["sources"] += [
        WA_SOL,
        {
            "id": "wa-mute",
            "tenant": "clinica-sol",
            "kind": "whatsapp_cloud",
            "app_secret": "s3cret",
        },
        {
            # A second number of the same Meta app: Meta posts every number's webhooks to the
            # app's one callback URL, which is wa-sol's.
            "id": "wa-lab",
            "tenant": "clinica-sol",
            "kind": "whatsapp_cloud",
            "app_secret": "s3cret",
            "access_token": "token",
            "phone_number_id": "114950281736999",
        },
        {
            "id": "tw-sol",
            "tenant": "clinica-sol",
            "kind": "twilio",
            "auth_token": "tw-token",
            "account_sid": "AC8f3e2d1c0b9a87654321fedcba098765",
            "from": "whatsapp:+551140028922",
        },
        {
            "id": "zapi-sol",
            "tenant": "clinica-sol",
            "kind": "zapi",
            "token": "zapi-webhook-token",
            "instance_id": "3D9F1A2B4C6E8F0A1B2C3D4E5F6A7B8C",
            "instance_token": "A1B2C3D4E5F6A7B8C9D0E1F2",
            "client_token": "Fa1b2c3d4e5f60718293a4b5c6d7e8f9aS",
        },
        {
            "id": "sp-sol",
            "tenant": "clinica-sol",
            "kind": "sendpulse",
            "token": "sp-webhook-token",
            "client_id": "sp-client",
            "client_secret": "sp-secret",
            "bot_id": "66a1f2c3d4e5f60718293a4b",
        },
        {
            "id": LONGEST,
            "tenant": "clinica-sol",
            "kind": "whatsapp_cloud",
            "app_secret": "s3cret",
            "access_token": "token",
            "phone_number_id": "114950281736777",
        },
    ]
    data["routes"].append(
        {
            "id": "escalations",
            "tenant": "clinica-sol",
            "events": ["conversation.*"],
            "destinations": ["billing"],
        }
    )
    config = load_config_dict(data)
    await store.sync_config(config, 1)
    await store.create_api_key(
        tenant_id="clinica-sol", key_hash=hash_key(SOL), label="", actor="test", now_ms=1
    )
    await store.create_api_key(
        tenant_id="outra", key_hash=hash_key(OUTRA), label="", actor="test", now_ms=1
    )
    hub = Hub(config, store)
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        yield Env(http, hub, store)
    await hub.close()


async def test_inbound_messages_keep_the_conversation_counters(env: Env) -> None:
    await env.inbound("Olá", "wamid.1", at=1_751_371_200_000)
    await env.inbound("Olá de novo", "wamid.2", at=1_751_371_260_000)
    await env.inbound("Olá", "wamid.1")  # a redelivery counts nothing
    [c] = (await env.http.get("/api/v1/conversations", headers=env.auth())).json()["conversations"]
    assert (c["id"], c["status"], c["inbound_count"], c["outbound_count"]) == (MARIA, "open", 2, 0)
    assert c["contact_name"] == "Maria Silva"
    assert (c["first_message_at"], c["last_message_at"]) == (
        "2025-07-01T12:00:00.000Z",
        "2025-07-01T12:01:00.000Z",
    )
    detail = await env.conversation()
    assert [m["text"] for m in detail["messages"]] == ["Olá", "Olá de novo"]


async def test_a_late_redelivery_of_an_older_message_does_not_rename_the_contact(
    env: Env,
) -> None:
    # Maria renamed herself in WhatsApp; the provider then redelivered yesterday's webhook
    # (a retry, a spool import): the conversation showed her old name again.
    yesterday, today = 1_751_371_200_000, 1_751_457_600_000
    await env.inbound("Bom dia", "wamid.today", at=today, name="Maria Souza")
    await env.inbound("Boa noite", "wamid.yesterday", at=yesterday, name="Maria Silva")
    assert (await env.conversation())["contact_name"] == "Maria Souza"
    # Both in one webhook, the older one last; and a message of neither name keeps it.
    await env.hub.accept_all(
        [
            env.message_event("Até amanhã", "wamid.later", at=today + 60_000, name="Maria S."),
            env.message_event("Oi", "wamid.before", at=today - 60_000, name="Maria Silva"),
        ]
    )
    await env.hub.accept(
        tenant_id="clinica-sol",
        source_id="wa-sol",
        event_type="message.received",
        data={"message_id": "wamid.nameless", "conversation_id": MARIA, "kind": "text"},
        idempotency_key="wamid.nameless",
        occurred_at=today + 120_000,
    )
    c = await env.conversation()
    assert (c["contact_name"], c["inbound_count"]) == ("Maria S.", 5)
    # A newer name still wins, in the list as in the conversation.
    await env.inbound("Obrigada", "wamid.newest", at=today + 180_000, name="Maria Souza")
    [listed] = (await env.http.get("/api/v1/conversations", headers=env.auth())).json()[
        "conversations"
    ]
    assert listed["contact_name"] == "Maria Souza"


async def test_a_sent_message_goes_queued_sent_delivered_read(env: Env) -> None:
    await env.inbound("Quero marcar", "wamid.in")
    r = await env.send("Claro!")
    assert r.status_code == 202, r.text
    message_id = r.json()["id"]
    assert message_id.startswith("msg_") and r.json()["state"] == "queued"
    view = await env.message(message_id)
    assert view["state"] == "queued" and view["content"] == {"text": "Claro!"}

    await env.finish_send(provider_id="wamid.OUT1")
    await env.status("wamid.OUT1", "read", at=1_751_371_300_000)  # out of order
    await env.status("wamid.OUT1", "delivered", at=1_751_371_290_000)
    view = await env.message(message_id)
    assert view["state"] == "read" and view["provider_message_id"] == "wamid.OUT1"
    assert [step["state"] for step in view["timeline"]] == ["queued", "sent", "delivered", "read"]

    detail = await env.conversation()
    assert detail["outbound_count"] == 1
    assert [m["direction"] for m in detail["messages"]] == ["inbound", "outbound"]
    assert detail["messages"][1]["state"] == "read"  # the same as GET /messages/{id}


async def test_a_permanent_provider_error_fails_the_message(env: Env) -> None:
    r = await env.send("Oi")
    await env.finish_send(provider_id=None, dead=True)
    view = await env.message(r.json()["id"])
    assert view["state"] == "failed"
    assert view["error"] == "whatsapp_cloud_131047: Re-engagement message"


async def test_a_send_that_gave_up_says_when_in_its_timeline(env: Env) -> None:
    # Every step of the timeline says when, but the `failed` of a send that gave up had no
    # `at`: a client sorting or showing the steps by time met a step without one.
    clock = FixedClock(1_751_371_200_000)
    env.hub.clock = clock
    r = await env.send("Oi")
    clock.now += 90_000  # the provider refused the message a minute and a half later
    await env.finish_send(provider_id=None, dead=True)
    view = await env.message(r.json()["id"])
    assert view["timeline"] == [
        {"state": "queued", "at": "2025-07-01T12:00:00.000Z"},
        {
            "state": "failed",
            "at": "2025-07-01T12:01:30.000Z",
            "error": "whatsapp_cloud_131047: Re-engagement message",
        },
    ]


async def test_sends_to_one_customer_keep_their_order_and_a_repeat_is_one_message(
    env: Env,
) -> None:
    first = await env.send("1", idempotency_key="k1")
    again = await env.send("1", idempotency_key="k1")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    await env.send("2")
    leased = await lease_any(env.store, now_ms=env.hub.clock.now_ms(), limit=10)
    sends = [d for d in leased if d.destination_id == "send:wa-sol"]
    assert len(sends) == 1 and sends[0].ordering_key == MARIA  # the second waits its turn
    # Routes see sends too: "message.*" to crm matches message.send (the CRM logs replies).
    assert {d.destination_id for d in leased} == {"send:wa-sol", "crm"}


async def test_a_key_names_one_request_across_published_events_and_sends(env: Env) -> None:
    # Both endpoints store `api` events under the tenant's keys. A send whose key was used
    # to publish an event was answered "duplicate" with a message id never stored (and the
    # message never sent); an event whose key was used by a send, as the send's duplicate.
    appointment = {"type": "appointment.booked", "data": {"status": "confirmed"}}
    published = await env.http.post(
        "/api/v1/events", headers=env.auth(), json={**appointment, "idempotency_key": "k1"}
    )
    sent = await env.send("Oi", idempotency_key="k2")
    assert (published.status_code, sent.status_code) == (202, 202)
    stored = (await env.store.queue_stats(history=True)).by_state

    send = await env.send("Oi", idempotency_key="k1")
    assert (send.status_code, send.json()["error"]) == (409, "idempotency_key_reused")
    assert published.json()["id"] in send.json()["detail"]
    event = await env.http.post(
        "/api/v1/events", headers=env.auth(), json={**appointment, "idempotency_key": "k2"}
    )
    assert (event.status_code, event.json()["error"]) == (409, "idempotency_key_reused")
    assert sent.json()["event_id"] in event.json()["detail"]
    assert (
        await env.store.queue_stats(history=True)
    ).by_state == stored  # neither refusal stored a thing

    # Each endpoint's own repeat is still a duplicate of its original.
    again = await env.http.post(
        "/api/v1/events", headers=env.auth(), json={**appointment, "idempotency_key": "k1"}
    )
    assert (again.status_code, again.json()["id"]) == (200, published.json()["id"])


async def test_a_repeated_send_answers_the_original_messages_state(env: Env) -> None:
    # It answered "queued" whatever had happened to the message since.
    send = {"source": "wa-sol", "to": f"+{MARIA}", "text": "Oi", "idempotency_key": "k1"}
    first = await env.http.post("/api/v1/messages", headers=env.auth(), json=send)
    await env.finish_send(provider_id="wamid.OUT1")
    await env.status("wamid.OUT1", "delivered", at=1_751_371_260_000)
    again = await env.http.post("/api/v1/messages", headers=env.auth(), json=send)
    assert (first.json()["state"], first.status_code) == ("queued", 202)
    assert again.status_code == 200
    assert again.json() == {**first.json(), "state": "delivered", "duplicate": True}


async def test_a_replayed_send_that_then_succeeds_is_sent(env: Env) -> None:
    # The message had failed with its delivery; replayed from the dead-letter queue and then
    # accepted by the provider, it stayed "failed" without the provider's id, so the
    # status webhooks that name that id could never reach it.
    r = await env.send("Oi")
    message_url = f"/api/v1/messages/{r.json()['id']}"
    await env.finish_send(provider_id=None, dead=True)
    assert (await env.http.get(message_url, headers=env.auth())).json()["state"] == "failed"

    replayed = await env.http.post("/api/v1/dlq/replay", headers=env.auth(), json={"all": True})
    assert replayed.json()["count"] == 1
    view = (await env.http.get(message_url, headers=env.auth())).json()
    assert (view["state"], view["error"]) == ("queued", None)

    await env.finish_send(provider_id="wamid.OUT9")
    await env.status("wamid.OUT9", "delivered", at=1_751_371_260_000)
    view = (await env.http.get(message_url, headers=env.auth())).json()
    assert (view["state"], view["provider_message_id"]) == ("delivered", "wamid.OUT9")


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"source": "wa-sol", "to": f"+{MARIA}"}, 400, "invalid_request"),
        (
            {
                "source": "wa-sol",
                "to": f"+{MARIA}",
                "text": "a",
                "media": {"kind": "image", "url": "https://x/y.png"},
            },
            400,
            "invalid_request",
        ),
        ({"source": "wa-sol", "to": "11 98765-4321", "text": "a"}, 400, "invalid_request"),
        ({"source": "nope", "to": f"+{MARIA}", "text": "a"}, 404, "unknown_source"),
        ({"source": "outra-in", "to": f"+{MARIA}", "text": "a"}, 404, "unknown_source"),
        ({"source": "crm-events", "to": f"+{MARIA}", "text": "a"}, 400, "source_cannot_send"),
        ({"source": "wa-mute", "to": f"+{MARIA}", "text": "a"}, 400, "source_cannot_send"),
        (
            {"source": "wa-sol", "to": f"+{MARIA}", "media": {"kind": "gif", "url": "https://x"}},
            400,
            "invalid_request",
        ),
    ],
    ids=[
        "no-content",
        "two-contents",
        "not-e164",
        "unknown-source",
        "other-tenants-source",
        "generic-source",
        "no-outbound-keys",
        "bad-media-kind",
    ],
)
async def test_a_bad_send_is_refused_and_queues_nothing(
    env: Env, body: dict[str, Any], status: int, error: str
) -> None:
    r = await env.http.post("/api/v1/messages", headers=env.auth(), json=body)
    assert (r.status_code, r.json()["error"]) == (status, error), r.text
    assert (await env.store.queue_stats(history=True)).by_state == {}


async def test_escalation_marks_the_conversation_and_routes_an_event(env: Env) -> None:
    await env.inbound("Preciso falar com alguém", "wamid.h")
    r = await env.http.post(
        f"/api/v1/conversations/{MARIA}/escalate",
        headers=env.auth(),
        json={"reason": "asked for a human", "priority": 0},
    )
    assert r.status_code == 202
    event = (
        await env.http.get(f"/api/v1/events/{r.json()['event_id']}", headers=env.auth())
    ).json()
    assert event["type"] == "conversation.escalated"
    assert event["event"]["data"]["reason"] == "asked for a human"
    assert [d["destination"] for d in event["deliveries"]] == ["billing"]
    # The escalation's priority is the human's urgency, not the delivery's: the event is
    # sent at its route's priority (the default 2), as any event is (http-api.md).
    assert [d["priority"] for d in event["deliveries"]] == [2]
    c = await env.conversation()
    assert c["status"] == "escalated" and c["escalation"]["priority"] == 0

    r = await env.http.post(
        "/api/v1/conversations/5500000000000/escalate", headers=env.auth(), json={"reason": "x"}
    )
    assert (r.status_code, r.json()["error"]) == (404, "not_found")


async def test_a_retried_escalation_with_its_idempotency_key_escalates_once(env: Env) -> None:
    # A client that timed out and escalated again sent whoever takes over two events (two
    # calls to the nurse) and stored two escalations: the endpoint took no key.
    await env.inbound("Preciso falar com alguém", "wamid.k")
    before = await tenant_rows(env.store, "clinica-sol")
    queued = (await env.store.queue_stats(history=True)).by_state["pending"]
    url = f"/api/v1/conversations/{MARIA}/escalate"
    escalation = {"reason": "asked for a nurse", "priority": 0}
    keyed = {**env.auth(), "idempotency-key": "esc-1"}
    first = await env.http.post(url, headers=keyed, json=escalation)
    again = await env.http.post(url, headers=keyed, json=escalation)
    assert (first.status_code, first.json()["duplicate"]) == (202, False), first.text
    assert again.status_code == 200, again.text
    assert again.json() == {**first.json(), "duplicate": True}
    in_body = await env.http.post(
        url, headers=env.auth(), json={**escalation, "idempotency_key": "esc-1"}
    )
    assert (in_body.status_code, in_body.json()["event_id"]) == (200, first.json()["event_id"])
    async with env.store.engine.connect() as conn:
        escalations = (await conn.execute(select(schema.escalations.c.event_id))).scalars().all()
    assert escalations == [first.json()["event_id"]]
    assert (await env.store.queue_stats(history=True)).by_state == {"pending": queued + 1}

    # Validated as POST /api/v1/events validates it.
    for bad in ("", "k" * 256):
        r = await env.http.post(
            url, headers={**env.auth(), "idempotency-key": bad}, json=escalation
        )
        assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), bad
        assert "idempotency-key" in r.json()["detail"]
    assert len((await tenant_rows(env.store, "clinica-sol"))["escalations"]) == 1
    assert len(before["escalations"]) == 0


async def test_an_escalations_key_is_one_of_the_tenants_api_keys(env: Env) -> None:
    # Published events, sends and escalations store `api` events under the tenant's keys: a
    # key used by one answered the others as its "duplicate", an escalation never made.
    await env.inbound("Preciso falar com alguém", "wamid.k2")
    await env.inbound_from("5511900000000", "wamid.k3")
    published = await env.http.post(
        "/api/v1/events",
        headers=env.auth(),
        json={"type": "appointment.booked", "idempotency_key": "k1"},
    )
    sent = await env.send("Oi", idempotency_key="k2")
    escalated = await env.http.post(
        f"/api/v1/conversations/{MARIA}/escalate",
        headers={**env.auth(), "idempotency-key": "k3"},
        json={"reason": "asked for a nurse"},
    )
    assert (published.status_code, sent.status_code, escalated.status_code) == (202, 202, 202)
    stored = await tenant_rows(env.store, "clinica-sol")

    for key, first in (
        ("k1", published.json()["id"]),
        ("k2", sent.json()["event_id"]),
        ("k3", escalated.json()["event_id"]),  # another conversation's escalation
    ):
        r = await env.http.post(
            "/api/v1/conversations/5511900000000/escalate",
            headers={**env.auth(), "idempotency-key": key},
            json={"reason": "asked for a nurse"},
        )
        assert (r.status_code, r.json()["error"]) == (409, "idempotency_key_reused"), key
        assert first in r.json()["detail"]
    event = await env.http.post(
        "/api/v1/events",
        headers=env.auth(),
        json={"type": "appointment.booked", "idempotency_key": "k3"},
    )
    assert (event.status_code, event.json()["error"]) == (409, "idempotency_key_reused")
    assert escalated.json()["event_id"] in event.json()["detail"]
    send = await env.send("Oi", idempotency_key="k3")
    assert (send.status_code, send.json()["error"]) == (409, "idempotency_key_reused")
    assert await tenant_rows(env.store, "clinica-sol") == stored  # no refusal stored a thing

    # Another tenant's keys are its own: the same key escalates its conversation.
    await env.hub.accept_all(
        [
            env.hub.new_event(
                tenant_id="outra",
                source_id="api",
                event_type="message.received",
                data={"conversation_id": MARIA, "kind": "text", "text": "Oi"},
                idempotency_key=None,
            )
        ]
    )
    await env.hub.accept_all(
        [
            env.hub.new_event(
                tenant_id="outra",
                source_id="outra-in",
                event_type="message.received",
                data={"message_id": "m.o", "conversation_id": MARIA, "from": f"+{MARIA}"},
                idempotency_key="m.o",
            )
        ]
    )
    r = await env.http.post(
        f"/api/v1/conversations/{MARIA}/escalate",
        headers={**env.auth(OUTRA), "idempotency-key": "k3"},
        json={"reason": "asked for a nurse"},
    )
    assert (r.status_code, r.json()["duplicate"]) == (202, False), r.text
    assert r.json()["event_id"] != escalated.json()["event_id"]


async def test_a_spooled_escalation_is_marked_spooled_and_its_retry_gets_its_id(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store went down between reading the conversation and storing its escalation: the
    # event was spooled and answered 202 like a stored one, without the
    # `X-Estafeta-Spooled: 1` that POST /api/v1/events sends in that case.
    await env.inbound("Preciso falar com alguém", "wamid.s")
    blink = Blink(env.store, monkeypatch, down=True)
    hub = Hub(env.hub.config, env.store, spool=Spool(tmp_path / "spool", max_bytes=10**6))
    try:
        transport = httpx.ASGITransport(app=create_app(hub))
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            url = f"/api/v1/conversations/{MARIA}/escalate"
            keyed = {**env.auth(), "idempotency-key": "esc-s"}
            first = await http.post(url, headers=keyed, json={"reason": "asked for a nurse"})
            again = await http.post(url, headers=keyed, json={"reason": "asked for a nurse"})
        assert first.status_code == 202, first.text
        assert first.headers.get("x-estafeta-spooled") == "1"
        assert (again.status_code, again.headers.get("x-estafeta-spooled")) == (200, "1")
        assert again.json() == {**first.json(), "duplicate": True}
        blink.down = False
        assert hub.spool is not None and await hub.spool.drain(env.store) == 1
    finally:
        await hub.close()
    c = await env.conversation()
    assert (c["status"], c["escalation"]["reason"]) == ("escalated", "asked for a nurse")


async def test_an_escalation_without_a_reason_is_refused_and_changes_nothing(env: Env) -> None:
    # A reason of blanks (an empty form field padded by a script) was taken: the nurse got
    # an escalation that said nothing, and the conversation showed it as current.
    await env.inbound("Preciso falar com alguém", "wamid.blank")
    before = await tenant_rows(env.store, "clinica-sol")
    for reason in ("   ", "\n\t", "\u00a0"):
        r = await env.http.post(
            f"/api/v1/conversations/{MARIA}/escalate", headers=env.auth(), json={"reason": reason}
        )
        assert (r.status_code, r.json()) == (
            400,
            {"error": "invalid_request", "detail": "body.reason: must not be only blanks"},
        ), reason
    assert await tenant_rows(env.store, "clinica-sol") == before
    r = await env.http.post(
        f"/api/v1/conversations/{MARIA}/escalate", headers=env.auth(), json={"reason": " nurse "}
    )
    assert r.status_code == 202, r.text
    assert (await env.conversation())["escalation"]["reason"] == " nurse "


async def test_a_closed_conversation_reopens_when_the_customer_writes(env: Env) -> None:
    await env.inbound("Obrigada", "wamid.c1")
    r = await env.http.post(f"/api/v1/conversations/{MARIA}/close", headers=env.auth())
    assert r.json()["status"] == "closed"
    await env.inbound("Mais uma coisa", "wamid.c2")
    c = await env.conversation()
    assert c["status"] == "open"


async def test_a_reopened_conversation_shows_no_escalation_of_before_it_was_closed(
    env: Env,
) -> None:
    # Escalated, handled, closed: when Maria wrote again weeks later, her open conversation
    # still showed the old escalation, as if she were waiting for a nurse now.
    await env.inbound("Preciso falar com a enfermeira", "wamid.e1")
    r = await env.http.post(
        f"/api/v1/conversations/{MARIA}/escalate",
        headers=env.auth(),
        json={"reason": "asked for a nurse", "priority": 0},
    )
    assert r.status_code == 202, r.text
    await env.http.post(f"/api/v1/conversations/{MARIA}/close", headers=env.auth())
    closed = await env.conversation()
    # Closed, it still says why it was escalated.
    assert (closed["status"], closed["escalation"]["reason"]) == ("closed", "asked for a nurse")
    await env.inbound("Bom dia, outra dúvida", "wamid.e2", at=1_751_371_260_000)
    reopened = await env.conversation()
    assert (reopened["status"], reopened["escalation"]) == ("open", None)
    [listed] = (await env.http.get("/api/v1/conversations", headers=env.auth())).json()[
        "conversations"
    ]
    assert (listed["status"], listed["escalation"]) == ("open", None)
    # Its history is kept, and a new escalation shows as current.
    async with env.store.engine.connect() as conn:
        history = (await conn.execute(select(schema.escalations.c.reason))).scalars().all()
    assert history == ["asked for a nurse"]
    r = await env.http.post(
        f"/api/v1/conversations/{MARIA}/escalate", headers=env.auth(), json={"reason": "again"}
    )
    assert r.status_code == 202, r.text
    again = await env.conversation()
    assert (again["status"], again["escalation"]["reason"]) == ("escalated", "again")


async def test_reactions_and_edits_are_no_new_messages_of_the_conversation(env: Env) -> None:
    # A customer's 👍 or corrected typo counted as one more inbound message: the counters
    # grew, the conversation jumped to the top of the list and a closed one reopened.
    at = 1_751_371_200_123
    callback = {
        "type": "ReceivedCallback",
        "messageId": "3EB0A7C19F4D2E8B6C30",
        "phone": MARIA,
        "fromMe": False,
        "momment": at,
        "senderName": "Maria Silva",
        "text": {"message": "Chego às 10h"},
    }
    reaction = {
        **callback,
        "messageId": "3EB0A7C19F4D2E8B6C31",
        "momment": at + 60_000,
        "text": None,
        "reaction": {"value": "👍", "referencedMessage": {"messageId": "3EB0OUT"}},
    }
    edit = {**callback, "isEdit": True, "momment": at + 120_000, "text": {"message": "11h"}}
    url = "/in/zapi-sol?token=zapi-webhook-token"
    r = await env.http.post(url, json=callback)
    assert r.status_code == 200, r.text
    await env.http.post(f"/api/v1/conversations/{MARIA}/close", headers=env.auth())
    for body in (reaction, edit):
        r = await env.http.post(url, json=body)
        assert (r.status_code, r.json()["duplicate"]) == (200, False), r.text
    # WhatsApp Cloud's reactions are the same.
    await env.hub.accept(
        tenant_id="clinica-sol",
        source_id="wa-sol",
        event_type="message.received",
        data={
            "message_id": "wamid.reaction",
            "conversation_id": MARIA,
            "contact_name": "Maria Silva",
            "kind": "reaction",
            "reaction": {"message_id": "wamid.OUT", "emoji": "❤️"},
        },
        idempotency_key="wamid.reaction",
        occurred_at=at + 180_000,
    )
    c = await env.conversation()
    assert (c["status"], c["inbound_count"], c["last_message_at"]) == (
        "closed",
        1,
        "2025-07-01T12:00:00.123Z",
    )
    # Each is still an event routed as any message, and shown with the conversation's
    # messages for what it is.
    assert [(m["kind"], m.get("edited")) for m in c["messages"]] == [
        ("text", None),
        ("reaction", None),
        ("text", True),
        ("reaction", None),
    ]
    # A new message counts and reopens it.
    await env.inbound("Obrigada", "wamid.after", at=at + 240_000)
    c = await env.conversation()
    assert (c["status"], c["inbound_count"]) == ("open", 2)


async def tenant_rows(store: SqlStore, tenant_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the store holds for `tenant_id`, table by table."""
    rows: dict[str, list[tuple[Any, ...]]] = {}
    async with store.engine.connect() as conn:
        for table in schema.metadata.sorted_tables:
            if "tenant_id" in table.c:
                found = await conn.execute(select(table).where(table.c.tenant_id == tenant_id))
                rows[table.name] = sorted((tuple(map(repr, r)) for r in found), key=repr)
    return rows


async def test_another_tenants_key_reaches_nothing_of_a_tenant_through_any_api_operation(
    env: Env,
) -> None:
    # Every operation of /api/v1, called with another tenant's key on this tenant's events,
    # messages, conversation and dead deliveries: each answers as if they did not exist (or
    # 403 where the other tenant is named), says nothing of them, and changes none of them.
    await env.inbound("Olá, quero marcar consulta", "wamid.iso")
    sent = await env.send("Claro, Maria")
    await env.finish_send(provider_id=None, dead=True)  # the send dies: a dead delivery
    published = await env.http.post(
        "/api/v1/events",
        headers=env.auth(),
        json={"type": "appointment.booked", "data": {"patient": "Maria"}, "idempotency_key": "k1"},
    )
    dead = (await env.http.get("/api/v1/dlq", headers=env.auth())).json()["deliveries"]
    [dead_id] = [d["id"] for d in dead]
    event_id, message_id = published.json()["id"], sent.json()["id"]
    secrets = [event_id, message_id, dead_id, MARIA, "Maria", sent.json()["event_id"]]
    before = await tenant_rows(env.store, "clinica-sol")

    conversation = f"/api/v1/conversations/{MARIA}"
    calls: dict[tuple[str, str], list[tuple[str, dict[str, Any], int]]] = {
        ("GET", "/api/v1/events/{event_id}"): [(f"/api/v1/events/{event_id}", {}, 404)],
        ("POST", "/api/v1/events"): [
            # The same idempotency key is another tenant's own new event, not a duplicate.
            (
                "/api/v1/events",
                {"json": {"type": "appointment.booked", "data": {}, "idempotency_key": "k1"}},
                202,
            )
        ],
        ("POST", "/api/v1/messages"): [
            (
                "/api/v1/messages",
                {"json": {"source": "wa-sol", "to": f"+{MARIA}", "text": "x"}},
                404,
            )
        ],
        ("GET", "/api/v1/messages/{message_id}"): [(f"/api/v1/messages/{message_id}", {}, 404)],
        ("GET", "/api/v1/conversations"): [
            ("/api/v1/conversations", {}, 200),
            ("/api/v1/conversations", {"params": {"tenant": "clinica-sol"}}, 403),
        ],
        ("GET", "/api/v1/conversations/{conversation_id}"): [
            (conversation, {}, 404),
            (conversation, {"params": {"tenant": "clinica-sol"}}, 403),
        ],
        ("POST", "/api/v1/conversations/{conversation_id}/escalate"): [
            (f"{conversation}/escalate", {"json": {"reason": "x"}}, 404)
        ],
        ("POST", "/api/v1/conversations/{conversation_id}/close"): [
            (f"{conversation}/close", {}, 404)
        ],
        ("GET", "/api/v1/dlq"): [
            ("/api/v1/dlq", {}, 200),
            ("/api/v1/dlq", {"params": {"tenant": "clinica-sol"}}, 403),
            ("/api/v1/dlq", {"params": {"destination": "send:wa-sol"}}, 404),
        ],
        **{
            ("POST", f"/api/v1/dlq/{move}"): [
                (f"/api/v1/dlq/{move}", {"json": {"ids": [dead_id]}}, 200),
                (f"/api/v1/dlq/{move}", {"json": {"all": True}}, 200),
                (f"/api/v1/dlq/{move}", {"json": {"tenant": "clinica-sol"}}, 403),
            ]
            for move in ("replay", "discard")
        },
    }
    # An operation added later must be added here too.
    paths = (await env.http.get("/openapi.json")).json()["paths"]
    operations = {
        (method.upper(), path)
        for path, by_method in paths.items()
        if path.startswith("/api/v1/")
        for method in by_method
    }
    assert operations == set(calls)

    for (method, _), requests in sorted(calls.items()):
        for url, options, status in requests:
            r = await env.http.request(method, url, headers=env.auth(OUTRA), **options)
            assert r.status_code == status, (method, url, options, r.text)
            # What the request named may be echoed ("no conversation '55…'"), nothing else.
            asked = url + repr(options)
            leaked = [s for s in secrets if s in r.text and s not in asked]
            assert not leaked, (method, url, options, r.text)
            if url.startswith("/api/v1/dlq/") and status == 200:
                assert r.json()["count"] == 0
    assert await tenant_rows(env.store, "clinica-sol") == before


async def test_a_send_through_a_source_with_the_longest_id_is_stored(env: Env) -> None:
    """Its deliveries go to `send:<source>`, five characters longer than any configured id:
    the columns that hold destination ids fit it (PostgreSQL enforces their length)."""
    r = await env.send("Oi", source=LONGEST)
    assert r.status_code == 202, r.text
    now = env.hub.clock.now_ms()
    batch = await lease_any(env.store, now_ms=now, limit=10)
    [leased] = [d for d in batch if d.destination_id == f"send:{LONGEST}"]
    await env.store.update_circuit(leased.destination_id, lambda _: {"state": "closed"}, now)
    assert f"send:{LONGEST}" in await env.store.circuit_states()


async def test_a_conversation_shows_the_status_the_provider_gave_whatever_recipient_it_names(
    env: Env,
) -> None:
    # Meta's status webhook names the customer by their WhatsApp id, which can differ from the
    # number the message was sent to (a Brazilian mobile registered before the ninth digit:
    # sent to +55 11 98765-4321, `recipient_id` 551187654321). The conversation looked the
    # statuses up by that id, so it showed the message `sent` while GET /messages said `read`.
    message_id = await env.sent_message("Claro!", "wamid.OUT7")
    await env.status("wamid.OUT7", "read", at=1_751_371_300_000, conversation_id="551187654321")
    view = await env.message(message_id)
    assert view["state"] == "read"
    detail = await env.conversation()
    assert [(m["id"], m["state"]) for m in detail["messages"]] == [(message_id, "read")]


async def test_one_customer_written_with_and_without_the_ninth_digit_has_two_conversations(
    env: Env,
) -> None:
    # No provider contract gives a rule for Brazil's ninth digit, so estafeta adds or removes
    # none (docs/http-api.md, Conversations): the provider's two ids are two conversations.
    await env.inbound_from(MARIA, "wamid.nine")
    await env.inbound_from("551187654321", "wamid.eight")
    listed = (await env.http.get("/api/v1/conversations", headers=env.auth())).json()
    assert sorted(c["id"] for c in listed["conversations"]) == ["551187654321", MARIA]


async def test_a_status_in_another_tenants_store_never_moves_a_message(env: Env) -> None:
    # Tenants share nothing: a status event stored under another tenant (a source moved from
    # one tenant to another in the configuration keeps its id) never reaches this tenant's
    # message, neither in GET /messages nor in its conversation.
    message_id = await env.sent_message("Oi", "wamid.OUT8")
    await env.status("wamid.OUT8", "failed", at=1_751_371_300_000, tenant="outra")
    view = await env.message(message_id)
    assert (view["state"], [s["state"] for s in view["timeline"]]) == ("sent", ["queued", "sent"])
    detail = await env.conversation()
    assert detail["messages"][0]["state"] == "sent"


IMAGE = "https://clinica.example/mapa.png"


@pytest.mark.parametrize(
    ("body", "error", "detail"),
    [
        ({"source": "wa-sol", "text": "   "}, "invalid_request", "body.text: "),
        (
            {"source": "wa-sol", "media": {"kind": "audio", "url": IMAGE, "caption": "Oi"}},
            "invalid_request",
            "body.media.caption: an audio message cannot have a caption",
        ),
        (
            {"source": "wa-sol", "media": {"kind": "image", "url": IMAGE, "filename": "a.png"}},
            "invalid_request",
            "body.media.filename: only a document has a file name",
        ),
        (
            {"source": "wa-sol", "media": {"kind": "image", "url": "https://"}},
            "invalid_request",
            "body.media.url: ",
        ),
        (
            {"source": "wa-sol", "template": {"name": "  ", "language": "pt_BR"}},
            "invalid_request",
            "body.template.name: ",
        ),
        (
            {"source": "tw-sol", "template": {"content_sid": ""}},
            "invalid_request",
            "body.template.content_sid: ",
        ),
        (
            {"source": "tw-sol", "template": {"content_sid": "HX1", "variables": ["Maria"]}},
            "invalid_request",
            "body.template.variables: ",
        ),
        (
            {"source": "wa-sol", "media": "https://clinica.example/mapa.png"},
            "invalid_request",
            "body.media: ",
        ),
        (
            {"source": "wa-sol", "media": {"kind": "image", "url": IMAGE, "caption": "a" * 1025}},
            "invalid_request",
            "body.media.caption: ",
        ),
        (
            {"source": "wa-sol", "media": {"kind": "image", "url": IMAGE, "caption": 7}},
            "invalid_request",
            "body.media.caption: ",
        ),
        (
            {"source": "wa-sol", "media": {"kind": "document", "url": IMAGE, "filename": " "}},
            "invalid_request",
            "body.media.filename: must be a non-empty string",
        ),
        (  # its send's event holds it four levels down: it failed with a 500 once queued
            {
                "source": "wa-sol",
                "template": {"name": "x", "language": "pt_BR", "components": [nested(250)]},
            },
            "invalid_request",
            "body.template.components.0: cannot be stored as JSON: arrays and objects nested"
            " more than 249 deep",
        ),
        (
            {"source": "zapi-sol", "template": {"name": "lembrete", "language": "pt_BR"}},
            "unsupported_message",
            "Z-API",
        ),
        (
            {"source": "zapi-sol", "media": {"kind": "document", "url": "https://x.example/l"}},
            "unsupported_message",
            "extension",
        ),
        (
            {"source": "sp-sol", "media": {"kind": "video", "url": "https://x.example/v.mp4"}},
            "unsupported_message",
            "video",
        ),
        ({"source": "sp-sol", "text": "a" * 1025}, "unsupported_message", "1024"),
        (
            {"source": "sp-sol", "media": {"kind": "image", "url": "http://x.example/a.png"}},
            "unsupported_message",
            "HTTPS",
        ),
        (
            {"source": "tw-sol", "template": {"name": "lembrete", "language": "pt_BR"}},
            "unsupported_message",
            "content_sid",
        ),
        (
            {"source": "wa-sol", "template": {"content_sid": "HXb5b62575e6e4ff6129ad7c8efe1f983e"}},
            "unsupported_message",
            "a Cloud API template needs a name (content_sid is Twilio's)",
        ),
        (
            {"source": "sp-sol", "template": {"content_sid": "HXb5b62575e6e4ff6129ad7c8efe1f983e"}},
            "unsupported_message",
            "a SendPulse template needs a name (content_sid is Twilio's)",
        ),
        (
            {"source": "wa-sol", "template": {"name": "lembrete"}},
            "invalid_request",
            "body.template: give name and language, or (on Twilio) content_sid",
        ),
    ],
    ids=[
        "blank-text",
        "audio-caption",
        "image-filename",
        "url-without-host",
        "blank-template-name",
        "empty-content-sid",
        "template-variables-not-an-object",
        "media-not-an-object",
        "caption-too-long",
        "caption-not-a-string",
        "blank-document-filename",
        "component-nested-too-deep",
        "zapi-template",
        "zapi-document-without-extension",
        "sendpulse-video",
        "sendpulse-text-over-1024",
        "sendpulse-http-media",
        "twilio-cloud-template-name",
        "cloud-content-sid-template",
        "sendpulse-content-sid-template",
        "cloud-template-without-language",
    ],
)
async def test_a_message_the_source_can_never_send_is_refused_at_the_door(
    env: Env, body: dict[str, Any], error: str, detail: str
) -> None:
    # They were answered 202 and dead-lettered at the first attempt (`invalid_message` or
    # `unsupported_message`): the caller learnt of it only by polling the message.
    r = await env.http.post(
        "/api/v1/messages", headers=env.auth(), json={"to": f"+{MARIA}", **body}
    )
    assert (r.status_code, r.json()["error"]) == (400, error), r.text
    assert detail in r.json()["detail"]
    assert (await env.store.queue_stats(history=True)).by_state == {}


async def test_a_component_nested_as_deep_as_it_can_be_stored_is_sent(env: Env) -> None:
    template = {"name": "x", "language": "pt_BR", "components": [nested(249)]}
    r = await env.http.post(
        "/api/v1/messages",
        headers=env.auth(),
        json={"to": f"+{MARIA}", "source": "wa-sol", "template": template},
    )
    assert r.status_code == 202, r.text
    message = await env.message(r.json()["id"])
    assert message["content"] == {"template": template}
    # Where it is written deepest: its event's answer, and the conversation's page.
    event = await env.http.get(f"/api/v1/events/{r.json()['event_id']}", headers=env.auth())
    assert event.status_code == 200, event.text
    page = await env.http.get(f"/api/v1/conversations/{MARIA}", headers=env.auth())
    assert page.status_code == 200, page.text
    assert page.json()["messages"][-1]["template"] == template


@pytest.mark.parametrize(
    "body",
    [
        {
            "source": "tw-sol",
            "template": {"name": "HXb5b62575e6e4ff6129ad7c8efe1f983e", "language": "pt_BR"},
        },
        {
            "source": "zapi-sol",
            "media": {"kind": "document", "url": "https://x.example/l", "filename": "laudo.pdf"},
        },
        {"source": "sp-sol", "media": {"kind": "image", "url": IMAGE, "caption": "Mapa"}},
        {"source": "wa-sol", "media": {"kind": "video", "url": "https://x.example/v.mp4"}},
        {"source": "sp-sol", "text": "a" * 1024},
        {"source": "wa-sol", "text": "a" * 4096},
    ],
    ids=[
        "twilio-content-template",
        "zapi-document",
        "sendpulse-image",
        "cloud-video",
        "sendpulse-1024",
        "cloud-4096",
    ],
)
async def test_a_message_the_source_can_send_is_queued(env: Env, body: dict[str, Any]) -> None:
    r = await env.http.post(
        "/api/v1/messages", headers=env.auth(), json={"to": f"+{MARIA}", **body}
    )
    assert r.status_code == 202, r.text


async def test_a_twilio_content_template_given_as_documented_is_queued_with_its_variables(
    env: Env,
) -> None:
    # docs/http-api.md: on Twilio `{content_sid, variables?}`. The API's body took only
    # `{name, language}`, so the documented form was refused `400 invalid_request`.
    template = {"content_sid": "HXb5b62575e6e4ff6129ad7c8efe1f983e", "variables": {"1": "Maria"}}
    r = await env.http.post(
        "/api/v1/messages",
        headers=env.auth(),
        json={"to": f"+{MARIA}", "source": "tw-sol", "template": template},
    )
    assert r.status_code == 202, r.text
    sent = (await env.message(r.json()["id"]))["content"]["template"]
    assert (sent["content_sid"], sent["variables"]) == (template["content_sid"], {"1": "Maria"})


async def test_every_conversation_can_be_listed_page_by_page_most_recent_first(
    env: Env,
) -> None:
    # `?limit=` (at most 1000) was the only control: a tenant with more conversations could
    # never list the older ones, and conversations whose last messages share a time came in
    # no defined order.
    at = 1_751_371_200_000
    numbers = [f"55119876500{n:02d}" for n in range(7)]
    for n, number in enumerate(numbers):
        await env.hub.accept(
            tenant_id="clinica-sol",
            source_id="wa-sol",
            event_type="message.received",
            data={"message_id": f"wamid.p{n}", "conversation_id": number, "kind": "text"},
            idempotency_key=f"wamid.p{n}",
            occurred_at=at + (n // 2) * 1000,  # pairs share their last message's time
        )
    seen: list[str] = []
    url = "/api/v1/conversations?limit=3"
    for _ in range(5):
        page = (await env.http.get(url, headers=env.auth())).json()
        seen += [c["id"] for c in page["conversations"]]
        if page["next"] is None:
            break
        url = f"/api/v1/conversations?limit=3&cursor={page['next']}"
    expected = sorted(numbers, key=lambda n: (numbers.index(n) // 2, n), reverse=True)
    assert seen == expected
    everything = (await env.http.get("/api/v1/conversations", headers=env.auth())).json()
    assert [c["id"] for c in everything["conversations"]] == expected
    assert everything["next"] is None

    r = await env.http.get("/api/v1/conversations?cursor=nonsense", headers=env.auth())
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")


async def test_conversations_of_one_millisecond_come_each_once_on_every_key(env: Env) -> None:
    # Every conversation of two tenants got its last message in the same millisecond: only
    # the tie-breakers (tenant, then id) order them, across the tenants the admin key merges.
    # Ids of another length, case and alphabet too, where a text order could differ.
    ids = ["9", "10", "5511987654321", "551198765432", "A", "a", "b", "Ä", "z" * 64]
    rows = [
        {
            "tenant_id": tenant,
            "id": conversation,
            "status": "open",
            "contact_name": None,
            "first_message_at": 1_751_371_200_000,
            "last_message_at": 1_751_371_200_000,
            "inbound_count": 1,
            "outbound_count": 0,
            "updated_at": 1_751_371_200_000,
        }
        for tenant in ("clinica-sol", "outra")
        for conversation in ids
    ]
    async with env.store.engine.begin() as conn:
        await conn.execute(insert(schema.conversations), rows)
    for key, tenants in (("test-admin-key", {"clinica-sol", "outra"}), (SOL, {"clinica-sol"})):
        everything = (await env.http.get("/api/v1/conversations", headers=env.auth(key))).json()
        expected = [(c["tenant"], c["id"]) for c in everything["conversations"]]
        assert sorted(expected) == sorted(
            (r["tenant_id"], r["id"]) for r in rows if r["tenant_id"] in tenants
        )
        for limit in (1, 2, 4, 7):
            seen: list[tuple[str, str]] = []
            params: dict[str, Any] = {"limit": limit}
            for _ in range(len(rows) + 1):
                r = await env.http.get(
                    "/api/v1/conversations", params=params, headers=env.auth(key)
                )
                assert r.status_code == 200, r.text
                seen += [(c["tenant"], c["id"]) for c in r.json()["conversations"]]
                if r.json()["next"] is None:
                    break
                params = {"limit": limit, "cursor": r.json()["next"]}
            assert seen == expected, (key, limit)


async def test_a_message_the_provider_failed_says_why_in_its_error(env: Env) -> None:
    # Its state was `failed` and its `error` null: the reason was only inside the timeline.
    message_id = await env.sent_message("Oi", "wamid.OUT5")
    failure = {"code": 131026, "title": "Message undeliverable", "message": None, "details": None}
    await env.status(
        "wamid.OUT5", "failed", at=1_751_371_300_000, provider="whatsapp_cloud", error=failure
    )
    view = await env.message(message_id)
    assert view["state"] == "failed"
    assert view["error"] == "whatsapp_cloud_131026: Message undeliverable"
    assert view["timeline"][-1] == {
        "state": "failed",
        "at": "2025-07-01T12:01:40.000Z",
        "error": failure,
    }


async def test_a_status_posted_to_another_number_of_the_same_app_reaches_the_message(
    env: Env,
) -> None:
    # One Meta app with two numbers has one webhook URL: the statuses of what wa-lab sent
    # arrive at wa-sol. They were looked up under the sending source only, so the message
    # stayed `sent` whatever the provider said.
    message_id = await env.sent_message("Seu exame está pronto.", "wamid.LAB1", source="wa-lab")
    await env.status("wamid.LAB1", "delivered", at=1_751_371_290_000)  # at /in/wa-sol
    await env.status("wamid.LAB1", "read", at=1_751_371_300_000)
    # The same webhook, also received by wa-lab: one step.
    await env.status("wamid.LAB1", "read", at=1_751_371_300_000, source="wa-lab")
    view = await env.message(message_id)
    assert view["state"] == "read"
    assert [step["state"] for step in view["timeline"]] == ["queued", "sent", "delivered", "read"]
    detail = await env.conversation()
    assert [m["state"] for m in detail["messages"]] == ["read"]


async def test_a_message_is_sent_once_in_its_timeline_when_the_provider_says_sent_too(
    env: Env,
) -> None:
    # Meta, Twilio and Z-API each post their own `sent` status after accepting a send: the
    # timeline said `sent` twice, once at the acceptance and once at the provider's word.
    env.hub.clock = FixedClock(1_751_371_200_000)  # sent before the provider's statuses
    r = await env.send("Sua consulta está confirmada.")
    await env.finish_send(provider_id="wamid.ONCE")
    accepted = (await env.message(r.json()["id"]))["timeline"][1]
    assert accepted["state"] == "sent"
    await env.status("wamid.ONCE", "sent", at=1_751_371_280_000)
    await env.status("wamid.ONCE", "delivered", at=1_751_371_290_000)
    view = await env.message(r.json()["id"])
    assert view["timeline"][1:] == [
        accepted,
        {"state": "delivered", "at": "2025-07-01T12:01:30.000Z"},
    ]


async def test_statuses_of_the_same_second_are_in_the_timeline_in_their_natural_order(
    env: Env,
) -> None:
    # Meta's timestamps are whole seconds: a message read as it arrived has `delivered` and
    # `read` in the same second, and the webhooks may come in any order. The timeline put
    # them in arrival order, `read` before `delivered`.
    message_id = await env.sent_message("Oi", "wamid.OUT6")
    await env.status("wamid.OUT6", "read", at=1_751_371_300_000)
    await env.status("wamid.OUT6", "delivered", at=1_751_371_300_000)
    await env.status("wamid.OUT6", "sent", at=1_751_371_300_000)
    view = await env.message(message_id)
    assert [step["state"] for step in view["timeline"]] == [
        "queued",
        "sent",
        "delivered",
        "read",
    ]


async def test_twilio_callbacks_that_arrive_out_of_order_are_in_the_timeline_in_their_natural_order(
    env: Env,
) -> None:
    # Twilio's status callbacks carry no time, so each is timed as it arrives, and Twilio
    # says they may arrive out of order: the timeline went read, delivered, sent, while
    # `state` said read.
    sid = "SM" + "7" * 32
    message_id = await env.sent_message("Oi", sid, source="tw-sol")
    clock = FixedClock(env.hub.clock.now_ms())
    env.hub.clock = clock
    for status in ("read", "delivered", "sent"):
        clock.now += 150
        fields = {"MessageSid": sid, "MessageStatus": status, "To": f"whatsapp:+{MARIA}"}
        signed = twilio_signature(
            b"tw-token", "http://hub/in/tw-sol", {k: [v] for k, v in fields.items()}
        )
        answer = await env.http.post(
            "/in/tw-sol",
            content=urlencode(fields),
            headers={"x-twilio-signature": signed, "content-type": FORM},
        )
        assert answer.status_code == 200, answer.text
    view = await env.message(message_id)
    assert view["state"] == "read"
    assert [step["state"] for step in view["timeline"]] == [
        "queued",
        "sent",
        "delivered",
        "read",
    ]
    # Each step at the latest when the next one was: `delivered`, which arrived after
    # `read`, said a moment after it.
    times = [step["at"] for step in view["timeline"]]
    assert times == sorted(times)
    assert times[2] == times[3]


async def test_a_zapi_callback_naming_only_the_zaap_id_reaches_only_its_tenants_message(
    env: Env,
) -> None:
    # Z-API's DeliveryCallback requires only `zaapId`; without `messageId` the status named
    # an id the message did not have, and a failed send stayed `sent`. The second id matches
    # only statuses of the tenant's own Z-API sources, as the first one does.
    message_id = await env.sent_message("Oi", "3EB0AAAA", source="zapi-sol", alt_id="ZAAP9")
    url = f"/api/v1/messages/{message_id}"
    failure = {"code": None, "title": None, "message": "not on WhatsApp", "details": None}

    async def failed_naming_the_zaap_id(tenant: str, source: str) -> None:
        await env.hub.accept(
            tenant_id=tenant,
            source_id=source,
            event_type="message.status",
            data={"message_id": "ZAAP9", "status": "failed", "provider": "zapi", "error": failure},
            idempotency_key="ZAAP9:FAILED",
            occurred_at=1_751_371_300_000,
        )

    for tenant, source in [("outra", "zapi-sol"), ("clinica-sol", "wa-sol")]:
        await failed_naming_the_zaap_id(tenant, source)
        assert (await env.http.get(url, headers=env.auth())).json()["state"] == "sent"
    await failed_naming_the_zaap_id("clinica-sol", "zapi-sol")
    view = (await env.http.get(url, headers=env.auth())).json()
    assert (view["state"], view["error"]) == ("failed", "zapi_failed: not on WhatsApp")
    detail = await env.conversation()
    assert [m["state"] for m in detail["messages"]] == ["failed"]


class FixedClock:
    """The hub's time, set by the test: sends stored within one millisecond."""

    def __init__(self, now_ms: int) -> None:
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now


async def test_a_long_conversation_comes_page_by_page_each_message_once_oldest_first(
    env: Env,
) -> None:
    # GET /conversations/{id} answered every message of the conversation at once: thousands
    # for a long one. Here messages both ways share milliseconds, so that only a total order
    # (time, direction, id) pages them without skipping or repeating one.
    at = 1_751_371_200_000
    clock = FixedClock(at)
    env.hub.clock = clock
    for n in range(5):
        await env.inbound(f"mesma hora {n}", f"wamid.same{n}", at=at)
    await env.inbound("depois", "wamid.later", at=at + 1)
    for n in range(4):
        r = await env.send(f"resposta {n}")
        assert r.status_code == 202, r.text
    clock.now = at - 1_000
    await env.send("antes")
    clock.now = at + 1
    await env.send("no fim")
    url = f"/api/v1/conversations/{MARIA}"
    everything = (await env.http.get(url, headers=env.auth())).json()
    assert everything["next"] is None
    messages = everything["messages"]
    assert len(messages) == 12
    rank = {"inbound": 0, "outbound": 1}
    assert messages == sorted(messages, key=lambda m: (m["at"], rank[m["direction"]], m["id"]))
    assert (messages[0]["text"], messages[-1]["text"]) == ("antes", "no fim")

    for limit in (1, 2, 3, 5):
        seen: list[dict[str, Any]] = []
        page_url = f"{url}?limit={limit}"
        for _ in range(13):
            page = (await env.http.get(page_url, headers=env.auth())).json()
            assert len(page["messages"]) <= limit
            assert page["inbound_count"] == 6  # the conversation's fields on every page
            seen += page["messages"]
            if page["next"] is None:
                break
            page_url = f"{url}?limit={limit}&cursor={page['next']}"
        assert seen == messages, limit


async def test_a_bad_page_of_a_conversation_is_a_400_naming_the_parameter(env: Env) -> None:
    await env.inbound("Olá", "wamid.bad1", at=1_751_371_200_000)
    await env.inbound("Olá 2", "wamid.bad2", at=1_751_371_200_001)
    await env.hub.accept(  # a second conversation, so that the list has a `next`
        tenant_id="clinica-sol",
        source_id="wa-sol",
        event_type="message.received",
        data={"message_id": "wamid.joao", "conversation_id": "5521912345678", "kind": "text"},
        idempotency_key="wamid.joao",
        occurred_at=1_751_371_100_000,
    )
    url = f"/api/v1/conversations/{MARIA}"
    listed = (await env.http.get("/api/v1/conversations?limit=1", headers=env.auth())).json()
    assert listed["next"] is not None
    for query, parameter in [
        ("cursor=nonsense", "query.cursor"),
        ("cursor=WyJtIiwxLDIsM10", "query.cursor"),  # ["m",1,2,3]
        (
            "cursor=WyJtIiw5MjIzMzcyMDM2ODU0Nzc1ODA4LCJpbmJvdW5kIiwieCJd",
            "query.cursor",
        ),  # 2**63
        ("cursor=WyJtIiwxLCJpbmJvdW5kIiwiXHUwMDAwIl0", "query.cursor"),  # an id with U+0000
        (f"cursor={listed['next']}", "query.cursor"),  # a page of the list, not of messages
        ("limit=0", "query.limit"),
        ("limit=1001", "query.limit"),
        ("limit=ten", "query.limit"),
    ]:
        r = await env.http.get(f"{url}?{query}", headers=env.auth())
        assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), query
        assert parameter in r.json()["detail"], (query, r.json())
    # The list's cursor is read the same way: a time beyond a 64-bit column is no position.
    for cursor in (
        "WyJjIiw5MjIzMzcyMDM2ODU0Nzc1ODA4LCJjbGluaWNhLXNvbCIsIngiXQ",
        "WyJjIiwxLCJjbFx1MDAwMCIsIngiXQ",
    ):
        r = await env.http.get(f"/api/v1/conversations?cursor={cursor}", headers=env.auth())
        assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    first = (await env.http.get(f"{url}?limit=1", headers=env.auth())).json()
    # Nor is a page of messages a position in the list (it once answered some page of it).
    r = await env.http.get(f"/api/v1/conversations?cursor={first['next']}", headers=env.auth())
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    assert "query.cursor" in r.json()["detail"]
    assert [m["text"] for m in first["messages"]] == ["Olá"]
    rest = await env.http.get(f"{url}?limit=1000&cursor={first['next']}", headers=env.auth())
    assert ([m["text"] for m in rest.json()["messages"]], rest.json()["next"]) == (["Olá 2"], None)


async def test_an_empty_tenant_is_a_400_naming_the_parameter(env: Env) -> None:
    # The admin's `?tenant=` left empty (a blank field of a script) answered an empty list,
    # as if the hub held no conversation.
    await env.inbound("Olá", "wamid.t1")
    for key in ("test-admin-key", SOL):
        for url in ("/api/v1/conversations?tenant=", f"/api/v1/conversations/{MARIA}?tenant="):
            r = await env.http.get(url, headers=env.auth(key))
            assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), (key, url)
            assert r.json()["detail"].startswith("query.tenant: "), r.json()
    r = await env.http.get(
        "/api/v1/conversations?tenant=clinica-sol", headers=env.auth("test-admin-key")
    )
    assert [c["id"] for c in r.json()["conversations"]] == [MARIA]


async def test_an_unknown_tenant_is_a_404_naming_it_not_an_empty_list(env: Env) -> None:
    # The admin's `?tenant=clinica-soll` (a typo) answered `{"conversations": []}`, as if
    # the tenant had no conversation, where the DLQ's list answers `no tenant 'clinica-soll'`.
    await env.inbound("Olá", "wamid.t1")
    admin = env.auth("test-admin-key")
    for status in (None, "open"):
        params = {"tenant": "clinica-soll", **({"status": status} if status else {})}
        r = await env.http.get("/api/v1/conversations", params=params, headers=admin)
        assert (r.status_code, r.json()) == (
            404,
            {"error": "not_found", "detail": "no tenant 'clinica-soll'"},
        )
    # A known tenant without conversations is an empty list, as before.
    r = await env.http.get("/api/v1/conversations", params={"tenant": "outra"}, headers=admin)
    assert (r.status_code, r.json()) == (200, {"conversations": [], "next": None})
    # Another tenant's key still gets 403 for any tenant it names, known or not: nothing
    # says which tenants exist.
    for tenant in ("clinica-soll", "clinica-sol"):
        r = await env.http.get(
            "/api/v1/conversations", params={"tenant": tenant}, headers=env.auth(OUTRA)
        )
        assert (r.status_code, r.json()["error"]) == (403, "forbidden")


async def test_the_admin_reading_a_conversation_of_an_unknown_tenant_is_told_the_tenant(
    env: Env,
) -> None:
    # The admin's `?tenant=clinica-soll` (a typo) on one conversation answered `no
    # conversation '5511987654321'`: the operator went looking for a lost conversation.
    await env.inbound("Olá", "wamid.t1")
    admin = env.auth("test-admin-key")
    url = f"/api/v1/conversations/{MARIA}"
    r = await env.http.get(url, params={"tenant": "clinica-soll"}, headers=admin)
    assert (r.status_code, r.json()) == (
        404,
        {"error": "not_found", "detail": "no tenant 'clinica-soll'"},
    )
    # A known tenant without that conversation names the conversation, as before.
    r = await env.http.get(url, params={"tenant": "outra"}, headers=admin)
    assert (r.status_code, r.json()) == (
        404,
        {"error": "not_found", "detail": f"no conversation '{MARIA}'"},
    )
    r = await env.http.get(url, params={"tenant": "clinica-sol"}, headers=admin)
    assert (r.status_code, r.json()["inbound_count"]) == (200, 1)
    # Without ?tenant= the admin names no tenant: a conversation id is only a tenant's.
    r = await env.http.get(url, headers=admin)
    assert (r.status_code, r.json()) == (
        400,
        {"error": "invalid_request", "detail": "the admin key must name the tenant (?tenant=)"},
    )
    # A tenant's key is told nothing of other tenants: its own conversations only.
    r = await env.http.get(url, headers=env.auth(OUTRA))
    assert (r.status_code, r.json()["detail"]) == (404, f"no conversation '{MARIA}'")


async def test_pages_of_a_conversation_show_only_the_tenants_own_messages(env: Env) -> None:
    at = 1_751_371_200_000
    for n in range(3):
        await env.inbound(f"sol {n}", f"wamid.sol{n}", at=at + n)
        await env.hub.accept(  # the same customer writing to another tenant's number
            tenant_id="outra",
            source_id="outra-in",
            event_type="message.received",
            data={"message_id": f"wamid.outra{n}", "conversation_id": MARIA, "text": "outra"},
            idempotency_key=f"wamid.outra{n}",
            occurred_at=at + n,
        )
    url = f"/api/v1/conversations/{MARIA}"
    seen: list[str] = []
    page_url = f"{url}?limit=2"
    for _ in range(4):
        page = (await env.http.get(page_url, headers=env.auth())).json()
        seen += [m["text"] for m in page["messages"]]
        if page["next"] is None:
            break
        # Another tenant's key with this tenant's cursor: its own messages only.
        outra = await env.http.get(f"{url}?limit=2&cursor={page['next']}", headers=env.auth(OUTRA))
        assert {m["text"] for m in outra.json()["messages"]} == {"outra"}
        page_url = f"{url}?limit=2&cursor={page['next']}"
    assert seen == ["sol 0", "sol 1", "sol 2"]


async def test_a_messages_own_at_direction_and_id_are_not_replaced_by_its_data(env: Env) -> None:
    # A generic source's `message.received` may carry keys of those names in its `data`:
    # they replaced the message's own, so the page showed an outbound message with a made-up
    # id and a time that was no time.
    at = 1_751_371_200_000
    result = await env.hub.accept(
        tenant_id="clinica-sol",
        source_id="crm-events",
        event_type="message.received",
        data={
            "conversation_id": MARIA,
            "id": "chatbot-42",
            "direction": "outbound",
            "at": "yesterday",
            "text": "Olá",
        },
        idempotency_key="chatbot-42",
        occurred_at=at,
    )
    page = await env.conversation()
    [message] = page["messages"]
    assert message == {
        "at": "2025-07-01T12:00:00.000Z",
        "direction": "inbound",
        "id": result.event_id,
        "conversation_id": MARIA,
        "text": "Olá",
    }
    event = await env.http.get(f"/api/v1/events/{message['id']}", headers=env.auth())
    assert event.json()["event"]["data"]["id"] == "chatbot-42"  # still in the event


# -- what a provider's answer or a lost lease must not break ----------------------------------

LONG_ID = "wamid." + "A" * 300  # a provider id longer than the 255-character columns


async def _send(env: Env) -> str:
    r = await env.send("Oi")
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


@pytest.mark.parametrize("provider_id", [LONG_ID, "wamid.with\x00nul"])
async def test_a_provider_id_the_column_cannot_hold_still_records_the_send_and_its_statuses(
    env: Env, provider_id: str
) -> None:
    """The provider accepted the message and gave an id longer than 255 characters (or with
    a NUL): the ingress stores the status's `message_ref` `fitted`, so the send must store
    its provider id the same way. Otherwise PostgreSQL refuses the whole completion (the
    delivery is rescued as lease_expired and the customer gets the message again and
    again), and on SQLite the statuses never reach the message."""
    message_id = await _send(env)
    await env.finish_send(provider_id=provider_id)
    # As the provider ingress stores it: the key bounded (providers/base.py bounded_key).
    await env.hub.accept(
        tenant_id="clinica-sol",
        source_id="wa-sol",
        event_type="message.status",
        data={"message_id": provider_id, "status": "delivered", "conversation_id": MARIA},
        idempotency_key=bounded_key(f"{provider_id}:delivered"),
        occurred_at=1_751_371_290_000,
    )
    view = await env.message(message_id)
    assert view["state"] == "delivered", view


# -- a repeated send while the original waits in the spool ------------------------------------


UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"  # nothing listens on port 1


@pytest.fixture
async def outage_hub(tmp_path: Path) -> AsyncIterator[Hub]:
    """A hub with wa-sol whose store is unreachable: what it accepts waits in its spool."""
    data = base_config(UNREACHABLE)
    data["sources"].append(WA_SOL)
    store = open_store(UNREACHABLE)
    hub = Hub(load_config_dict(data), store, spool=Spool(tmp_path / "spool", max_bytes=10**6))
    yield hub
    await hub.close()
    await store.close()


async def test_a_send_repeated_during_an_outage_gets_the_original_message(
    outage_hub: Hub,
) -> None:
    """The store is down: the first send is spooled and answered 202 with its message id. The
    client's retry with the same idempotency key (its answer was lost) must get that message
    back, as a redelivered webhook gets its original event id during an outage; instead the
    hub asks the unreachable store which message the spooled event is, and fails."""
    send = {
        "tenant_id": "clinica-sol",
        "source_id": "wa-sol",
        "to": "+5511987654321",
        "content": {"text": "Sua consulta está confirmada."},
        "idempotency_key": "reply-1",
    }
    first_id, first = await outage_hub.send_message(**send)  # type: ignore[arg-type]
    assert first.spooled and not first.duplicate and first_id is not None
    again_id, again = await outage_hub.send_message(**send)  # type: ignore[arg-type]
    assert again.duplicate and again.event_id == first.event_id
    assert again_id == first_id


async def test_a_send_repeated_past_the_keys_the_spool_remembers_gets_the_original_message(
    outage_hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outage spooled more keyed sends than the spool remembers (`REMEMBERED_KEYS`,
    100,000). The retry of one it forgot, still waiting in the spool, was queued anew: a new
    message id and event id, which the drain then dropped as the original's duplicate, so
    the message id answered never existed. It gets the original message back instead."""
    monkeypatch.setattr("estafeta.ingress.spool.REMEMBERED_KEYS", 3)

    async def send(n: int) -> tuple[str | None, InsertResult]:
        return await outage_hub.send_message(
            tenant_id="clinica-sol",
            source_id="wa-sol",
            to="+5511987654321",
            content={"text": f"Mensagem {n}"},
            idempotency_key=f"reply-{n}",
        )

    sent = [await send(n) for n in range(5)]
    again_id, again = await send(0)
    first_id, first = sent[0]
    assert (again.event_id, again.duplicate) == (first.event_id, True)
    assert again_id == first_id is not None


# -- a late failure from a lost lease ---------------------------------------------------------


async def test_a_late_failure_of_a_lost_lease_does_not_fail_a_message_sent_by_its_retry(
    env: Env,
) -> None:
    """Worker A's attempt outlives its lease (a pause, a slow provider); the lease is rescued
    and worker B sends the message again, and the provider accepts it. A's late answer, a
    permanent refusal, is not applied to the delivery (the lease is no longer A's), yet it
    marked the message `failed`; B's success then found the message no longer `queued` and
    recorded nothing: the message shows `failed`, with no provider id, while the customer
    has it and its statuses never reach it."""
    message_id = await _send(env)
    t0 = env.hub.clock.now_ms()
    [a] = [
        d
        for d in await lease_any(env.store, now_ms=t0, lease_ms=1_000, worker_id="A")
        if d.destination_id == "send:wa-sol"
    ]
    # The lease expires; a rescuer records the lost attempt and schedules the retry now.
    [claimed] = [
        d
        for d in await env.store.claim_expired(now_ms=t0 + 2_000, lease_ms=30_000, worker_id="R")
        if d.id == a.id
    ]
    lost = Outcome(OutcomeKind.RETRYABLE, 0.0, error_class="lease_expired")
    await env.store.complete(
        [
            CompletedAttempt(
                claimed,
                lost,
                Transition(DeliveryState.PENDING, 1, t0 + 2_000, "lease_expired"),
                t0 + 2_000,
                new_id("att"),
            )
        ],
        t0 + 2_000,
    )
    [b] = [
        d
        for d in await lease_any(env.store, now_ms=t0 + 3_000, worker_id="B")
        if d.destination_id == "send:wa-sol"
    ]
    # A's late answer: a permanent refusal (e.g. a 5xx that A's provider turned into 131026).
    refused = Outcome(
        OutcomeKind.PERMANENT, 10.0, status_code=400, error_class="whatsapp_cloud_131026"
    )
    applied = await env.store.complete(
        [
            CompletedAttempt(
                a,
                refused,
                Transition(
                    DeliveryState.DEAD, 1, None, "whatsapp_cloud_131026: Message undeliverable"
                ),
                t0,
                new_id("att"),
            )
        ],
        t0 + 3_500,
    )
    assert applied == 0  # the delivery is B's now: A's transition is not applied
    accepted = Outcome(OutcomeKind.SUCCESS, 10.0, status_code=200, external_id="wamid.B")
    assert (
        await env.store.complete(
            [
                CompletedAttempt(
                    b,
                    accepted,
                    Transition(DeliveryState.SUCCEEDED, 2, None, None),
                    t0 + 3_000,
                    new_id("att"),
                )
            ],
            t0 + 4_000,
        )
        == 1
    )
    view = await env.message(message_id)
    assert (view["state"], view["provider_message_id"]) == ("sent", "wamid.B"), view


async def test_a_published_message_send_event_counts_no_sent_message(env: Env) -> None:
    """Only messages sent through POST /api/v1/messages count as outbound: an event a tenant
    publishes with the type `message.send` sends nothing, yet it counted one in the
    conversation it named (and opened one if there was none)."""
    await env.inbound("Olá", "wamid.p1")
    r = await env.http.post(
        "/api/v1/events",
        headers=env.auth(),
        json={"type": "message.send", "data": {"to": f"+{MARIA}", "text": "not sent"}},
    )
    assert r.status_code == 202, r.text
    r = await env.http.get(f"/api/v1/conversations/{MARIA}", headers=env.auth())
    conversation = r.json()
    assert [m["direction"] for m in conversation["messages"]] == ["inbound"]
    assert (conversation["inbound_count"], conversation["outbound_count"]) == (1, 0)


def inbound_event(hub: Hub, number: str, wamid: str) -> NewEvent:
    """A customer's WhatsApp message to clinica-sol, as its webhook stores it."""
    return hub.new_event(
        tenant_id="clinica-sol",
        source_id="wa-sol",
        event_type="message.received",
        data={"message_id": wamid, "conversation_id": number, "from": f"+{number}"},
        idempotency_key=wamid,
    )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_an_escalation_and_a_webhook_of_another_process_that_deadlock_are_both_stored(
    env: Env, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process stores a batch that holds a message of one customer and the escalation of
    another's conversation (the group committer joins the webhook and the API call); another
    process, at the same time, a webhook with a message of each. The escalation updates its
    conversation after the batch's messages have counted theirs, out of the key order every
    batch takes conversations in: each process holds a conversation the other waits for, a
    deadlock. The process PostgreSQL chose to fail answered the webhook as if the store were
    unreachable (503, or spooled with every event after it for a while); it stores it again."""
    first, second = MARIA, "5511999990000"  # `first` comes first in key order
    await env.inbound("Olá", "wamid.a")
    await env.inbound_from(second, "wamid.b")
    other_store = open_store(database_url)
    other = Hub(env.hub.config, other_store)
    escalating, go_on = asyncio.Event(), asyncio.Event()
    escalate = env.store._escalate

    async def escalate_when_told(conn: Any, event: Any) -> None:
        escalating.set()
        await go_on.wait()
        await escalate(conn, event)

    monkeypatch.setattr(env.store, "_escalate", escalate_when_told)
    try:
        joined = asyncio.ensure_future(
            env.hub.accept_all(
                [
                    inbound_event(env.hub, second, "wamid.c"),
                    env.hub.new_event(
                        tenant_id="clinica-sol",
                        source_id="api",
                        event_type="conversation.escalated",
                        data={"conversation_id": first, "reason": "urgente"},
                        idempotency_key=None,
                        escalation=NewEscalation(
                            id=new_id("esc"), reason="urgente", priority=1, actor="test"
                        ),
                    ),
                ]
            )
        )
        await asyncio.wait_for(escalating.wait(), timeout=10)  # `second` counted, held
        webhook = asyncio.ensure_future(
            other.accept_all(
                [inbound_event(other, first, "wamid.d"), inbound_event(other, second, "wamid.e")]
            )
        )
        await until_waiting_for_locks(database_url, 1)  # `first` taken, waiting for `second`
        go_on.set()
        done = await asyncio.wait_for(
            asyncio.gather(joined, webhook, return_exceptions=True), timeout=30
        )
    finally:
        go_on.set()
        await other.close()
        await other_store.close()
    assert [type(d).__name__ for d in done] == ["list", "list"], done
    listed = await env.http.get("/api/v1/conversations", headers=env.auth())
    counts = {c["id"]: (c["status"], c["inbound_count"]) for c in listed.json()["conversations"]}
    assert counts == {first: ("escalated", 2), second: ("open", 3)}


async def test_a_number_written_as_staff_type_it_is_sent_in_the_customers_conversation(
    env: Env,
) -> None:
    # Staff paste the number as a clinic writes it, `+55 (11) 98765-4321`: it was refused
    # (`body.to` must match `^\+…`), though it is the customer whose messages arrive as
    # 5511987654321. It is that number, and the reply is in her conversation.
    await env.inbound("Quero marcar", "wamid.in")
    for written in ("+55 (11) 98765-4321", " +55 11 98765 4321 ", "+55.11.98765.4321"):
        r = await env.http.post(
            "/api/v1/messages",
            headers=env.auth(),
            json={"source": "wa-sol", "to": written, "text": "Claro!"},
        )
        assert r.status_code == 202, r.text
        view = await env.message(r.json()["id"])
        assert (view["to"], view["conversation_id"]) == (f"+{MARIA}", MARIA)
    detail = await env.conversation()
    assert [m["direction"] for m in detail["messages"]] == ["inbound"] + ["outbound"] * 3
    [listed] = (await env.http.get("/api/v1/conversations", headers=env.auth())).json()[
        "conversations"
    ]
    assert (listed["id"], listed["inbound_count"], listed["outbound_count"]) == (MARIA, 1, 3)
    # Without its country code a number is still refused: `(11) 98765-4321` is no number
    # anywhere, and no country is guessed.
    r = await env.http.post(
        "/api/v1/messages",
        headers=env.auth(),
        json={"source": "wa-sol", "to": "(11) 98765-4321", "text": "Claro!"},
    )
    assert r.status_code == 400 and r.json()["detail"].startswith("body.to: "), r.text


async def test_a_sent_messages_event_names_the_customers_conversation(env: Env) -> None:
    # A CRM routed `message.*` groups what it gets by `data.conversation_id`, as the how-to's
    # `ordering_key` does: the customer's messages and the statuses carried it, the reply
    # (`message.send`) did not, so it was in no conversation there.
    r = await env.send("Claro!")
    assert r.status_code == 202, r.text
    sent = await env.http.get(f"/api/v1/events/{r.json()['event_id']}", headers=env.auth())
    data = sent.json()["event"]["data"]
    assert (data["to"], data.get("conversation_id")) == (f"+{MARIA}", MARIA)


FIXTURES = Path(__file__).parent.parent / "fixtures"


async def _webhook(env: Env, source: str, body: bytes) -> None:
    """POST `body` to `/in/{source}` as its provider signs it (env's sources' secrets)."""
    if source == "wa-sol":
        digest = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        headers = {"x-hub-signature-256": f"sha256={digest}", "content-type": "application/json"}
        url = "/in/wa-sol"
    elif source == "tw-sol":
        fields = {k: [v] for k, v in parse_qsl(body.decode(), keep_blank_values=True)}
        signed = twilio_signature(b"tw-token", "http://hub/in/tw-sol", fields)
        headers, url = {"x-twilio-signature": signed, "content-type": FORM}, "/in/tw-sol"
    else:
        token = {"zapi-sol": "zapi-webhook-token", "sp-sol": "sp-webhook-token"}[source]
        headers, url = {"content-type": "application/json"}, f"/in/{source}?token={token}"
    answer = await env.http.post(url, content=body, headers=headers)
    assert answer.status_code == 200, answer.text


def _status_webhook(source: str, provider_id: str) -> bytes | None:
    """The provider's `delivered` for `provider_id`, naming Maria as the provider writes her
    (SendPulse posts no statuses)."""
    if source == "wa-sol":
        status = {"id": provider_id, "status": "delivered", "recipient_id": MARIA}
        value = {"metadata": {"phone_number_id": "114950281736452"}, "statuses": [status]}
        change = {"field": "messages", "value": value}
        return orjson.dumps(
            {"object": "whatsapp_business_account", "entry": [{"changes": [change]}]}
        )
    if source == "tw-sol":
        fields = {
            "MessageSid": provider_id,
            "MessageStatus": "delivered",
            "To": f"whatsapp:+{MARIA}",
        }
        return urlencode(fields).encode()
    if source == "zapi-sol":
        callback = orjson.loads((FIXTURES / "zapi/message_status.json").read_bytes())
        return orjson.dumps(callback | {"status": "RECEIVED", "ids": [provider_id]})
    return None


@pytest.mark.parametrize(
    ("source", "inbound", "provider_id"),
    [
        ("wa-sol", "whatsapp_cloud/text.json", "wamid.REPLY1"),
        ("tw-sol", "twilio/inbound_text.form", "SM" + "5" * 32),
        ("zapi-sol", "zapi/received_text.json", "3EB0REPLY1"),
        ("sp-sol", "sendpulse/incoming_message.json", "66b2e41c9f1a2b3c4d5eREPLY"),
    ],
)
async def test_a_customer_the_reply_and_its_statuses_are_one_conversation_on_every_provider(
    env: Env, source: str, inbound: str, provider_id: str
) -> None:
    # Each provider writes Maria its own way (`5511987654321`, `whatsapp:+5511987654321`,
    # a SendPulse contact with a phone), staff write `+55 (11) 98765-4321`: her message, the
    # reply and the provider's status of the reply are one conversation.
    await _webhook(env, source, (FIXTURES / inbound).read_bytes())
    r = await env.http.post(
        "/api/v1/messages",
        headers=env.auth(),
        json={"source": source, "to": "+55 (11) 98765-4321", "text": "Claro!"},
    )
    assert r.status_code == 202, r.text
    await env.finish_send(provider_id=provider_id, source=source)
    status = _status_webhook(source, provider_id)
    if status is not None:
        await _webhook(env, source, status)
    [listed] = (await env.http.get("/api/v1/conversations", headers=env.auth())).json()[
        "conversations"
    ]
    assert (listed["id"], listed["inbound_count"], listed["outbound_count"]) == (MARIA, 1, 1)
    detail = await env.conversation()
    assert [(m["direction"], m.get("state")) for m in detail["messages"]] == [
        ("inbound", None),
        ("outbound", "sent" if status is None else "delivered"),
    ]


@pytest.mark.parametrize(
    ("source", "read", "played"), [("wa-sol", "read", "played"), ("zapi-sol", "READ", "PLAYED")]
)
async def test_a_voice_note_played_after_it_was_read_is_a_step_of_its_own(
    env: Env, source: str, read: str, played: str
) -> None:
    # WhatsApp Cloud posts `played` once a voice note is listened to (contracts §1.5), Z-API
    # `PLAYED` (§3.4); routes get it as `read` with `provider_status` saying so, and the
    # timeline showed it as a second `read` step.
    env.hub.clock = FixedClock(1_751_371_200_000)  # sent before the statuses
    message_id = await env.sent_message("Ouça o áudio", "VOICE1", source=source)
    await env.status("VOICE1", "read", at=1_751_371_300_000, source=source, provider_status=read)
    await env.status("VOICE1", "read", at=1_751_371_310_000, source=source, provider_status=played)
    view = await env.message(message_id)
    assert [step["state"] for step in view["timeline"]] == [
        "queued",
        "sent",
        "read",
        "played",
    ]
    assert view["timeline"][-1]["at"] == "2025-07-01T12:01:50.000Z"
    assert view["state"] == "played"
    [listed] = (await env.conversation())["messages"]
    assert listed["state"] == "played"  # the same as GET /messages/{id}


async def test_a_status_stored_before_the_sends_answer_keeps_the_timeline_in_time_order(
    env: Env,
) -> None:
    # The provider answered the send and posted `delivered` at once; the worker recorded its
    # answer later: the timeline said sent at that later moment, after delivered.
    clock = FixedClock(1_751_371_200_000)
    env.hub.clock = clock
    r = await env.send("Oi")
    await env.status("wamid.EARLY", "delivered", at=1_751_371_200_400)
    clock.now += 900
    await env.finish_send(provider_id="wamid.EARLY")
    view = await env.message(r.json()["id"])
    assert view["timeline"] == [
        {"state": "queued", "at": "2025-07-01T12:00:00.000Z"},
        {"state": "sent", "at": "2025-07-01T12:00:00.400Z"},  # at the latest when delivered
        {"state": "delivered", "at": "2025-07-01T12:00:00.400Z"},
    ]


async def test_a_twilio_status_called_back_at_the_sends_url_is_stored_naming_the_message(
    env: Env,
) -> None:
    # A consumer could tie a WhatsApp Cloud status to the message it sent (`msg_…`), not a
    # Twilio one: Twilio's callbacks name only its SID. The send's StatusCallback carries the
    # id in its query, and Twilio signs the URL it calls with it.
    sid = "SM" + "8" * 32
    message_id = await env.sent_message("Oi", sid, source="tw-sol")
    for path, status in [
        (f"/in/tw-sol?sent_message_id={message_id}", "delivered"),
        ("/in/tw-sol", "read"),
    ]:  # a callback at the console's URL
        fields = {"MessageSid": sid, "MessageStatus": status, "To": f"whatsapp:+{MARIA}"}
        signed = twilio_signature(
            b"tw-token", f"http://hub{path}", {k: [v] for k, v in fields.items()}
        )
        answer = await env.http.post(
            path,
            content=urlencode(fields),
            headers={"x-twilio-signature": signed, "content-type": FORM},
        )
        assert answer.status_code == 200, answer.text
    e = schema.events
    async with env.store.engine.connect() as conn:
        rows = (
            (
                await conn.execute(
                    select(e.c.payload).where(e.c.type == "message.status").order_by(e.c.id)
                )
            )
            .scalars()
            .all()
        )
    delivered, read = (orjson.loads(row)["data"] for row in rows)
    assert (delivered["status"], delivered["sent_message_id"]) == ("delivered", message_id)
    assert read["status"] == "read" and "sent_message_id" not in read
    assert (await env.message(message_id))["state"] == "read"


def _send_edge(**change: Any) -> dict[str, Any]:
    """A valid send with `change` applied (`...` takes the field out)."""
    body: dict[str, Any] = {"source": "wa-sol", "to": f"+{MARIA}", "text": "Olá", **change}
    return {k: v for k, v in body.items() if v is not ...}


_IMAGE = {"kind": "image", "url": "https://x.example/y.png"}


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (_send_edge(source=...), 400, "body.source: Field required"),
        (_send_edge(source=""), 400, "body.source: "),
        (_send_edge(source=None), 400, "body.source: "),
        (_send_edge(to=...), 400, "body.to: Field required"),
        (_send_edge(to=None), 400, "body.to: "),
        (_send_edge(to=5511987654321), 400, "body.to: "),
        (_send_edge(to="+123456"), 400, "body.to: "),  # 6 digits
        (_send_edge(to="+1234567"), 202, None),  # 7
        (_send_edge(to="+123456789012345"), 202, None),  # 15
        (_send_edge(to="+1234567890123456"), 400, "body.to: "),  # 16
        (_send_edge(to="+55 (11) 98765-4321"), 202, None),
        (_send_edge(to="+55.11.98765.4321"), 202, None),
        (_send_edge(to="5511987654321"), 400, "body.to: "),  # no country is guessed
        (_send_edge(text=""), 400, "body.text: "),
        (_send_edge(text=" \t\n"), 400, "body.text: "),  # not only blanks
        (_send_edge(text="a"), 202, None),
        (_send_edge(text="a" * 4096), 202, None),
        (_send_edge(text="a" * 4097), 400, "body.text: "),
        (_send_edge(text=5), 400, "body.text: "),
        (_send_edge(text=None), 400, "body: "),  # then no content at all
        (_send_edge(text=..., template={"name": "t"}), 400, "body.template: give name"),
        (
            _send_edge(text=..., template={"name": "t", "language": "pt_BR", "x": 1}),
            400,
            "body.template.x: ",
        ),
        (_send_edge(text=..., media={**_IMAGE, "caption": "c" * 1024}), 202, None),
        (
            _send_edge(text=..., media={**_IMAGE, "caption": "c" * 1025}),
            400,
            "body.media.caption: ",
        ),
        (_send_edge(text=..., media={**_IMAGE, "caption": ""}), 202, None),  # none given
        (
            _send_edge(
                text=..., media={"kind": "audio", "url": "https://x.example/a.ogg", "caption": ""}
            ),
            202,
            None,
        ),
        (
            _send_edge(
                text=..., media={"kind": "audio", "url": "https://x.example/a.ogg", "caption": "c"}
            ),
            400,
            "body.media.caption: ",
        ),
        (_send_edge(text=..., media={**_IMAGE, "filename": "y.png"}), 400, "body.media.filename: "),
        (_send_edge(text=..., media={**_IMAGE, "url": "https:///y.png"}), 400, "body.media.url: "),
        (
            _send_edge(text=..., media={**_IMAGE, "url": "ftp://x.example/y.png"}),
            400,
            "body.media.url: ",
        ),
        (_send_edge(text=..., media={**_IMAGE, "x": 1}), 400, "body.media.x: "),
        (_send_edge(idempotency_key=""), 400, "body.idempotency_key: "),
        (_send_edge(idempotency_key="k" * 255), 202, None),
        (_send_edge(idempotency_key="k" * 256), 400, "body.idempotency_key: "),
        (_send_edge(idempotency_key=None), 202, None),
        (_send_edge(priority=-1), 400, "body.priority: "),
        (_send_edge(priority=0), 202, None),
        (_send_edge(priority=4), 202, None),
        (_send_edge(priority=5), 400, "body.priority: "),
        (_send_edge(priority=True), 400, "body.priority: "),
        (_send_edge(priority="1"), 400, "body.priority: "),
        (_send_edge(surprise=1), 400, "body.surprise: "),
    ],
)
async def test_each_field_of_a_send_is_taken_to_its_documented_edge_and_no_further(
    env: Env, body: dict[str, Any], status: int, detail: str | None
) -> None:
    """docs/http-api.md's table of `POST /api/v1/messages`, each bound from both sides:
    a refusal names the field (`body.<field>: …`) and queues nothing; a send taken has the
    documented default priority (1) unless it gave one."""
    r = await env.http.post("/api/v1/messages", headers=env.auth(), json=body)
    assert r.status_code == status, r.text
    if detail is not None:
        assert r.json()["error"] == "invalid_request"
        assert r.json()["detail"].startswith(detail), r.json()
        assert (await env.store.queue_stats(history=True)).by_state == {}
        return
    event = await env.http.get(f"/api/v1/events/{r.json()['event_id']}", headers=env.auth())
    [send] = [d for d in event.json()["deliveries"] if d["destination"] == "send:wa-sol"]
    assert send["priority"] == body.get("priority", 1)


async def test_a_send_with_an_empty_caption_has_no_caption(env: Env) -> None:
    # An empty caption is null everywhere: a received one is, but a sent one went to the
    # provider and into the `message.send` event as `""` (a route testing
    # `data.media.caption != null` took it), and an audio with `"caption": ""` was refused
    # as a caption on an audio.
    for media in (
        {**_IMAGE, "caption": ""},
        {"kind": "audio", "url": "https://x.example/a.ogg", "caption": ""},
    ):
        body = _send_edge(text=..., media=media)
        r = await env.http.post("/api/v1/messages", headers=env.auth(), json=body)
        assert r.status_code == 202, r.text
        expected = {k: v for k, v in media.items() if k != "caption"}
        assert (await env.message(r.json()["id"]))["content"] == {"media": expected}
        event = await env.http.get(f"/api/v1/events/{r.json()['event_id']}", headers=env.auth())
        assert event.json()["event"]["data"]["media"] == expected


async def test_the_openapi_document_takes_a_number_as_the_docs_let_it_be_written(
    env: Env,
) -> None:
    # `to`'s pattern in /openapi.json was the stored form's, `^\+[1-9][0-9]{6,14}$`: a
    # client that checks a body against the document refused `+55 (11) 98765-4321`, which
    # the API takes (docs/http-api.md), and so did the /docs page.
    document = (await env.http.get("/openapi.json")).json()
    pattern = document["components"]["schemas"]["SendMessage"]["properties"]["to"]["pattern"]
    for number in ("+5511987654321", "+55 (11) 98765-4321", "+55.11.98765.4321", "+1234567"):
        assert re.search(pattern, number), number
        r = await env.send("Olá", to=number)
        assert r.status_code == 202, (number, r.text)
    for number in ("5511987654321", "+123456", "+1234567890123456", "+0211987654321", "+55/11"):
        assert not re.search(pattern, number), number
        assert (await env.send("Olá", to=number)).status_code == 400, number


async def test_the_openapi_document_says_a_text_or_reason_of_blanks_is_refused(env: Env) -> None:
    # docs/http-api.md: `text` and an escalation's `reason` are "not only blanks"; the
    # document said only their lengths, so a client checking against it sent `"   "`.
    schemas = (await env.http.get("/openapi.json")).json()["components"]["schemas"]
    for field in (
        schemas["SendMessage"]["properties"]["text"],
        schemas["Escalate"]["properties"]["reason"],
    ):
        assert re.search(field["pattern"], " nurse "), field
        for blank in ("   ", "\n\t", "\u00a0"):
            assert not re.search(field["pattern"], blank), (field, blank)


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({}, 400, "body.reason: Field required"),
        ({"reason": None}, 400, "body.reason: "),
        ({"reason": ""}, 400, "body.reason: "),
        ({"reason": " \t"}, 400, "body.reason: must not be only blanks"),
        ({"reason": "r"}, 202, None),
        ({"reason": "r" * 500}, 202, None),
        ({"reason": "r" * 501}, 400, "body.reason: "),
        ({"reason": "r", "priority": -1}, 400, "body.priority: "),
        ({"reason": "r", "priority": 0}, 202, None),
        ({"reason": "r", "priority": 4}, 202, None),
        ({"reason": "r", "priority": 5}, 400, "body.priority: "),
        ({"reason": "r", "priority": None}, 400, "body.priority: "),
        ({"reason": "r", "priority": True}, 400, "body.priority: "),
        ({"reason": "r", "idempotency_key": ""}, 400, "body.idempotency_key: "),
        ({"reason": "r", "idempotency_key": "k" * 255}, 202, None),
        ({"reason": "r", "idempotency_key": "k" * 256}, 400, "body.idempotency_key: "),
        ({"reason": "r", "surprise": 1}, 400, "body.surprise: "),
    ],
)
async def test_each_field_of_an_escalation_is_taken_to_its_documented_edge_and_no_further(
    env: Env, body: dict[str, Any], status: int, detail: str | None
) -> None:
    """docs/http-api.md's body of an escalation, each bound from both sides: a refusal
    names the field and escalates nothing; one taken shows its priority (1 by default)."""
    await env.inbound("Preciso de ajuda", "wamid.edge")
    before = await tenant_rows(env.store, "clinica-sol")
    r = await env.http.post(
        f"/api/v1/conversations/{MARIA}/escalate", headers=env.auth(), json=body
    )
    assert r.status_code == status, r.text
    if detail is not None:
        assert r.json()["error"] == "invalid_request"
        assert r.json()["detail"].startswith(detail), r.json()
        assert await tenant_rows(env.store, "clinica-sol") == before
        return
    escalation = (await env.conversation())["escalation"]
    assert (escalation["reason"], escalation["priority"]) == (
        body["reason"],
        body.get("priority", 1),
    )


async def test_a_conversations_pages_are_of_100_by_default(env: Env) -> None:
    # docs/http-api.md: `?limit=` defaults to 100, for the list and a conversation's messages.
    at = 1_751_371_200_000
    await env.hub.accept_all(
        [env.message_event(f"m{n}", f"wamid.d{n}", at + n) for n in range(101)]
        + [inbound_event(env.hub, f"55219000{n:05d}", f"wamid.o{n}") for n in range(100)]
    )
    page = (await env.http.get("/api/v1/conversations", headers=env.auth())).json()
    assert (len(page["conversations"]), page["next"] is not None) == (100, True)
    conversation = await env.conversation()
    assert (len(conversation["messages"]), conversation["next"] is not None) == (100, True)
