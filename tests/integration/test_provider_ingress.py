"""WhatsApp providers' webhooks through the real ingest endpoint, with the fixtures' exact
bytes and the published signature vectors: verified, normalized, deduplicated, stored."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode
from xml.etree import ElementTree

import httpx
import orjson
import pytest
from starlette.types import Receive, Scope, Send
from structlog.testing import capture_logs

from estafeta.api.app import create_app
from estafeta.config import load_config_dict
from estafeta.hub import Hub
from estafeta.ingress.providers.twilio import signature as twilio_signature
from estafeta.observability.monitor import AlertMonitor
from estafeta.store.records import NewEvent
from estafeta.store.sqlstore import SqlStore
from tests.clocks import ManualClock
from tests.conftest import base_config
from tests.integration.providers_support import (
    ADMIN,
    FIXTURES,
    PUBLIC_URL,
    SENDPULSE_TOKEN,
    TWILIO_VECTOR,
    WA_VECTOR,
    ZAPI_TOKEN,
    provider_sources,
)


def wa_post(name: str, secret: str = WA_VECTOR["app_secret"]) -> tuple[bytes, dict[str, str]]:
    body = (FIXTURES / "whatsapp_cloud" / name).read_bytes()
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return body, {"content-type": "application/json", "x-hub-signature-256": f"sha256={digest}"}


async def event_of(http: httpx.AsyncClient, event_id: str) -> dict[str, Any]:
    found: dict[str, Any] = (await http.get(f"/api/v1/events/{event_id}", headers=ADMIN)).json()
    return found


async def test_whatsapp_handshake_echoes_the_challenge(http: httpx.AsyncClient) -> None:
    query = (FIXTURES / "whatsapp_cloud/verify_handshake.txt").read_text()
    r = await http.get(f"/in/wa-sol?{query}")
    assert (r.status_code, r.text) == (200, "1158201444")
    assert r.headers["content-type"].startswith("text/plain")
    assert r.headers["x-content-type-options"] == "nosniff"  # an echo is never sniffed as HTML
    wrong = query.replace("estafeta-verify-2f7c1e9a", "guess")
    r = await http.get(f"/in/wa-sol?{wrong}")
    assert (r.status_code, r.json()["error"]) == (403, "invalid_verify_token")


Asking = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


async def assert_refusals_end(
    store: SqlStore, database_url: str, *, refused: Asking, answered: Asking
) -> None:
    """`refused` three times over five minutes fires webhooks_refused; `answered` once
    resolves it."""
    data = base_config(database_url)
    data["sources"].extend(provider_sources())
    clock = ManualClock()
    hub = Hub(load_config_dict(data), store, clock)
    monitor = AlertMonitor(
        store, threshold=1000, refusals=hub.refusals, refused_after_s=300, clock=clock
    )
    try:
        transport = httpx.ASGITransport(app=create_app(hub))
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            for _ in range(3):
                assert (await refused(http)).status_code in (401, 403)
            clock.now += 300_000
            await monitor.check()
            assert monitor.firing == {"webhooks_refused"}
            assert (await answered(http)).status_code == 200
            await monitor.check()
            assert monitor.firing == set()
    finally:
        await hub.close()


async def test_a_right_handshake_ends_the_alert_on_wrong_ones(
    store: SqlStore, database_url: str
) -> None:
    # Setting up Meta's webhook with a mistyped verify token: refused, again and again, and
    # webhooks_refused fires. Once the token is right Meta sends events only when there are
    # some: the handshake itself says the source is reached and answered.
    query = (FIXTURES / "whatsapp_cloud/verify_handshake.txt").read_text()
    wrong = query.replace("estafeta-verify-2f7c1e9a", "estafeta-verify-typo")
    await assert_refusals_end(
        store,
        database_url,
        refused=lambda http: http.get(f"/in/wa-sol?{wrong}"),
        answered=lambda http: http.get(f"/in/wa-sol?{query}"),
    )


async def test_a_signed_webhook_without_messages_ends_the_alert_on_refused_ones(
    store: SqlStore, database_url: str
) -> None:
    # The app secret was wrong, then corrected: Meta's next webhook may carry no message (an
    # account update, a template's review), yet its signature shows the source is fixed.
    update = orjson.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [{"id": "WABA_ID", "changes": [{"field": "account_update", "value": {}}]}],
        }
    )
    signed = hmac.new(WA_VECTOR["app_secret"].encode(), update, hashlib.sha256).hexdigest()

    def post(signature: str) -> Asking:
        headers = {"content-type": "application/json", "x-hub-signature-256": signature}
        return lambda http: http.post("/in/wa-sol", content=update, headers=headers)

    await assert_refusals_end(
        store,
        database_url,
        refused=post("sha256=" + "0" * 64),
        answered=post(f"sha256={signed}"),
    )


async def test_a_wrong_method_is_told_the_methods_the_source_answers(
    http: httpx.AsyncClient,
) -> None:
    """RFC 9110 §15.5.6: a 405's `Allow` lists what the resource supports; a Cloud source's
    URL answers Meta's GET handshake too, a Twilio source's only POST."""
    r = await http.put("/in/wa-sol", content=b"{}")
    assert (r.status_code, r.headers["allow"]) == (405, "GET, POST")
    assert r.json()["error"] == "method_not_allowed"
    r = await http.delete("/in/twilio-sol")
    assert (r.status_code, r.headers["allow"]) == (405, "POST")
    # GET is a handshake only a Cloud source answers: elsewhere a 405 too, not a 200.
    for path in ("/in/twilio-sol", "/in/crm-events"):
        r = await http.get(path)
        assert (r.status_code, r.headers["allow"]) == (405, "POST"), path
        assert r.json()["error"] == "method_not_allowed"


async def test_a_server_that_gives_no_raw_path_is_served(
    store: SqlStore, database_url: str
) -> None:
    """ASGI lets `raw_path` be None; ingest read `scope.get("raw_path", …).decode()` and
    answered every webhook 500 under such a server (uvicorn always gives it)."""
    data = base_config(database_url)
    data["sources"].extend(provider_sources())
    hub = Hub(load_config_dict(data), store)
    app = create_app(hub)

    async def no_raw_path(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, "raw_path": None}, receive, send)

    try:
        transport = httpx.ASGITransport(app=no_raw_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            r = await http.post(
                f"/in/zapi-sol?token={ZAPI_TOKEN}",
                content=(FIXTURES / "zapi/received_text.json").read_bytes(),
                headers={"content-type": "application/json"},
            )
    finally:
        await hub.close()
    assert r.status_code == 200, r.text


async def test_a_signed_whatsapp_message_is_stored_normalized(http: httpx.AsyncClient) -> None:
    body, headers = wa_post("text.json")
    assert headers["x-hub-signature-256"] == WA_VECTOR["expected_header"]  # the vector
    r = await http.post("/in/wa-sol", content=body, headers=headers)
    assert r.status_code == 200, r.text
    stored = await event_of(http, r.json()["id"])
    data = stored["event"]["data"]
    assert stored["type"] == "message.received"
    assert (data["channel"], data["provider"], data["kind"]) == (
        "whatsapp",
        "whatsapp_cloud",
        "text",
    )
    assert data["from"] == "+5511987654321" and data["message_id"].startswith("wamid.")
    assert data["contact_name"] == "Maria Silva"
    assert stored["idempotency_key"] == data["message_id"]
    assert [d["destination"] for d in stored["deliveries"]] == ["crm"]  # route message.*

    again = await http.post("/in/wa-sol", content=body, headers=headers)  # Meta redelivers
    assert (again.status_code, again.json()) == (200, {"id": r.json()["id"], "duplicate": True})


async def test_oversized_provider_ids_are_stored_not_refused_with_500(
    http: httpx.AsyncClient,
) -> None:
    """A sender id and a message id longer than their columns (64 and 255 characters) are
    kept whole in the event and keyed by a digest, on both engines, and a redelivery of the
    same webhook is still recognised."""
    doc = orjson.loads((FIXTURES / "whatsapp_cloud/text.json").read_bytes())
    message = doc["entry"][0]["changes"][0]["value"]["messages"][0]
    message["from"], message["id"] = "group-" + "9" * 100, "wamid." + "A" * 300
    body = orjson.dumps(doc)
    digest = hmac.new(WA_VECTOR["app_secret"].encode(), body, hashlib.sha256).hexdigest()
    headers = {"content-type": "application/json", "x-hub-signature-256": f"sha256={digest}"}
    r = await http.post("/in/wa-sol", content=body, headers=headers)
    assert r.status_code == 200, r.text
    data = (await event_of(http, r.json()["id"]))["event"]["data"]
    assert data["message_id"] == message["id"]
    assert data["conversation_id"] == message["from"]
    listed = (await http.get("/api/v1/conversations", headers=ADMIN)).json()["conversations"]
    assert [len(c["id"]) for c in listed] == [64]  # the digest, fitted to its column
    again = await http.post("/in/wa-sol", content=body, headers=headers)
    assert (again.status_code, again.json()) == (200, {"id": r.json()["id"], "duplicate": True})


async def test_a_nul_in_provider_ids_and_names_is_stored_not_refused_with_500(
    http: httpx.AsyncClient,
) -> None:
    """PostgreSQL text cannot hold U+0000: ids and names carrying one are kept with U+FFFD
    (on both engines, so a redelivery is still recognised), and the event's data as sent."""
    doc = orjson.loads((FIXTURES / "whatsapp_cloud/text.json").read_bytes())
    value = doc["entry"][0]["changes"][0]["value"]
    value["messages"][0]["id"] = "wamid.nul\x00id"
    value["contacts"][0]["profile"]["name"] = "Ma\x00ria"
    body = orjson.dumps(doc)
    digest = hmac.new(WA_VECTOR["app_secret"].encode(), body, hashlib.sha256).hexdigest()
    headers = {"content-type": "application/json", "x-hub-signature-256": f"sha256={digest}"}
    r = await http.post("/in/wa-sol", content=body, headers=headers)
    assert r.status_code == 200, r.text
    stored = await event_of(http, r.json()["id"])
    assert stored["idempotency_key"] == "wamid.nul\ufffdid"
    assert stored["event"]["data"]["contact_name"] == "Ma\x00ria"
    [conversation] = (await http.get("/api/v1/conversations", headers=ADMIN)).json()[
        "conversations"
    ]
    assert conversation["contact_name"] == "Ma\ufffdria"
    again = await http.post("/in/wa-sol", content=body, headers=headers)
    assert (again.status_code, again.json()) == (200, {"id": r.json()["id"], "duplicate": True})


