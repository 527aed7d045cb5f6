"""The largest webhooks the providers document (contracts §1.3: a WhatsApp Cloud POST may
batch up to 1000 updates, ≤ 3 MB, retried by Meta for 7 days) through the real ingest
endpoint, on both engines."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import func, select
from structlog.testing import capture_logs

from estafeta.api.app import create_app
from estafeta.config import load_config_dict
from estafeta.errors import StoreUnavailable
from estafeta.hub import Hub
from estafeta.ingress.spool import Spool
from estafeta.store import open_store
from estafeta.store import schema as s
from estafeta.store.sqlstore import SqlStore
from tests.chaos.conftest import TcpProxy
from tests.conftest import base_config
from tests.integration.providers_support import FIXTURES, WA_VECTOR, provider_sources

BATCH = 1000  # contracts §1.3: "up to 1000 updates" per POST
META_MAX_BYTES = 3_000_000  # contracts §1.3: "Payload ≤ 3 MB"
LONG_TEXT = "Bom dia, preciso remarcar a consulta de quinta para a semana que vem. "
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"  # nothing listens on port 1


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((FIXTURES / "whatsapp_cloud" / name).read_bytes())
    return loaded


def cloud_batch(kind: str, count: int = BATCH, text_chars: int | None = None) -> bytes:
    """One Cloud webhook whose single `value` lists `count` distinct messages or statuses,
    each as large as the fixture it copies (a text with its contact, a failed status), or
    with texts of `text_chars` characters."""
    if kind == "messages":
        document = fixture("batch_two_messages.json")
        value = document["entry"][0]["changes"][0]["value"]
        template, contact = value["messages"][0], value["contacts"][0]
        value["messages"], value["contacts"] = [], []
        for n in range(count):
            message, person = copy.deepcopy(template), copy.deepcopy(contact)
            message["id"] = f"wamid.large.{n:06d}"
            message["from"] = person["wa_id"] = f"55119{n:08d}"
            if text_chars is not None:
                message["text"]["body"] = (LONG_TEXT * (text_chars // len(LONG_TEXT) + 1))[
                    :text_chars
                ]
            value["messages"].append(message)
            value["contacts"].append(person)
    else:
        document = fixture("status_failed.json")
        value = document["entry"][0]["changes"][0]["value"]
        template = value["statuses"][0]
        value["statuses"] = []
        for n in range(count):
            status = copy.deepcopy(template)
            status["id"] = f"wamid.large.{n:06d}"
            value["statuses"].append(status)
    return orjson.dumps(document)


def signed(body: bytes) -> dict[str, str]:
    digest = hmac.new(WA_VECTOR["app_secret"].encode(), body, hashlib.sha256).hexdigest()
    return {"content-type": "application/json", "x-hub-signature-256": f"sha256={digest}"}


def three_destinations(database_url: str) -> dict[str, Any]:
    """The base configuration with every message routed to three destinations."""
    data = base_config(database_url)
    data["sources"].extend(provider_sources())
    crm = data["destinations"][0]
    data["destinations"].append({**crm, "id": "agenda", "url": "http://127.0.0.1:9/agenda"})
    data["routes"][0]["destinations"] = ["crm", "billing", "agenda"]
    return data


async def counts(store: SqlStore) -> tuple[int, int]:
    async with store.engine.connect() as conn:
        events = (await conn.execute(select(func.count()).select_from(s.events))).scalar_one()
        deliveries = (
            await conn.execute(select(func.count()).select_from(s.deliveries))
        ).scalar_one()
    return int(events), int(deliveries)


@pytest.fixture
async def routed_to_three(
    store: SqlStore, database_url: str
) -> AsyncIterator[tuple[httpx.AsyncClient, SqlStore]]:
    config = load_config_dict(three_destinations(database_url))
    await store.sync_config(config, 1_700_000_000_000)
    hub = Hub(config, store)
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
        yield client, store
    await hub.close()


@pytest.mark.parametrize("kind", ["messages", "statuses"])
async def test_a_cloud_webhook_of_1000_updates_is_stored_whole_and_once(
    routed_to_three: tuple[httpx.AsyncClient, SqlStore], kind: str
) -> None:
    http, store = routed_to_three
    body = cloud_batch(kind)
    assert len(body) < 1 << 20  # fits the default limit
    first = await http.post("/in/wa-sol", content=body, headers=signed(body))
    assert first.status_code == 200, first.text
    listed = first.json()["events"]
    assert len(listed) == BATCH and not any(e["duplicate"] for e in listed)
    assert len({e["id"] for e in listed}) == BATCH
    assert await counts(store) == (BATCH, 3 * BATCH)
    # Meta's retry of the same POST: every update a duplicate of the one stored, nothing new.
    again = await http.post("/in/wa-sol", content=body, headers=signed(body))
    assert again.status_code == 200, again.text
    repeated = again.json()["events"]
    assert all(e["duplicate"] for e in repeated)
    assert [e["id"] for e in repeated] == [e["id"] for e in listed]
    assert await counts(store) == (BATCH, 3 * BATCH)


def three_mb_webhook() -> bytes:
    """1000 messages of about 2,800 characters: as large as Meta says a webhook gets."""
    body = cloud_batch("messages", text_chars=2_800)
    assert 1 << 20 < len(body) <= META_MAX_BYTES
    return body


async def test_a_3_mb_cloud_webhook_needs_max_body_bytes_raised(
    store: SqlStore, database_url: str
) -> None:
    """Under the default 1 MiB it is refused (413) and nothing is stored: Meta would retry it
    for 7 days, then drop it (docs/how-to/connect-whatsapp.md says to raise the limit).
    With `max_body_bytes` at 4 MiB it is stored whole, once."""
    body = three_mb_webhook()
    for limit, expected in ((None, 413), (4 << 20, 200)):
        data = three_destinations(database_url)
        if limit is not None:
            data["server"] = {"max_body_bytes": limit}
        config = load_config_dict(data)
        await store.sync_config(config, 1_700_000_000_000)
        hub = Hub(config, store)
        try:
            transport = httpx.ASGITransport(app=create_app(hub))
            async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
                r = await http.post("/in/wa-sol", content=body, headers=signed(body))
        finally:
            await hub.close()
        assert r.status_code == expected, r.text
        if expected == 413:
            assert r.json()["error"] == "body_too_large"
            assert await counts(store) == (0, 0)
        else:
            assert len(r.json()["events"]) == BATCH
            assert await counts(store) == (BATCH, 3 * BATCH)


async def test_a_1000_update_webhook_is_spooled_in_one_write_while_the_store_is_down(
    store: SqlStore, database_url: str, tmp_path: Path
) -> None:
    """The store unreachable: the webhook is journaled whole (one record batch, one fsync),
    answered 200 marked spooled; Meta's retry of it during the outage gets the same ids as
    duplicates and journals nothing more; the drain stores each update once."""
    config = load_config_dict(three_destinations(database_url))
    await store.sync_config(config, 1_700_000_000_000)
    unreachable = open_store(UNREACHABLE)
    spool = Spool(tmp_path / "spool", max_bytes=1 << 30)
    hub = Hub(config, unreachable, spool=spool)
    body = cloud_batch("messages")
    try:
        transport = httpx.ASGITransport(app=create_app(hub))
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
            with capture_logs() as logs:
                first = await http.post("/in/wa-sol", content=body, headers=signed(body))
                size = spool.stats().bytes
                again = await http.post("/in/wa-sol", content=body, headers=signed(body))
        assert first.status_code == 200 and first.headers["x-estafeta-spooled"] == "1"
        listed = first.json()["events"]
        assert len(listed) == BATCH and not any(e["duplicate"] for e in listed)
        spooled = [e["count"] for e in logs if e["event"] == "events_spooled"]
        assert spooled == [BATCH]  # one write for the whole webhook
        assert again.status_code == 200 and again.headers["x-estafeta-spooled"] == "1"
        assert again.json()["events"] == [{**e, "duplicate": True} for e in listed]
        assert spool.stats().bytes == size
        assert await spool.drain(store) == BATCH
    finally:
        await hub.close()
        await unreachable.close()
    assert await counts(store) == (BATCH, 3 * BATCH)


@pytest.mark.postgres
async def test_a_1000_update_request_is_spooled_whole_while_the_store_hangs(
    proxied_hub: tuple[Hub, TcpProxy],
) -> None:
    """The database stops answering (connections open): after `spool_after_s` the request's
    1000 events go to the spool in one write, and once it answers they drain, each once."""
    hub, proxy = proxied_hub
    assert hub.spool is not None
    events = [
        hub.new_event(
            tenant_id="clinica-sol",
            source_id="crm-events",
            event_type="message.received",
            data={"n": n},
            idempotency_key=f"wamid.large.{n:06d}",
        )
        for n in range(BATCH)
    ]
    proxy.freeze()
    with capture_logs() as logs:
        results = await hub.accept_all(events)
    assert all(r.spooled and not r.duplicate for r in results)
    assert [e["count"] for e in logs if e["event"] == "events_spooled"] == [BATCH]
    proxy.thaw()
    for _ in range(300):  # the pool may still hold hung lines for a while
        if not hub.spool.stats().segments:
            break
        with contextlib.suppress(StoreUnavailable):
            await hub.spool.drain(hub.store)
        await asyncio.sleep(0.1)
    assert hub.spool.stats().segments == 0
    async with hub.store.engine.connect() as conn:
        stored = (await conn.execute(select(func.count()).select_from(s.events))).scalar_one()
    assert stored == BATCH
