"""Rotating secrets with no downtime (docs/operations.md, "Rotating a secret"): through the
real ingest endpoint, each kind of source configured with a new and an old secret accepts a
webhook made with either and refuses one made with a third; a destination configured with
two secrets signs each delivery so that a Standard Webhooks receiver with either verifies it."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from estafeta.api.app import create_app
from estafeta.config import load_config_dict
from estafeta.connectors.http import sign_webhook
from estafeta.connectors.registry import Connectors
from estafeta.hub import Hub
from estafeta.ingress.providers.twilio import signature as twilio_signature
from estafeta.store.sqlstore import SqlStore
from estafeta.testing.sink import Sink
from tests.conftest import (
    ROTATED_SECRET,
    SINK_SECRET,
    SOURCE_SECRET,
    UNKNOWN_SECRET,
    base_config,
    leased_delivery,
)
from tests.integration.providers_support import FIXTURES

#: What the environment holds mid-rotation: `secret = ["${NEW}", "${OLD}"]` in the file.
ENV = {
    "WA_NEW": "wa-new",
    "WA_OLD": "wa-old",
    "TW_NEW": "tw-new",
    "TW_OLD": "tw-old",
    "URL_NEW": "url-new",
    "URL_OLD": "url-old",
    "CRM_NEW": ROTATED_SECRET,
    "CRM_OLD": SOURCE_SECRET,
}


def rotated_sources() -> list[dict[str, Any]]:
    def entry(source_id: str, kind: str, **keys: Any) -> dict[str, Any]:
        return {"id": source_id, "tenant": "clinica-sol", "kind": kind, **keys}

    return [
        entry("wa-rot", "whatsapp_cloud", app_secret=["${WA_NEW}", "${WA_OLD}"]),
        entry("tw-rot", "twilio", auth_token=["${TW_NEW}", "${TW_OLD}"]),
        entry("zapi-rot", "zapi", token=["${URL_NEW}", "${URL_OLD}"]),
        entry("sp-rot", "sendpulse", token=["${URL_NEW}", "${URL_OLD}"]),
        entry("crm-rot", "generic", secret=["${CRM_NEW}", "${CRM_OLD}"], event_type="crm.webhook"),
        entry("keyed-rot", "generic", api_key=["key-new", "key-old"]),
    ]


@pytest.fixture
async def rotating(store: SqlStore, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    data = base_config(database_url)
    data["sources"].extend(rotated_sources())
    hub = Hub(load_config_dict(data, ENV), store)
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
        yield client
    await hub.close()


def whatsapp(secret: str) -> tuple[str, bytes, dict[str, str]]:
    body = (FIXTURES / "whatsapp_cloud/text.json").read_bytes()
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {"content-type": "application/json", "x-hub-signature-256": f"sha256={digest}"}
    return "/in/wa-rot", body, headers


def twilio(token: str) -> tuple[str, bytes, dict[str, str]]:
    body = (FIXTURES / "twilio/inbound_text.form").read_bytes()
    params = {name: [value] for name, value in parse_qsl(body.decode())}
    given = twilio_signature(token.encode(), "http://hub/in/tw-rot", params)
    form = "application/x-www-form-urlencoded"
    return "/in/tw-rot", body, {"content-type": form, "x-twilio-signature": given}


def zapi(token: str) -> tuple[str, bytes, dict[str, str]]:
    body = (FIXTURES / "zapi/received_text.json").read_bytes()
    return f"/in/zapi-rot?token={token}", body, {"content-type": "application/json"}


def sendpulse(token: str) -> tuple[str, bytes, dict[str, str]]:
    body = (FIXTURES / "sendpulse/incoming_message.json").read_bytes()
    return f"/in/sp-rot?token={token}", body, {"content-type": "application/json"}


def generic(secret: str) -> tuple[str, bytes, dict[str, str]]:
    body = b'{"type": "lead.created", "data": {"n": 1}}'
    stamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": "msg_rot_1",
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign_webhook(secret, "msg_rot_1", stamp, body),
    }
    return "/in/crm-rot", body, headers


def keyed(key: str) -> tuple[str, bytes, dict[str, str]]:
    headers = {
        "content-type": "application/json",
        "authorization": f"Bearer {key}",
        "idempotency-key": "lead-2",
    }
    return "/in/keyed-rot", b'{"type": "lead.created", "data": {"n": 2}}', headers


# (request maker, the new secret, the old one, one neither of them)
KINDS = [
    pytest.param(whatsapp, "wa-new", "wa-old", "wa-third", id="whatsapp_cloud"),
    pytest.param(twilio, "tw-new", "tw-old", "tw-third", id="twilio"),
    pytest.param(zapi, "url-new", "url-old", "url-third", id="zapi"),
    pytest.param(sendpulse, "url-new", "url-old", "url-third", id="sendpulse"),
    pytest.param(generic, ROTATED_SECRET, SOURCE_SECRET, UNKNOWN_SECRET, id="generic-secret"),
    pytest.param(keyed, "key-new", "key-old", "key-third", id="generic-api_key"),
]


@pytest.mark.parametrize(("request_with", "new", "old", "third"), KINDS)
async def test_old_and_new_secrets_are_accepted_and_a_third_refused(
    rotating: httpx.AsyncClient, request_with: Any, new: str, old: str, third: str
) -> None:
    path, body, headers = request_with(third)
    refused = await rotating.post(path, content=body, headers=headers)
    assert refused.status_code == 401, refused.text
    accepted = []
    for secret in (old, new):  # the same webhook, signed or sent with each
        path, body, headers = request_with(secret)
        answer = await rotating.post(path, content=body, headers=headers)
        assert answer.status_code in (200, 202), answer.text
        # Twilio is answered TwiML, with the event's id in a header; the others, JSON.
        twiml = answer.headers.get("x-estafeta-event-id")
        accepted.append(twiml or answer.json()["id"])
    assert accepted[0] == accepted[1]  # the second is the first event, deduplicated


async def test_a_destination_with_two_secrets_is_verified_by_a_receiver_with_either(
    database_url: str,
) -> None:
    """Sinks verify with the `standardwebhooks` library: one holds the destination's new
    secret, one its old; a third, with neither, finds no signature of its own."""
    receivers = {"new": Sink(secret=ROTATED_SECRET), "old": Sink(secret=SINK_SECRET)}
    receivers["third"] = Sink(secret=UNKNOWN_SECRET)
    for receiver in receivers.values():
        await receiver.start()
    try:
        data = base_config(database_url)
        data["destinations"] = [
            {
                "id": f"crm-{name}",
                "tenant": "clinica-sol",
                "url": f"{receiver.url}/hooks/crm",
                "secret": ["${CRM_NEW}", SINK_SECRET],
            }
            for name, receiver in receivers.items()
        ]
        data["routes"] = []
        connectors = Connectors(load_config_dict(data, ENV))
        await connectors.start()
        try:
            for name in receivers:
                connector = connectors.get(f"crm-{name}")
                assert connector is not None
                outcome = await connector.deliver(leased_delivery(b'{"n": 1}', event_id="evt_1"))
                assert outcome.succeeded == (name != "third")  # the third sink answers 401
        finally:
            await connectors.close()
    finally:
        for receiver in receivers.values():
            await receiver.stop()
    for name in ("new", "old"):
        assert receivers[name].bad_signatures == []
        [received] = receivers[name].received
        assert len(received.headers["webhook-signature"].split(" ")) == 2
    [bad] = receivers["third"].bad_signatures
    assert bad.reason == "No matching signature found"