async def test_a_lone_surrogate_in_a_webhook_is_stored_as_u_fffd_not_refused(
    http: httpx.AsyncClient,
) -> None:
    """Text cut in the middle of an emoji by a sender that counts UTF-16 units is JSON with
    a lone surrogate escape (Node's JSON.stringify writes `\\ud83d` so), which orjson
    refuses: the webhook was `400 invalid_json` and its message lost. It is taken, the lone
    half as U+FFFD (as no store can hold it), on both engines, and a redelivery recognised."""
    zapi = orjson.loads((FIXTURES / "zapi/received_text.json").read_bytes())
    zapi["text"]["message"] = "Oi HIGH"
    zapi["senderName"] = zapi["chatName"] = "Maria HIGHLOWLOW"
    body = orjson.dumps(zapi).replace(b"HIGH", b"\\ud83d").replace(b"LOW", b"\\ude00")
    assert b'"Oi \\ud83d"' in body
    url, json_type = f"/in/zapi-sol?token={ZAPI_TOKEN}", {"content-type": "application/json"}
    r = await http.post(url, content=body, headers=json_type)
    assert r.status_code == 200, r.text
    data = (await event_of(http, r.json()["id"]))["event"]["data"]
    assert (data["text"], data["contact_name"]) == ("Oi \ufffd", "Maria \U0001f600\ufffd")
    again = await http.post(url, content=body, headers=json_type)
    assert (again.status_code, again.json()) == (200, {"id": r.json()["id"], "duplicate": True})

    doc = orjson.loads((FIXTURES / "whatsapp_cloud/text.json").read_bytes())
    value = doc["entry"][0]["changes"][0]["value"]
    value["contacts"][0]["profile"]["name"] = "Jo\u00e3o PLACEHOLDER"
    body = orjson.dumps(doc).replace(b"PLACEHOLDER", b"\\udc00")
    digest = hmac.new(WA_VECTOR["app_secret"].encode(), body, hashlib.sha256).hexdigest()
    headers = {"content-type": "application/json", "x-hub-signature-256": f"sha256={digest}"}
    r = await http.post("/in/wa-sol", content=body, headers=headers)
    assert r.status_code == 200, r.text
    data = (await event_of(http, r.json()["id"]))["event"]["data"]
    assert data["contact_name"] == "Jo\u00e3o \ufffd"


async def test_one_whatsapp_webhook_with_two_messages_is_two_events(
    http: httpx.AsyncClient,
) -> None:
    body, headers = wa_post("batch_two_messages.json")
    r = await http.post("/in/wa-sol", content=body, headers=headers)
    assert r.status_code == 200
    events = r.json()["events"]
    assert len(events) == 2
    names = {(await event_of(http, e["id"]))["event"]["data"]["contact_name"] for e in events}
    assert names == {"Maria Silva", "João Pereira"}


@contextlib.asynccontextmanager
async def watched_http(
    store: SqlStore, database_url: str, before_insert: Callable[[Sequence[NewEvent]], None]
) -> AsyncIterator[httpx.AsyncClient]:
    """The hub's app over `store`, every provider configured, `before_insert` shown each
    batch of events the store is asked to insert (raising there fails the insert)."""
    data = base_config(database_url)
    data["sources"].extend(provider_sources())
    insert_events = store.insert_events

    async def watched(batch: Sequence[NewEvent], **options: Any) -> Any:
        before_insert(batch)
        return await insert_events(batch, **options)

    store.insert_events = watched  # type: ignore[method-assign]
    hub = Hub(load_config_dict(data), store)
    transport = httpx.ASGITransport(app=create_app(hub))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            yield http
    finally:
        await hub.close()


async def test_the_messages_of_one_webhook_are_committed_together(
    store: SqlStore, database_url: str
) -> None:
    batches: list[list[str]] = []
    async with watched_http(
        store, database_url, lambda b: batches.append([e.id for e in b])
    ) as http:
        body, headers = wa_post("batch_two_messages.json")
        r = await http.post("/in/wa-sol", content=body, headers=headers)
    assert r.status_code == 200
    ids = [e["id"] for e in r.json()["events"]]
    assert batches == [ids]  # one commit, the events in the webhook's order
    assert ids == sorted(ids)


async def test_a_webhook_whose_events_cannot_all_be_stored_stores_none(
    store: SqlStore, database_url: str
) -> None:
    """A webhook is answered for all its events or for none: if the store refuses one of
    them, the other is not kept either, so the provider's retry stores each exactly once
    (a keyless event stored alone would be stored again by the retry)."""
    refused = "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNBM0M4RjZFMUI5RDJBNzA0QzdGAA=="
    failing = True

    def refuse(batch: Sequence[NewEvent]) -> None:
        if failing and any(e.idempotency_key == refused for e in batch):
            raise RuntimeError("the store refused one event")

    async with watched_http(store, database_url, refuse) as http:
        body, headers = wa_post("batch_two_messages.json")
        first = await http.post("/in/wa-sol", content=body, headers=headers)
        failing = False
        retry = await http.post("/in/wa-sol", content=body, headers=headers)
    assert first.status_code == 500
    assert retry.status_code == 200
    assert [e["duplicate"] for e in retry.json()["events"]] == [False, False]


async def test_whatsapp_statuses_become_message_status(http: httpx.AsyncClient) -> None:
    seen = []
    for name in (
        "status_sent.json",
        "status_delivered.json",
        "status_read.json",
        "status_failed.json",
    ):
        body, headers = wa_post(name)
        r = await http.post("/in/wa-sol", content=body, headers=headers)
        assert r.status_code == 200, name
        data = (await event_of(http, r.json()["id"]))["event"]["data"]
        seen.append(data["status"])
        if data["status"] == "failed":
            assert data["error"]["code"] == 131047
    assert seen == ["sent", "delivered", "read", "failed"]


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({"content-type": "application/json"}, "missing_signature"),
        (
            {"content-type": "application/json", "x-hub-signature-256": "sha256=00"},
            "invalid_signature",
        ),
    ],
)
async def test_a_whatsapp_webhook_without_a_valid_signature_stores_nothing(
    http: httpx.AsyncClient, store: SqlStore, headers: dict[str, str], error: str
) -> None:
    body = (FIXTURES / "whatsapp_cloud/text.json").read_bytes()
    r = await http.post("/in/wa-sol", content=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (401, error)
    tampered, good = wa_post("text.json")
    r = await http.post("/in/wa-sol", content=tampered.replace(b"Maria", b"Mario"), headers=good)
    assert r.status_code == 401
    assert (await store.queue_stats(history=True)).by_state == {}


# The number of the fixtures' webhooks (their `metadata.phone_number_id`).
FIXTURE_NUMBER = "114950281736452"


@contextlib.asynccontextmanager
async def two_tenants_of_one_app(
    store: SqlStore, database_url: str, outra_app_secret: str
) -> AsyncIterator[httpx.AsyncClient]:
    """wa-sol (clinica-sol, another number) and wa-outra (outra, the fixtures' number, its
    app secret `outra_app_secret`): a BSP's Meta app serving two businesses posts every
    number's webhooks to the one URL it has, here wa-sol's."""
    data = base_config(database_url)
    data["sources"].extend(provider_sources())
    wa_sol = next(s for s in data["sources"] if s["id"] == "wa-sol")
    wa_sol.update(access_token="sol-token", phone_number_id="114950281736999")
    data["sources"].append(
        {
            "id": "wa-outra",
            "tenant": "outra",
            "kind": "whatsapp_cloud",
            "app_secret": outra_app_secret,
            "access_token": "outra-token",
            "phone_number_id": FIXTURE_NUMBER,
        }
    )
    async with serving(store, data) as http:
        yield http


@contextlib.asynccontextmanager
async def serving(store: SqlStore, data: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    """The hub of configuration `data`, its tenants and sources synced to `store`."""
    config = load_config_dict(data)
    await store.sync_config(config, 1)
    hub = Hub(config, store)
    try:
        transport = httpx.ASGITransport(app=create_app(hub))
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            yield http
    finally:
        await hub.close()


async def test_a_message_to_another_tenants_number_of_the_same_app_is_that_tenants(
    store: SqlStore, database_url: str
) -> None:
    """The app's one URL is wa-sol's, so outra's patients' messages and statuses arrive
    there: they were stored as clinica-sol's (its routes sent them to its CRM, its key read
    them), and outra never had them."""
    async with two_tenants_of_one_app(store, database_url, WA_VECTOR["app_secret"]) as http:
        for name in ("text.json", "status_delivered.json"):
            body, headers = wa_post(name)
            r = await http.post("/in/wa-sol", content=body, headers=headers)
            assert r.status_code == 200, r.text
            stored = await event_of(http, r.json()["id"])
            assert (stored["event"]["tenant"], stored["event"]["source"]) == ("outra", "wa-outra")
            assert [d["destination"] for d in stored["deliveries"]] == ["outra-sink"]
            # Meta redelivers: the same event, whichever URL it comes to.
            again = await http.post("/in/wa-sol", content=body, headers=headers)
            assert again.json() == {"id": r.json()["id"], "duplicate": True}
        r = await http.get("/api/v1/conversations", params={"tenant": "clinica-sol"}, headers=ADMIN)
        assert r.json()["conversations"] == []
        r = await http.get("/api/v1/conversations", params={"tenant": "outra"}, headers=ADMIN)
        assert [c["id"] for c in r.json()["conversations"]] == ["5511987654321"]
        # One webhook with a message to each number: each tenant gets its own.
        doc = orjson.loads((FIXTURES / "whatsapp_cloud/text.json").read_bytes())
        mine = orjson.loads(orjson.dumps(doc["entry"][0]))
        value = mine["changes"][0]["value"]
        value["metadata"]["phone_number_id"] = "114950281736999"
        value["messages"][0]["id"] = "wamid.to-sol"
        doc["entry"][0]["changes"][0]["value"]["messages"][0]["id"] = "wamid.to-outra"
        doc["entry"].append(mine)
        body = orjson.dumps(doc)
        digest = hmac.new(WA_VECTOR["app_secret"].encode(), body, hashlib.sha256).hexdigest()
        r = await http.post(
            "/in/wa-sol",
            content=body,
            headers={"content-type": "application/json", "x-hub-signature-256": f"sha256={digest}"},
        )
        owners = [(await event_of(http, e["id"]))["event"] for e in r.json()["events"]]
        assert [(e["tenant"], e["source"], e["data"]["message_id"]) for e in owners] == [
            ("outra", "wa-outra", "wamid.to-outra"),
            ("clinica-sol", "wa-sol", "wamid.to-sol"),
        ]


async def test_a_webhook_naming_another_tenants_number_of_another_app_is_not_stored(
    store: SqlStore, database_url: str
) -> None:
    """Signed with clinica-sol's app secret, a webhook naming outra's number (of outra's
    own app) is no proof for outra: a business that knows its app secret could write into
    another's conversations. Stored as clinica-sol's, it gave clinica-sol outra's number's
    traffic. Neither: it is left out."""
    async with two_tenants_of_one_app(store, database_url, "outra-own-app-secret") as http:
        body, headers = wa_post("text.json")
        with capture_logs() as logs:
            r = await http.post("/in/wa-sol", content=body, headers=headers)
        assert (r.status_code, r.json()) == (200, {"events": []})
        assert (await store.queue_stats(history=True)).by_state == {}
        [line] = [x for x in logs if x["event"] == "webhook_of_another_tenants_number"]
        assert (line["source"], line["phone_number_id"], line["sources"], line["count"]) == (
            "wa-sol",
            FIXTURE_NUMBER,
            ["wa-outra"],
            1,
        )
        # Its own app's webhook, to its own URL, is outra's as ever.
        body, headers = wa_post("text.json", secret="outra-own-app-secret")
        r = await http.post("/in/wa-outra", content=body, headers=headers)
        assert r.status_code == 200, r.text
        stored = await event_of(http, r.json()["id"])
        assert (stored["event"]["tenant"], stored["event"]["source"]) == ("outra", "wa-outra")


# The number of the Twilio fixtures: an inbound message's `To`, a status callback's `From`.
TWILIO_FIXTURE_NUMBER = "whatsapp:+551140028922"


SOL_ACCOUNT_SID = "AC8f3e2d1c0b9a87654321fedcba098765"


@contextlib.asynccontextmanager
async def two_tenants_of_one_twilio_account(
    store: SqlStore, database_url: str, outra_auth_token: str
) -> AsyncIterator[httpx.AsyncClient]:
    """twilio-sol (clinica-sol, another number) and tw-outra (outra, the fixtures' number,
    its auth token `outra_auth_token`, no public_url): a Messaging Service's one webhook URL,
    or one account's numbers all pointed at one URL, here clinica-sol's sources'."""
    data = base_config(database_url)
    data["sources"].extend(provider_sources())
    twilio_sol = next(s for s in data["sources"] if s["id"] == "twilio-sol")
    twilio_sol.update(account_sid=SOL_ACCOUNT_SID, **{"from": "whatsapp:+551140029999"})
    same_account = outra_auth_token == TWILIO_VECTOR["auth_token"]
    data["sources"].append(
        {
            "id": "tw-outra",
            "tenant": "outra",
            "kind": "twilio",
            "account_sid": SOL_ACCOUNT_SID if same_account else "AC" + "0" * 32,
            "auth_token": outra_auth_token,
            "from": TWILIO_FIXTURE_NUMBER.removeprefix("whatsapp:"),
        }
    )
    async with serving(store, data) as http:
        yield http


def twilio_post(name: str, url: str, **fields: str) -> tuple[bytes, dict[str, str]]:
    """A Twilio fixture's form, `fields` changed, signed over `url` with the account's token."""
    params = dict(parse_qsl((FIXTURES / "twilio" / name).read_bytes().decode()))
    params.update(fields)
    body = urlencode(params).encode()
    token = TWILIO_VECTOR["auth_token"].encode()
    signed = twilio_signature(token, url, {k: [v] for k, v in params.items()})
    return body, {"content-type": "application/x-www-form-urlencoded", "x-twilio-signature": signed}


async def test_a_twilio_message_to_another_tenants_number_of_the_same_account_is_that_tenants(
    store: SqlStore, database_url: str
) -> None:
    """Twilio posts to one URL per Messaging Service (or per number, all pointed at one),
    here clinica-sol's: outra's patients' messages and statuses were stored as
    clinica-sol's. Signed with the account's token over the URL Twilio called, the
    receiving source's, they are outra's, behind a proxy too (the receiving source's
    public_url is that URL, whatever outra's)."""
    token = TWILIO_VECTOR["auth_token"]
    async with two_tenants_of_one_twilio_account(store, database_url, token) as http:
        for name, path, url in (
            ("inbound_text.form", "/in/twilio-sol", "http://hub/in/twilio-sol"),
            ("status_delivered.form", "/in/twilio-sol", "http://hub/in/twilio-sol"),
            ("inbound_media.form", "/in/twilio-proxied", f"{PUBLIC_URL}/in/twilio-proxied"),
        ):
            body, headers = twilio_post(name, url)
            r = await http.post(path, content=body, headers=headers)
            assert r.status_code == 200, r.text
            stored = await event_of(http, r.headers["x-estafeta-event-id"])
            owner = (stored["event"]["tenant"], stored["event"]["source"])
            assert owner == ("outra", "tw-outra"), name
            assert [d["destination"] for d in stored["deliveries"]] == ["outra-sink"]
        r = await http.get("/api/v1/conversations", params={"tenant": "clinica-sol"}, headers=ADMIN)
        assert r.json()["conversations"] == []
        # A message to clinica-sol's own number (or to one no source has) is its own.
        for number in ("whatsapp:+551140029999", "whatsapp:+551140020000"):
            body, headers = twilio_post(
                "inbound_text.form", "http://hub/in/twilio-sol", To=number, MessageSid=number
            )
            r = await http.post("/in/twilio-sol", content=body, headers=headers)
            stored = await event_of(http, r.headers["x-estafeta-event-id"])
            assert (stored["event"]["tenant"], stored["event"]["source"]) == (
                "clinica-sol",
                "twilio-sol",
            )


async def test_a_twilio_message_to_another_tenants_number_of_another_account_is_not_stored(
    store: SqlStore, database_url: str
) -> None:
    """Signed with clinica-sol's account's token, a message to outra's number (of outra's
    own account) is no proof for outra; stored as clinica-sol's, it gave clinica-sol outra's
    number's traffic. Neither: it is left out, and logged."""
    async with two_tenants_of_one_twilio_account(store, database_url, "outra-own-token") as http:
        body, headers = twilio_post("inbound_text.form", "http://hub/in/twilio-sol")
        with capture_logs() as logs:
            r = await http.post("/in/twilio-sol", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert "x-estafeta-event-id" not in r.headers
        assert (await store.queue_stats(history=True)).by_state == {}
        [line] = [x for x in logs if x["event"] == "webhook_of_another_tenants_number"]
        assert (line["source"], line["number"], line["sources"], line["count"]) == (
            "twilio-sol",
            "+551140028922",
            ["tw-outra"],
            1,
        )


async def test_twilio_signed_over_the_url_as_received_and_behind_a_proxy(
    http: httpx.AsyncClient,
) -> None:
    body = (FIXTURES / "twilio/inbound_text.form").read_bytes()
    params = dict(parse_qsl(body.decode()))
    multi = {name: [value] for name, value in params.items()}
    token = TWILIO_VECTOR["auth_token"].encode()
    form = {"content-type": "application/x-www-form-urlencoded"}
    direct = twilio_signature(token, "http://hub/in/twilio-sol", multi)
    r = await http.post(
        "/in/twilio-sol", content=body, headers={**form, "x-twilio-signature": direct}
    )
    assert r.status_code == 200, r.text
    data = (await event_of(http, r.headers["x-estafeta-event-id"]))["event"]["data"]
    assert (data["provider"], data["from"], data["text"]) == (
        "twilio",
        "+5511987654321",
        params["Body"],
    )

    proxied = twilio_signature(token, f"{PUBLIC_URL}/in/twilio-proxied?x=1", multi)
    r = await http.post(
        "/in/twilio-proxied?x=1", content=body, headers={**form, "x-twilio-signature": proxied}
    )
    assert r.status_code == 200, r.text
    r = await http.post(
        "/in/twilio-proxied?x=1", content=body, headers={**form, "x-twilio-signature": direct}
    )
    assert (r.status_code, r.json()["error"]) == (401, "invalid_signature")


async def test_twilio_behind_a_proxy_is_verified_against_the_servers_public_url(
    store: SqlStore, database_url: str
) -> None:
    """One `server.public_url` serves every Twilio source that has none of its own."""
    data = base_config(database_url)
    data["server"] = {"public_url": PUBLIC_URL}
    data["sources"].extend(provider_sources())
    hub = Hub(load_config_dict(data), store)
    body = (FIXTURES / "twilio/inbound_text.form").read_bytes()
    multi = {name: [value] for name, value in parse_qsl(body.decode())}
    token = TWILIO_VECTOR["auth_token"].encode()
    form = {"content-type": "application/x-www-form-urlencoded"}
    transport = httpx.ASGITransport(app=create_app(hub))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            proxied = twilio_signature(token, f"{PUBLIC_URL}/in/twilio-sol", multi)
            r = await http.post(
                "/in/twilio-sol", content=body, headers={**form, "x-twilio-signature": proxied}
            )
            assert r.status_code == 200, r.text
            direct = twilio_signature(token, "http://hub/in/twilio-sol", multi)
            r = await http.post(
                "/in/twilio-sol", content=body, headers={**form, "x-twilio-signature": direct}
            )
            assert (r.status_code, r.json()["error"]) == (401, "invalid_signature")
    finally:
        await hub.close()


async def test_each_provider_is_answered_as_its_documentation_asks(
    http: httpx.AsyncClient,
) -> None:
    """contracts §1.2/§1.3: Meta retries any status but 200 for 7 days; §2.2: Twilio reads
    the answer to an incoming message as TwiML (JSON is its error 12300); §9.3: SendPulse
    asks for 200. A generic source keeps the API's 202."""
    body, headers = wa_post("text.json")
    first = await http.post("/in/wa-sol", content=body, headers=headers)
    again = await http.post("/in/wa-sol", content=body, headers=headers)
    assert (first.status_code, first.json()["duplicate"]) == (200, False), first.text
    assert (again.status_code, again.json()) == (200, {"id": first.json()["id"], "duplicate": True})

    form = (FIXTURES / "twilio/inbound_text.form").read_bytes()
    multi = {name: [value] for name, value in parse_qsl(form.decode())}
    signed = twilio_signature(
        TWILIO_VECTOR["auth_token"].encode(), "http://hub/in/twilio-sol", multi
    )
    twilio_headers = {
        "content-type": "application/x-www-form-urlencoded",
        "x-twilio-signature": signed,
    }
    twilio = await http.post("/in/twilio-sol", content=form, headers=twilio_headers)
    assert twilio.status_code == 200, twilio.text
    assert twilio.headers["content-type"].startswith("text/xml")
    reply = ElementTree.fromstring(twilio.content)  # noqa: S314 (the hub's own answer)
    assert (reply.tag, len(reply)) == ("Response", 0)  # TwiML that sends no reply
    event_id = twilio.headers["x-estafeta-event-id"]
    assert (await event_of(http, event_id))["event"]["data"]["provider"] == "twilio"
    assert "x-estafeta-duplicate" not in twilio.headers
    repeat = await http.post("/in/twilio-sol", content=form, headers=twilio_headers)
    assert (repeat.status_code, repeat.headers["x-estafeta-event-id"]) == (200, event_id)
    assert repeat.headers["x-estafeta-duplicate"] == "1"

    json_type = {"content-type": "application/json"}
    for url, fixture in (
        (f"/in/zapi-sol?token={ZAPI_TOKEN}", "zapi/received_text.json"),
        (f"/in/sp-sol?token={SENDPULSE_TOKEN}", "sendpulse/incoming_message.json"),
    ):
        r = await http.post(url, content=(FIXTURES / fixture).read_bytes(), headers=json_type)
        assert (r.status_code, r.json()["duplicate"]) == (200, False), (url, r.text)


async def test_zapi_needs_its_token_in_the_url(http: httpx.AsyncClient) -> None:
    body = (FIXTURES / "zapi/received_text.json").read_bytes()
    headers = {"content-type": "application/json"}
    r = await http.post(f"/in/zapi-sol?token={ZAPI_TOKEN}", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert (await event_of(http, r.json()["id"]))["event"]["data"]["provider"] == "zapi"
    r = await http.post("/in/zapi-sol?token=wrong", content=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (401, "invalid_token")
    r = await http.post("/in/zapi-sol", content=body, headers=headers)
    assert (r.status_code, r.json()["error"]) == (401, "missing_token")


async def test_zapi_channel_posts_are_not_stored_and_a_malformed_echo_flag_is_refused(
    http: httpx.AsyncClient, store: SqlStore
) -> None:
    headers = {"content-type": "application/json"}
    url = f"/in/zapi-sol?token={ZAPI_TOKEN}"
    post = (FIXTURES / "zapi/received_newsletter.json").read_bytes()
    r = await http.post(url, content=post, headers=headers)
    assert (r.status_code, r.json()) == (200, {"events": []})
    echo = orjson.loads((FIXTURES / "zapi/received_text.json").read_bytes())
    r = await http.post(url, content=orjson.dumps({**echo, "fromMe": "true"}), headers=headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_body")
    assert r.json()["detail"].startswith("body.fromMe:")
    assert (await store.queue_stats(history=True)).by_state == {}


async def test_sendpulse_customer_messages_in_and_echoes_out(http: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/json"}
    incoming = (FIXTURES / "sendpulse/incoming_message.json").read_bytes()
    r = await http.post(f"/in/sp-sol?token={SENDPULSE_TOKEN}", content=incoming, headers=headers)
    assert r.status_code == 200, r.text
    outgoing = (FIXTURES / "sendpulse/outgoing_message.json").read_bytes()
    r = await http.post(f"/in/sp-sol?token={SENDPULSE_TOKEN}", content=outgoing, headers=headers)
    assert (r.status_code, r.json()) == (200, {"events": []})  # our own message: no event


async def test_garbage_to_a_provider_is_a_clear_4xx(http: httpx.AsyncClient) -> None:
    body = b"\x00\xff not json"
    digest = hmac.new(WA_VECTOR["app_secret"].encode(), body, hashlib.sha256).hexdigest()
    r = await http.post(
        "/in/wa-sol",
        content=body,
        headers={"content-type": "application/json", "x-hub-signature-256": f"sha256={digest}"},
    )
    assert r.status_code == 400 and r.json()["error"] in ("invalid_json", "invalid_body")


async def test_a_webhook_that_is_not_utf8_is_refused_as_such(http: httpx.AsyncClient) -> None:
    """JSON and Twilio's forms travel as UTF-8: a Latin-1 body was `invalid_json`, "str is not
    valid UTF-8: surrogates not allowed" (orjson's words for any such byte); a Twilio form
    signed Twilio's way over its Latin-1 text is refused before it is read (verify answers
    401 only), but no longer tells the operator to mend a public_url or auth token."""
    doc = orjson.loads((FIXTURES / "zapi/received_text.json").read_bytes())
    body = orjson.dumps(doc).decode().encode("latin-1")  # "Vocês", "sábado"
    at = orjson.dumps(doc).decode().index("ê")
    json_type = {"content-type": "application/json"}
    for url in (f"/in/zapi-sol?token={ZAPI_TOKEN}", f"/in/sp-sol?token={SENDPULSE_TOKEN}"):
        r = await http.post(url, content=body, headers=json_type)
        assert (r.status_code, r.json()["error"]) == (400, "invalid_body"), r.text
        assert r.json()["detail"] == f"the body is not UTF-8 at byte {at}"

    form = b"MessageSid=SM1&From=whatsapp%3A%2B5511987654321&Body=Ol%E1&NumMedia=0"
    fields = parse_qsl(form.decode(), encoding="latin-1")
    signature = twilio_signature(
        TWILIO_VECTOR["auth_token"].encode(),
        "http://hub/in/twilio-sol",
        {name: [value] for name, value in fields},
    )
    r = await http.post(
        "/in/twilio-sol",
        content=form,
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "x-twilio-signature": signature,
        },
    )
    assert (r.status_code, r.json()["error"]) == (401, "invalid_signature"), r.text
    assert r.json()["detail"] == "the form body is not UTF-8: no X-Twilio-Signature can match it"
    listed = (await http.get("/api/v1/conversations", headers=ADMIN)).json()["conversations"]
    assert listed == []


async def test_a_byte_that_is_not_utf8_after_a_byte_order_mark_is_named_where_it_was_sent(
    http: httpx.AsyncClient,
) -> None:
    """The offset of a byte that is not UTF-8 counts from the body's first byte as sent,
    byte order mark included: it was 3 short, counted after the mark was taken off, and the
    sender's hexdump showed a byte that was fine there."""
    bom = b"\xef\xbb\xbf"
    doc = orjson.loads((FIXTURES / "zapi/received_text.json").read_bytes())
    body = bom + orjson.dumps(doc).decode().encode("latin-1")  # "Vocês", "sábado"
    at = body.index("ê".encode("latin-1"))
    json_type = {"content-type": "application/json"}
    digest = hmac.new(WA_VECTOR["app_secret"].encode(), body, hashlib.sha256).hexdigest()
    for url, headers in (
        (f"/in/zapi-sol?token={ZAPI_TOKEN}", json_type),
        (f"/in/sp-sol?token={SENDPULSE_TOKEN}", json_type),
        ("/in/wa-sol", {**json_type, "x-hub-signature-256": f"sha256={digest}"}),
    ):
        r = await http.post(url, content=body, headers=headers)
        assert (r.status_code, r.json()["error"]) == (400, "invalid_body"), (url, r.text)
        assert r.json()["detail"] == f"the body is not UTF-8 at byte {at}", url


async def test_a_webhook_after_a_byte_order_mark_is_taken(http: httpx.AsyncClient) -> None:
    """A UTF-8 byte order mark before the JSON was `400 invalid_json` ("BOM is not
    supported"), the provider's message lost; the API skips one, and so does ingest."""
    body = b"\xef\xbb\xbf" + (FIXTURES / "zapi/received_text.json").read_bytes()
    url, json_type = f"/in/zapi-sol?token={ZAPI_TOKEN}", {"content-type": "application/json"}
    r = await http.post(url, content=body, headers=json_type)
    assert r.status_code == 200, r.text
    data = (await event_of(http, r.json()["id"]))["event"]["data"]
    assert data["text"] == orjson.loads(body[3:])["text"]["message"]
