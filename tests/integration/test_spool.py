"""The spool keeps accepting while the store is unreachable and loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import signal
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import orjson
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from structlog.testing import capture_logs

from estafeta.api.app import create_app
from estafeta.config import Config
from estafeta.delivery.state import DeliveryState
from estafeta.errors import HttpError, StoreError, StoreUnavailable
from estafeta.hub import Hub
from estafeta.ingress.journal import Unreadable, decode, encode, records
from estafeta.ingress.spool import DRAIN_CHUNK, Spool, SpoolDrainer
from estafeta.observability.log_throttle import LOG_EVERY_S, LogThrottle
from estafeta.observability.metrics import REGISTRY
from estafeta.store import engine_url, open_store
from estafeta.store.ingest import fates
from estafeta.store.postgres import PostgresStore
from estafeta.store.records import InsertResult, NewDelivery, NewEvent, NewMessage
from estafeta.store.sqlite import SqliteStore
from estafeta.store.sqlstore import SqlStore
from tests.acceptance.conftest import execute
from tests.conftest import lease_any, out_of_descriptors
from tests.events import new_event as event_named
from tests.integration.store_support import attempt, mode, store_as_role, umask

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"  # nothing listens on port 1


def new_event(n: int, key: str | None = None) -> NewEvent:
    return event_named(
        f"evt_{n:026d}",
        NewDelivery(id=f"dlv_{n:026d}", destination_id="crm", priority=1, max_attempts=3),
        key=key,
    )


def read_segment(path: Path) -> list[NewEvent]:
    """The events of a segment's whole records; unreadable bytes are skipped."""
    return [decode(item) for item in records(path.read_bytes()) if not isinstance(item, Unreadable)]


@pytest.fixture
async def down_hub(config: Config, tmp_path: Path) -> AsyncIterator[Hub]:
    """A hub whose store cannot be reached, spooling into tmp_path/spool."""
    unreachable = open_store(UNREACHABLE)
    hub = Hub(config, unreachable, spool=Spool(tmp_path / "spool", max_bytes=10**6))
    yield hub
    await hub.close()
    await unreachable.close()


@pytest.fixture
async def hung_store(database_url: str) -> AsyncIterator[SqlStore]:
    """A store whose one pooled connection is taken and not given back, as when every
    connection waits on a hung database: a call waits `pool_timeout` for one, then fails."""
    engine = create_async_engine(
        engine_url(database_url), pool_size=1, max_overflow=0, pool_timeout=0.05
    )
    # SQLite without a path: webhooks go through the pool too, not the ingest writer.
    hung = (
        PostgresStore(engine)
        if database_url.startswith("postgresql")
        else SqliteStore(engine, path=None)
    )
    taken = await engine.connect()
    yield hung
    await taken.close()
    await hung.close()


async def accept(hub: Hub, n: int, key: str | None = None) -> str:
    result = await hub.accept(
        tenant_id="clinica-sol",
        source_id="crm-events",
        event_type="message.received",
        data={"n": n},
        idempotency_key=key,
    )
    assert result.spooled and not result.duplicate
    return result.event_id


def test_a_journal_reads_back_what_was_written_and_ignores_a_torn_tail(tmp_path: Path) -> None:
    segment = tmp_path / "0000000000001-x-1-000000001.journal"
    events = [new_event(n) for n in range(3)]
    whole = b"".join(encode(e) for e in events)
    segment.write_bytes(whole + encode(new_event(99))[:-3])  # a crash mid-append
    assert read_segment(segment) == events
    segment.write_bytes(whole[:-1] + b"X")  # a corrupt last record fails its CRC
    assert read_segment(segment) == events[:2]


def test_a_journal_written_before_records_were_structs_still_reads(tmp_path: Path) -> None:
    """A spool left by an older estafeta (records as orjson-dumped dataclass dicts, before
    `lease` existed) must import after an upgrade: those events were acknowledged."""
    queued = NewMessage(id="msg_1", source_id="wa", recipient="+5511999990000", content="{}")
    old = {
        **{f: getattr(new_event(7), f) for f in ("id", "tenant_id", "source_id", "type")},
        "idempotency_key": "k7",
        "occurred_at": 5,
        "received_at": 6,
        "payload": '{"id":"evt_7"}',
        "deliveries": [
            {
                "id": "dlv_7",
                "destination_id": "crm",
                "priority": 1,
                "max_attempts": 3,
                "ordering_key": "+5511999990000",
            }
        ],
        "raw": None,
        "conversation_id": "5511999990000",
        "message_ref": None,
        "direction": "outbound",
        "contact_name": None,
        "message": {
            "id": "msg_1",
            "source_id": "wa",
            "recipient": "+5511999990000",
            "content": "{}",
        },
        "escalation": None,
    }
    payload = orjson.dumps(old)
    segment = tmp_path / "0000000000001-x-1-000000001.journal"
    segment.write_bytes(struct.pack(">II", len(payload), zlib.crc32(payload)) + payload)
    [read] = read_segment(segment)
    assert read.deliveries == (
        NewDelivery(
            id="dlv_7",
            destination_id="crm",
            priority=1,
            max_attempts=3,
            ordering_key="+5511999990000",
        ),
    )
    assert read.message == queued and read.direction == "outbound"
    assert read.idempotency_key == "k7" and read.payload == '{"id":"evt_7"}'
    segment.write_bytes(encode(read))  # and it round-trips through today's format
    assert read_segment(segment) == [read]


async def test_while_the_store_is_down_events_are_spooled_then_drained(
    down_hub: Hub, store: SqlStore
) -> None:
    ids = [await accept(down_hub, n, key=f"wamid.{n}") for n in range(25)]
    assert down_hub.spool is not None
    stats = down_hub.spool.stats()
    assert stats.segments == 1 and stats.bytes > 0 and stats.oldest_at is not None

    assert await down_hub.spool.drain(store) == 25
    assert down_hub.spool.stats().segments == 0
    for event_id in ids:
        view = await store.get_event(event_id, "clinica-sol")
        assert view is not None and [d.destination_id for d in view.deliveries] == ["crm"]


async def test_drain_rounds_during_an_outage_add_no_segments(
    down_hub: Hub, store: SqlStore
) -> None:
    """The drainer tries every second while the store is down. Each try used to close the
    segment being written, so the next webhook opened another: a new file every second of
    the outage, each of which every spooled webhook then stats (`append_all` sums the
    spool's size). The writer's segment is left open while the store does not answer."""
    spool = down_hub.spool
    assert spool is not None
    for n in range(20):
        await accept(down_hub, n)
        with pytest.raises(StoreUnavailable):
            await spool.drain(down_hub.store)
    assert spool.stats().segments == 1
    assert await spool.drain(store) == 20  # once it answers, the open segment drains too
    assert spool.stats().segments == 0


async def test_a_hung_store_is_unavailable_and_ingest_spools(
    config: Config, hung_store: SqlStore, tmp_path: Path
) -> None:
    """A pool timeout is the store being unreachable: ingest answers from the spool, rather
    than retrying the batch one event at a time (each waiting for a connection) and
    failing every request."""
    hub = Hub(config, hung_store, spool=Spool(tmp_path / "spool", max_bytes=10**6))
    try:
        await asyncio.gather(*(accept(hub, n) for n in range(3)))  # one batch: it spools
    finally:
        await hub.close()
    with pytest.raises(StoreUnavailable):
        await hung_store.queue_depths()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_login_the_database_refuses_spools_ingest(
    config: Config, database_url: str, tmp_path: Path
) -> None:
    """A running hub whose login PostgreSQL refuses (a rotated password, a dropped role):
    the store cannot serve it, so ingest spools as it does for a stopped server, and the
    error still says why."""
    role_refused = make_url(database_url).set(username="no_such_role", password=None)
    refused = open_store(role_refused.render_as_string(hide_password=False))
    hub = Hub(config, refused, spool=Spool(tmp_path / "spool", max_bytes=10**6))
    try:
        await accept(hub, 1)
    finally:
        await hub.close()
    with pytest.raises(StoreUnavailable, match='role "no_such_role" does not exist'):
        await refused.queue_depths()
    await refused.close()


@contextmanager
def read_only(database_url: str) -> Iterator[None]:
    """The database as a standby after a failover: sessions opened now may read, not write."""
    name = make_url(database_url).database
    admin = create_engine(
        database_url.replace("postgresql://", "postgresql+psycopg2://", 1),
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
    try:
        yield
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" RESET default_transaction_read_only'))
        admin.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_database_that_cannot_write_spools_ingest_and_drains_once_it_can(
    config: Config, store: SqlStore, database_url: str, tmp_path: Path
) -> None:
    """A PostgreSQL that takes connections but refuses writes (SQLSTATE 25006: a failover
    left storage.url on a standby) is down for ingest: webhooks are spooled and answered,
    not failed with a 500 that some providers never send again, and they are imported
    once the database writes again."""
    with read_only(database_url):
        standby = open_store(database_url)
        hub = Hub(config, standby, spool=Spool(tmp_path / "spool", max_bytes=10**6))
        try:
            event_id = await accept(hub, 1, key="wamid.ro")
            assert hub.spool is not None
            with pytest.raises(StoreUnavailable):
                await hub.spool.drain(standby)
        finally:
            await hub.close()
            await standby.close()
    assert await store.get_event(event_id, "clinica-sol") is None
    assert await hub.spool.drain(store) == 1
    assert await store.get_event(event_id, "clinica-sol") is not None


async def test_a_stopping_process_stops_draining_between_chunks_and_keeps_the_rest(
    down_hub: Hub, store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large spool (a long outage) drained while the process is told to stop: it checked
    only between whole drain rounds, so SIGTERM waited for every segment to be imported —
    minutes, past any supervisor's grace. It now stops after the chunk it is importing; the
    segment stays whole and the next drain imports it, what was imported a duplicate."""
    ids = await asyncio.gather(*(accept(down_hub, n, key=f"wamid.{n}") for n in range(1_200)))
    spool = down_hub.spool
    assert spool is not None
    stop = asyncio.Event()
    imports = spool._import

    async def import_then_stop(*args: Any) -> int:
        imported = await imports(*args)
        stop.set()  # SIGTERM arrives while the first chunk is imported
        return imported

    monkeypatch.setattr(spool, "_import", import_then_stop)
    assert await spool.drain(store, stop) == DRAIN_CHUNK
    assert spool.stats().segments == 1
    monkeypatch.setattr(spool, "_import", imports)
    assert await spool.drain(store) == 1_200  # the first chunk again, as duplicates
    assert spool.stats().segments == 0
    for event_id in (ids[0], ids[DRAIN_CHUNK], ids[-1]):
        assert await store.get_event(event_id, "clinica-sol") is not None


# SQLite commits a batch only once everything about it is known.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_batch_that_fails_after_its_commit_is_spooled_not_stored_twice(
    config: Config, store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL commits a batch of webhooks in its one statement; what follows may still
    fail (reading a duplicate's original that another process committed meanwhile). Were
    that taken for a bad batch, each event would be stored again alone, and one without an
    idempotency key fail on its own id: an error answered for a stored event, which its
    sender then sends again. Spooled instead, the import finds each event by its id."""
    failures = iter([StoreError("an event conflicted on its key but was not found")])

    def failing_once(*args: Any) -> list[InsertResult]:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return fates(*args)

    monkeypatch.setattr("estafeta.store.postgres.fates", failing_once)
    hub = Hub(config, store, spool=Spool(tmp_path / "spool", max_bytes=10**6))
    try:
        ids = await asyncio.gather(*(accept(hub, n) for n in range(2)))  # one batch, no keys
        assert hub.spool is not None and await hub.spool.drain(store) == 2
    finally:
        await hub.close()
    assert (await store.queue_stats(history=True)).by_state == {"pending": 2}  # each stored once
    for event_id in ids:
        assert await store.get_event(event_id, "clinica-sol") is not None


async def test_a_segment_imported_twice_is_deduplicated_by_event_id(
    store: SqlStore, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    segment = spool_dir / "0000000000001-host-1-000000001.journal"
    segment.write_bytes(b"".join(encode(new_event(n)) for n in range(7)))
    saved = segment.read_bytes()
    spool = Spool(spool_dir, max_bytes=10**6)
    assert await spool.drain(store) == 7
    segment.write_bytes(saved)  # as if the process died before deleting it
    assert await spool.drain(store) == 7  # read again, but every event is a duplicate
    assert (await store.queue_stats(history=True)).by_state == {"pending": 7}
    await spool.close()


async def test_a_full_spool_refuses_with_503_rather_than_accept(
    config: Config, tmp_path: Path
) -> None:
    unreachable = open_store(UNREACHABLE)
    hub = Hub(config, unreachable, spool=Spool(tmp_path / "spool", max_bytes=1))
    try:
        await accept(hub, 1)  # the first fits (the spool was empty)
        with pytest.raises(HttpError) as refused:
            await accept(hub, 2)
        assert refused.value.status == 503 and refused.value.headers["Retry-After"]
    finally:
        await hub.close()
        await unreachable.close()


async def test_ingest_answers_202_marked_spooled_while_the_store_is_down(down_hub: Hub) -> None:
    from tests.conftest import signed
    from tests.integration.test_ingress_api import MESSAGE

    transport = httpx.ASGITransport(app=create_app(down_hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        r = await http.post("/in/crm-events", content=MESSAGE, headers=signed(MESSAGE))
    assert r.status_code == 202 and r.headers["x-estafeta-spooled"] == "1"
    assert orjson.loads(r.content)["id"].startswith("evt_")


async def test_a_journal_file_not_named_as_a_segment_fails_no_webhook_and_drains(
    down_hub: Hub, store: SqlStore
) -> None:
    """A `.journal` whose name does not start with a creation time (a record an operator
    repaired and saved as `repaired.journal`) made the spool's listing raise: every webhook
    spooled meanwhile was answered 500, and the drainer crashed on every round."""
    from tests.conftest import signed
    from tests.integration.test_ingress_api import MESSAGE

    spool = down_hub.spool
    assert spool is not None
    stray = spool.directory / "repaired.journal"
    stray.write_bytes(encode(new_event(1)))
    os.utime(stray, ns=(0, 1_700_000_000_000 * 1_000_000))
    transport = httpx.ASGITransport(app=create_app(down_hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        r = await http.post("/in/crm-events", content=MESSAGE, headers=signed(MESSAGE))
        metrics = await http.get("/metrics")
    assert r.status_code == 202 and r.headers["x-estafeta-spooled"] == "1"
    assert metrics.status_code == 200 and "estafeta_spool_segments 2.0" in metrics.text
    assert spool.stats().oldest_at == 1_700_000_000_000  # when it was written
    assert await spool.drain(store) == 2
    for event_id in (new_event(1).id, r.json()["id"]):
        assert await store.get_event(event_id, None) is not None


async def test_a_spool_directory_removed_and_made_again_takes_events_where_they_drain(
    down_hub: Hub, store: SqlStore
) -> None:
    """The directory removed under an open segment (`spool_unwritable` with `ENOENT`), the
    segment had no name any more, yet took the events of the outage: each answered 202 from
    a file no drain could ever find, and still after the directory was made again, as the
    runbook says to. Now a webhook is refused 503 while the directory is gone, and spooled
    where the drain finds it once it is back."""
    spool = down_hub.spool
    assert spool is not None
    await accept(down_hub, 1, key="wamid.1")
    for path in spool.directory.iterdir():
        path.unlink()
    spool.directory.rmdir()
    with capture_logs() as logs, pytest.raises(HttpError) as refused:
        await accept(down_hub, 2)
    assert (refused.value.status, refused.value.error) == (503, "spool_unavailable")
    assert [line["event"] for line in logs if line["log_level"] == "error"] == [
        "spool_segment_gone",
        "spool_write_failed",
    ]
    spool.directory.mkdir(mode=0o700)
    later = await accept(down_hub, 3)
    again = await accept(down_hub, 1, key="wamid.1")  # the provider's redelivery of the lost one
    assert again != later and spool.stats().segments == 1
    assert await spool.drain(store) == 2
    for event_id in (later, again):
        assert await store.get_event(event_id, None) is not None


async def test_without_a_spool_an_unreachable_store_answers_503(config: Config) -> None:
    from tests.conftest import signed
    from tests.integration.test_ingress_api import MESSAGE

    unreachable = open_store(UNREACHABLE)
    hub = Hub(config, unreachable)
    transport = httpx.ASGITransport(app=create_app(hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        r = await http.post("/in/crm-events", content=MESSAGE, headers=signed(MESSAGE))
    assert (r.status_code, r.json()["error"]) == (503, "store_unavailable")
    assert r.headers["retry-after"] == "5"
    await hub.close()
    await unreachable.close()


async def test_repeats_of_a_key_at_once_during_the_outage_get_one_id(down_hub: Hub) -> None:
    """A client retrying while its first request's fsync is still under way, and a webhook
    that carries one key twice: each repeat was journaled with an id of its own, answered
    202 as new, and dropped at the drain, so its id led nowhere (404 for ever)."""

    def keyed(key: str) -> dict[str, Any]:
        return {
            "tenant_id": "clinica-sol",
            "source_id": "crm-events",
            "event_type": "message.received",
            "data": {},
            "idempotency_key": key,
        }

    at_once = await asyncio.gather(*(down_hub.accept(**keyed("wamid.1")) for _ in range(3)))
    assert all(r.spooled for r in at_once)
    assert len({r.event_id for r in at_once}) == 1
    assert [r.duplicate for r in at_once].count(False) == 1
    events = [down_hub.new_event(**keyed("wamid.2")), down_hub.new_event(**keyed("wamid.2"))]
    first, second = await down_hub.accept_all(events)  # as the store answers it
    assert (first.duplicate, second.event_id, second.duplicate) == (False, first.event_id, True)


async def test_one_key_of_two_tenants_spooled_is_two_events_each_drained_as_its_own(
    down_hub: Hub, store: SqlStore
) -> None:
    """Each tenant's idempotency keys are its own, in the spool as in the store: the same
    key published by two tenants during an outage is two events, each drained under its
    tenant to its own destinations, and each tenant's repeat gets its own original."""

    def published(tenant_id: str) -> dict[str, Any]:
        return {
            "tenant_id": tenant_id,
            "source_id": "api",
            "event_type": "appointment.booked",
            "data": {"status": "confirmed"},
            "idempotency_key": "apt-1",
        }

    sol, outra = [await down_hub.accept(**published(t)) for t in ("clinica-sol", "outra")]
    assert sol.spooled and outra.spooled and not (sol.duplicate or outra.duplicate)
    assert sol.event_id != outra.event_id
    again = await down_hub.accept(**published("outra"))
    assert (again.event_id, again.duplicate) == (outra.event_id, True)
    assert down_hub.spool is not None
    assert await down_hub.spool.drain(store) == 2
    expected = [
        (sol.event_id, "clinica-sol", ["billing", "crm"]),
        (outra.event_id, "outra", ["outra-sink"]),
    ]
    for event_id, tenant, destinations in expected:
        view = await store.get_event(event_id, tenant)
        assert view is not None
        assert sorted(d.destination_id for d in view.deliveries) == destinations
    assert await store.get_event(sol.event_id, "outra") is None


async def test_a_redelivery_during_the_outage_gets_the_original_id(down_hub: Hub) -> None:
    first, again = [  # one webhook, then its redelivery
        await down_hub.accept(
            tenant_id="clinica-sol",
            source_id="crm-events",
            event_type="message.received",
            data={},
            idempotency_key="w1",
        )
        for _ in range(2)
    ]
    assert (again.event_id, again.duplicate, again.spooled) == (first.event_id, True, True)


class Blink:
    """A store whose inserts fail as an unreachable database's while `down`."""

    def __init__(self, store: SqlStore, monkeypatch: pytest.MonkeyPatch, *, down: bool) -> None:
        self.down = down
        real_insert = store.insert_events

        async def insert_events(*args: Any, **kwargs: Any) -> list[InsertResult]:
            if self.down:
                raise StoreUnavailable("the database is down")
            return await real_insert(*args, **kwargs)

        monkeypatch.setattr(store, "insert_events", insert_events)
        monkeypatch.setattr("estafeta.hub.STORE_RETRY_S", 0.0)  # try the store at the next one


@asynccontextmanager
async def blinking_hub(
    config: Config,
    store: SqlStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    down: bool = True,
    spool_bytes: int = 10**6,
) -> AsyncIterator[tuple[Hub, Blink]]:
    """A hub with a spool in front of a store that goes down and comes back at will; closed
    when the block ends."""
    blink = Blink(store, monkeypatch, down=down)
    hub = Hub(config, store, spool=Spool(tmp_path / "spool", max_bytes=spool_bytes))
    try:
        yield hub, blink
    finally:
        await hub.close()


def message(hub: Hub, n: int, *, key: str = "maria", idempotent: bool = False) -> NewEvent:
    """Message `n` of a conversation (`ordering_key`), its provider's id as idempotency key."""
    return hub.new_event(
        tenant_id="clinica-sol",
        source_id="crm-events",
        event_type="message.received",
        data={"n": n},
        idempotency_key=f"wamid.{n}" if idempotent else None,
        ordering_key=key,
    )


async def test_a_repeat_accepted_after_an_outage_before_the_drain_gets_the_spooled_id(
    config: Config, store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender retries an event spooled during the outage (its answer was lost) once the
    store answers again, before the drain imported the original. Stored anew, the repeat
    got an id of its own and the drain dropped the original as its duplicate: the id first
    answered never existed. It is answered as the spooled original instead."""
    async with blinking_hub(config, store, tmp_path, monkeypatch) as (hub, blink):

        async def booked(key: str) -> InsertResult:
            return await hub.accept(
                tenant_id="clinica-sol",
                source_id="crm-events",
                event_type="appointment.booked",
                data={"status": "confirmed"},
                idempotency_key=key,
            )

        first = await booked("booking-7")
        blink.down = False
        again = await booked("booking-7")
        assert (again.event_id, again.duplicate) == (first.event_id, True)
        other = await booked("booking-8")  # any other key goes to the store at once
        assert (other.duplicate, other.spooled) == (False, False)
        assert hub.spool is not None and await hub.spool.drain(store) == 1
        assert await store.get_event(first.event_id, "clinica-sol") is not None
        late = await booked("booking-7")  # the store has it now, and answers it
        assert (late.event_id, late.duplicate, late.spooled) == (first.event_id, True, False)
        assert (await store.queue_stats(history=True)).by_state == {"pending": 4}


async def test_a_repeat_of_a_key_the_spool_no_longer_remembers_gets_the_original_id(
    config: Config, store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool remembers the keys of its last 100,000 events (`REMEMBERED_KEYS`); a long
    outage spooled more. A repeat of a key it forgot, whose original still waited in the
    spool, was journaled anew with an id of its own, and the drain dropped that as the
    original's duplicate: the id answered never existed. It is answered as the original,
    during the outage and once the store answers (spooled behind its key's events)."""
    monkeypatch.setattr("estafeta.ingress.spool.REMEMBERED_KEYS", 3)
    async with blinking_hub(config, store, tmp_path, monkeypatch) as (hub, blink):
        originals = [
            (await hub.accept_all([message(hub, n, idempotent=True)]))[0] for n in range(5)
        ]
        (again,) = await hub.accept_all([message(hub, 0, idempotent=True)])
        blink.down = False
        (later,) = await hub.accept_all([message(hub, 1, idempotent=True)])
        assert (again.event_id, again.duplicate) == (originals[0].event_id, True)
        assert (later.event_id, later.duplicate) == (originals[1].event_id, True)
        assert hub.spool is not None and await hub.spool.drain(store) == 5
        for result in (again, later):
            assert await store.get_event(result.event_id, "clinica-sol") is not None


async def test_a_keys_events_accepted_after_an_outage_wait_behind_its_spooled_ones(
    config: Config, store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """maria's message 1 was spooled during an outage; message 2 arrives once the store
    answers again, before the drain imported message 1. Stored at once, it was sent first.
    It is spooled behind message 1 instead, and once the drain imported both, they go in
    order; the key's next events are stored directly again, another key's at once."""
    async with blinking_hub(config, store, tmp_path, monkeypatch) as (hub, blink):
        (first,) = await hub.accept_all([message(hub, 1)])
        blink.down = False
        (second,) = await hub.accept_all([message(hub, 2)])
        (other,) = await hub.accept_all([message(hub, 1, key="joao")])
        assert (first.spooled, second.spooled, other.spooled) == (True, True, False)
        now = hub.clock.now_ms() + 1
        [joao] = await lease_any(store, now_ms=now)
        assert joao.event_id == other.event_id  # maria's both wait in the spool
        assert hub.spool is not None and await hub.spool.drain(store) == 2
        (third,) = await hub.accept_all([message(hub, 3)])
        assert not third.spooled  # drained: the key is stored directly again
        now = hub.clock.now_ms() + 1
        sent = []
        while leased := await lease_any(store, now_ms=now):
            [sending] = leased  # one of maria's at a time
            sent.append(sending.event_id)
            await store.complete([attempt(sending, DeliveryState.SUCCEEDED, at=now)], now)
        assert sent == [first.event_id, second.event_id, third.event_id]


async def test_events_spooled_says_why_they_were_spooled(
    config: Config, store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`events_spooled` said nothing of why: under `serve --no-workers`, with a spool in
    front, no line said why the store was not used until `store_down` fired. It says the
    store's error, or that the events wait behind their key's spooled ones."""
    async with blinking_hub(config, store, tmp_path, monkeypatch) as (hub, blink):
        assert hub.spool is not None
        now = [0.0]
        hub.spool._logged = LogThrottle(monotonic=lambda: now[0])
        with capture_logs() as logs:
            await hub.accept_all([message(hub, 1)])
            blink.down = False
            now[0] += LOG_EVERY_S  # the next line is due
            await hub.accept_all([message(hub, 2)])  # behind message 1
    said = [(e["count"], e.get("error")) for e in logs if e["event"] == "events_spooled"]
    behind = "earlier events of their ordering_key wait in the spool"
    assert said == [(1, "the database is down"), (1, behind)]


class SlowFirstLookup:
    """The store's answer to the first "is this provider id stored?" held until `gate` is
    set; `answered` is set once a later one has answered."""

    def __init__(self, store: SqlStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lookup = store.stored_ids_by_key
        self.entered, self.gate, self.answered = asyncio.Event(), asyncio.Event(), asyncio.Event()
        monkeypatch.setattr(store, "stored_ids_by_key", self)

    async def __call__(self, events: Any) -> dict[tuple[str, str, str], str]:
        if not self.entered.is_set():
            self.entered.set()
            await self.gate.wait()
            return await self.lookup(events)
        found = await self.lookup(events)
        self.answered.set()
        return found

    async def later_answered_first(self, first: Awaitable[Any], later: Awaitable[Any]) -> Any:
        """Runs `first` until its lookup is held, then `later` until its lookup answered;
        then lets the first answer. What both returned."""
        one = asyncio.ensure_future(first)
        await asyncio.wait_for(self.entered.wait(), timeout=10)
        two = asyncio.ensure_future(later)
        await asyncio.wait_for(self.answered.wait(), timeout=10)
        for _ in range(20):  # `later` goes as far as it can
            await asyncio.sleep(0)
        self.gate.set()
        return await asyncio.wait_for(asyncio.gather(one, two), timeout=10)


def journaled(spool_dir: Path) -> list[str]:
    """The ids of the events in the spool's segments, in the order the drain reads them."""
    return [e.id for path in sorted(spool_dir.glob("*.journal")) for e in read_segment(path)]


async def test_a_keys_events_spooled_behind_it_keep_their_order_whatever_answers_first(
    config: Config, store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """maria's message 1 was spooled in an outage; messages 2 and 3 arrive once the store
    answers, and are spooled behind it. Each first asks the store whether its provider id
    is stored already, and the answer for message 2 is slow. Journaled as the answers came,
    3 went before 2, and a drain importing them in two chunks stored 3 first. The spool
    keeps them in the order they were accepted."""
    async with blinking_hub(config, store, tmp_path, monkeypatch) as (hub, blink):
        (first,) = await hub.accept_all([message(hub, 1, idempotent=True)])
        blink.down = False
        (two,), (three,) = await SlowFirstLookup(store, monkeypatch).later_answered_first(
            hub.accept_all([message(hub, 2, idempotent=True)]),
            hub.accept_all([message(hub, 3, idempotent=True)]),
        )
        assert first.spooled and two.spooled and three.spooled
        assert journaled(tmp_path / "spool") == [first.event_id, two.event_id, three.event_id]


async def test_a_repeat_spooled_while_its_original_waits_for_the_store_gets_its_id(
    config: Config, store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """maria's message 2 is spooled behind her message 1 once the store answers, and asks the
    store first whether its provider id is stored; the answer is slow, and the provider
    resends message 2 meanwhile. The resend journaled a second copy with an id of its own,
    which the drain then dropped as a duplicate: an id answered that never exists. It is
    answered as the original instead, and the spool holds one copy."""
    async with blinking_hub(config, store, tmp_path, monkeypatch) as (hub, blink):
        (first,) = await hub.accept_all([message(hub, 1, idempotent=True)])
        blink.down = False
        (two,), (again,) = await SlowFirstLookup(store, monkeypatch).later_answered_first(
            hub.accept_all([message(hub, 2, idempotent=True)]),
            hub.accept_all([message(hub, 2, idempotent=True)]),
        )
        assert (again.event_id, again.duplicate) == (two.event_id, True)
        assert journaled(tmp_path / "spool") == [first.event_id, two.event_id]


@pytest.mark.parametrize("ends", ["failing", "cancelled"])
async def test_a_request_ending_before_its_turn_lets_no_later_one_of_its_key_go_first(
    config: Config, store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ends: str
) -> None:
    """maria's messages 2, 3 and 4 are spooled behind her message 1 once the store answers;
    the store's answer for 2 is slow, and 3 ends before its turn: the store fails its
    lookup (a 500, sent again later), or its request is cancelled. 4 was then journaled at
    once, ahead of 2, and sent first after the drain. It waits for 2 as it would have."""
    async with blinking_hub(config, store, tmp_path, monkeypatch) as (hub, blink):
        (first,) = await hub.accept_all([message(hub, 1, idempotent=True)])
        blink.down = False
        lookup = SlowFirstLookup(store, monkeypatch)
        two = asyncio.ensure_future(hub.accept_all([message(hub, 2, idempotent=True)]))
        await asyncio.wait_for(lookup.entered.wait(), timeout=10)
        three = hub.accept_all([message(hub, 3, idempotent=True)])
        if ends == "failing":
            answers, lookup.lookup = lookup.lookup, failing_lookup
            with pytest.raises(StoreError):
                await asyncio.wait_for(three, timeout=10)
            lookup.lookup = answers
        else:
            waiting = asyncio.ensure_future(three)
            await asyncio.wait_for(lookup.answered.wait(), timeout=10)
            for _ in range(20):  # at its turn
                await asyncio.sleep(0)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            lookup.answered.clear()
        (two_result,), (four,) = await lookup.later_answered_first(
            two, hub.accept_all([message(hub, 4, idempotent=True)])
        )
        journal = journaled(tmp_path / "spool")
        assert journal == [first.event_id, two_result.event_id, four.event_id]


async def test_an_event_given_up_on_by_a_hung_store_is_answered_within_the_bound(
    config: Config, store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store hangs (connections open, nothing answered) with maria's message 1 spooled.
    joao's message waits `spool_after_s` for its commit, then is spooled; meanwhile
    maria's message 2 arrived, to be spooled behind her 1, and asks the hung store whether
    its provider id is stored, for up to `spool_after_s` too. joao's waited for that
    answer: spooled after twice the bound, not once (10 s by default; 20 s set to 10,
    when Twilio hangs up at 15). The store found unreachable, the question is left."""
    bound = 2.0  # wide enough apart, once (2 s) and twice (3.6 s), for a loaded machine
    storage = config.storage.model_copy(update={"spool_after_s": bound})
    config = config.model_copy(update={"storage": storage})
    async with blinking_hub(config, store, tmp_path, monkeypatch) as (hub, blink):
        await hub.accept_all([message(hub, 1, idempotent=True)])
        answers = asyncio.Event()  # the store hangs until the test ends
        insert, lookup = store.insert_events, store.stored_ids_by_key

        async def hung_insert(*args: Any, **kwargs: Any) -> list[InsertResult]:
            await answers.wait()
            return await insert(*args, **kwargs)

        async def hung_lookup(events: Any) -> dict[tuple[str, str, str], str]:
            await answers.wait()
            return await lookup(events)

        monkeypatch.setattr(store, "insert_events", hung_insert)
        monkeypatch.setattr(store, "stored_ids_by_key", hung_lookup)
        blink.down = False
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            joao = asyncio.ensure_future(hub.accept_all([message(hub, 1, key="joao")]))
            await asyncio.sleep(bound * 0.8)  # maria's 2 comes while joao's waits
            maria = asyncio.ensure_future(hub.accept_all([message(hub, 2, idempotent=True)]))
            (spooled,) = await asyncio.wait_for(joao, timeout=10)
            waited = loop.time() - started
            assert spooled.spooled
            assert waited < bound * 1.5, waited  # the watchdog looks every tenth of it
            (two,) = await asyncio.wait_for(maria, timeout=10)
            assert two.spooled and not two.duplicate
        finally:
            answers.set()


async def failing_lookup(events: Any) -> dict[tuple[str, str, str], str]:
    raise StoreError("the store failed: ProgrammingError")


async def test_a_keys_event_queued_behind_one_the_store_failed_is_spooled_behind_it(
    config: Config, store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """maria's message 1 is in a batch that the store fails as unreachable after a while (a
    dropped connection); message 2 waits for it in the group committer's queue, and the
    store answers again at once. Stored then, message 2 was sent while message 1 still
    waited in the spool. It follows message 1 to the spool instead, and they go in order."""
    async with blinking_hub(config, store, tmp_path, monkeypatch, down=False) as (hub, _):
        entered, gate = asyncio.Event(), asyncio.Event()
        insert = store.insert_events

        async def first_fails_late(*args: Any, **kwargs: Any) -> list[InsertResult]:
            if not entered.is_set():
                entered.set()
                await gate.wait()
                raise StoreUnavailable("the connection was lost")
            return await insert(*args, **kwargs)

        monkeypatch.setattr(store, "insert_events", first_fails_late)
        first = asyncio.create_task(hub.accept_all([message(hub, 1)]))
        await asyncio.wait_for(entered.wait(), timeout=10)
        second = asyncio.create_task(hub.accept_all([message(hub, 2)]))
        await asyncio.sleep(0)  # its task runs at once: queued behind message 1's batch
        gate.set()
        (one,), (two,) = await asyncio.wait_for(asyncio.gather(first, second), timeout=10)
        assert one.spooled
        assert two.spooled, "message 2 stored while message 1 waits in the spool"
        assert hub.spool is not None and await hub.spool.drain(store) == 2
        now = hub.clock.now_ms() + 1
        sent = []
        while leased := await lease_any(store, now_ms=now):
            [sending] = leased
            sent.append(sending.event_id)
            await store.complete([attempt(sending, DeliveryState.SUCCEEDED, at=now)], now)
        assert sent == [one.event_id, two.event_id]


async def test_a_keys_event_the_full_spool_cannot_hold_is_stored_once_the_store_answers(
    config: Config, store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long outage filled the spool; the store answers again, and the drain has not yet
    freed room. An event of a key waiting in the spool was refused `503 spool_full` ("the
    store is unreachable"), though the store answered, and a sender that does not retry
    (Twilio) lost it: it is stored at once instead, as any other event then."""
    async with blinking_hub(config, store, tmp_path, monkeypatch, spool_bytes=1) as (
        hub,
        blink,
    ):  # full at once
        (first,) = await hub.accept_all([message(hub, 1)])
        blink.down = False
        (second,) = await hub.accept_all([message(hub, 2)])
        assert (first.spooled, second.spooled) == (True, False)
        assert hub.spool is not None and await hub.spool.drain(store) == 1
        for result in (first, second):
            assert await store.get_event(result.event_id, "clinica-sol") is not None


async def test_a_redelivery_of_a_stored_event_behind_a_spooled_one_of_its_key_gets_its_id(
    config: Config, store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """maria's message 1 was stored, message 2 spooled during an outage. The store answers
    again; before the drain imports message 2, the sender repeats message 1 (same key). The
    store knows it: the repeat is answered as a duplicate of it, not journaled as a new event
    whose id the drain then drops (the id answered would never exist)."""
    async with blinking_hub(config, store, tmp_path, monkeypatch, down=False) as (hub, blink):
        (first,) = await hub.accept_all([message(hub, 1, idempotent=True)])
        blink.down = True
        (second,) = await hub.accept_all([message(hub, 2, idempotent=True)])
        blink.down = False
        (again,) = await hub.accept_all([message(hub, 1, idempotent=True)])
        assert (first.spooled, second.spooled) == (False, True)
        assert (again.event_id, again.duplicate) == (first.event_id, True)


async def test_a_spooled_keys_repeat_beside_an_event_the_full_spool_refuses_keeps_its_id(
    config: Config, store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """maria's message 1 was spooled in an outage, and filled the spool. The store answers
    again; before the drain imports message 1, the sender delivers a batch: message 1 again
    and message 2. Message 2 cannot be spooled, so the batch goes to the store, but message
    1's repeat must stay the spooled original's duplicate: stored as a new event, the drain
    then drops the original, and the id the first request was answered never exists."""
    async with blinking_hub(config, store, tmp_path, monkeypatch, spool_bytes=1) as (
        hub,
        blink,
    ):  # full after one
        (first,) = await hub.accept_all([message(hub, 1, idempotent=True)])
        blink.down = False
        again, second = await hub.accept_all(
            [message(hub, 1, idempotent=True), message(hub, 2, idempotent=True)]
        )
        assert (first.spooled, second.spooled) == (True, False)
        assert (again.event_id, again.duplicate) == (first.event_id, True)
        assert hub.spool is not None
        await hub.spool.drain(store)
        for result in (first, second):
            assert await store.get_event(result.event_id, "clinica-sol") is not None


@contextmanager
def disk_full_past(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes of a file fail as on a full disk: part of the bytes are
    written, then EFBIG (RLIMIT_FSIZE, its signal ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def failing_once(real: Callable[..., None]) -> Callable[..., None]:
    """`os.fsync` or `os.ftruncate` whose first call fails as a dying disk does (EIO)."""
    calls = 0

    def call(*args: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(*args)

    return call


@pytest.mark.parametrize("fault", ["torn write", "torn write, cut fails", "fsync fails"])
async def test_a_failed_spool_write_loses_nothing_acknowledged_after_it(
    store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """A write that fails part-way (disk full, EIO) or whose fsync fails is answered with an
    error and cut from its segment: the events acknowledged after it drain too, and the one
    refused is not imported as if it had been acknowledged."""
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    # Large, so that the logs written meanwhile stay far below the file size limit.
    await spool.append(msgspec.structs.replace(new_event(1), payload='"' + "x" * 10**5 + '"'))
    limit = spool.stats().bytes + len(encode(new_event(2))) // 2
    with monkeypatch.context() as faults, contextlib.ExitStack() as disk:
        if fault == "fsync fails":
            faults.setattr(os, "fsync", failing_once(os.fsync))
        else:
            disk.enter_context(disk_full_past(limit))
        if fault == "torn write, cut fails":
            faults.setattr(os, "ftruncate", failing_once(os.ftruncate))
        with pytest.raises(HttpError) as refused:
            await spool.append(new_event(2))
    assert refused.value.status == 503 and refused.value.headers["Retry-After"]
    for n in range(3, 8):
        await spool.append(new_event(n))
    assert await spool.drain(store) == 6
    stored = [n for n in range(1, 8) if await store.get_event(f"evt_{n:026d}", None)]
    assert stored == [1, 3, 4, 5, 6, 7]
    assert spool.stats().segments == 0
    await spool.close()


async def test_an_event_the_store_refuses_is_quarantined_and_the_rest_drains(
    store: SqlStore, tmp_path: Path
) -> None:
    """One spooled event the store refuses (here a priority outside the schema's range) must
    not keep every later one in the spool: it goes, as written, to quarantine/, once."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    poison = event_named(
        "evt_" + "9" * 26,
        NewDelivery(id="dlv_" + "9" * 26, destination_id="crm", priority=9, max_attempts=3),
    )
    first = spool_dir / "0000000000001-host-1-000000001.journal"
    first.write_bytes(encode(new_event(1)) + encode(poison) + encode(new_event(2)))
    (spool_dir / "0000000000002-host-1-000000002.journal").write_bytes(encode(new_event(3)))
    spool = Spool(spool_dir, max_bytes=10**6)
    quarantined = REGISTRY.get_sample_value("estafeta_spool_quarantined_total") or 0
    with capture_logs() as logs:
        assert await spool.drain(store) == 3
        assert await spool.drain(store) == 0  # nothing left to trip over
    for n in (1, 2, 3):
        assert await store.get_event(f"evt_{n:026d}", None) is not None
    assert await store.get_event(poison.id, None) is None
    assert spool.stats().segments == 0
    [kept] = (spool_dir / "quarantine").iterdir()
    assert kept.name == f"{first.stem}-{poison.id}.journal"  # sorts with segments, if moved back
    assert read_segment(kept) == [poison]
    [line] = [entry for entry in logs if entry["event"] == "spool_event_quarantined"]
    assert (line["event_id"], line["tenant_id"], line["source_id"]) == (
        poison.id,
        "clinica-sol",
        "crm-events",
    )
    assert line["error"] == "StoreRejected" and poison.payload not in str(line)
    assert REGISTRY.get_sample_value("estafeta_spool_quarantined_total") == quarantined + 1
    await spool.close()


async def test_an_event_quarantined_in_a_round_cut_short_is_not_quarantined_again(
    store: SqlStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain stopped between chunks (the process told to stop) keeps its segment whole for
    the next round: an event of it refused and quarantined before the stop was quarantined
    again there, a second error line and count for the operator to chase."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    poison = event_named(
        "evt_" + "9" * 26,
        NewDelivery(id="dlv_" + "9" * 26, destination_id="crm", priority=9, max_attempts=3),
    )
    records = [encode(new_event(n)) for n in range(DRAIN_CHUNK + 10)]
    records.insert(3, encode(poison))  # in the first chunk
    (spool_dir / "0000000000001-host-1-000000001.journal").write_bytes(b"".join(records))
    spool = Spool(spool_dir, max_bytes=10**6)
    stop = asyncio.Event()
    imports = spool._import

    async def import_then_stop(*args: Any) -> int:
        imported = await imports(*args)
        stop.set()  # SIGTERM arrives while the first chunk is imported
        return imported

    before = REGISTRY.get_sample_value("estafeta_spool_quarantined_total") or 0
    with capture_logs() as logs:
        monkeypatch.setattr(spool, "_import", import_then_stop)
        assert await spool.drain(store, stop) == DRAIN_CHUNK - 1
        assert spool.stats().segments == 1
        monkeypatch.setattr(spool, "_import", imports)
        assert await spool.drain(store) == DRAIN_CHUNK + 10  # the first chunk again
    assert spool.stats().segments == 0
    assert [path.name for path in (spool_dir / "quarantine").iterdir()] == [
        f"0000000000001-host-1-000000001-{poison.id}.journal"
    ]
    quarantined = [entry for entry in logs if entry["event"] == "spool_event_quarantined"]
    assert len(quarantined) == 1
    assert REGISTRY.get_sample_value("estafeta_spool_quarantined_total") == before + 1
    await spool.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_an_event_holding_a_value_its_column_cannot_hold_is_quarantined(
    store: SqlStore, tmp_path: Path
) -> None:
    """A data exception (SQLSTATE class 22, here a number past PostgreSQL's integer) is the
    event's own refusal, as a constraint's is: quarantined, the rest drained; only a refusal
    of the store's own state (unreachable, a role without INSERT) keeps them all waiting."""
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    poison = event_named(
        "evt_" + "9" * 26,
        NewDelivery(id="dlv_" + "9" * 26, destination_id="crm", priority=1, max_attempts=2**40),
    )
    for event in (new_event(1), poison, new_event(2)):
        await spool.append(event)
    with capture_logs() as logs:
        assert await spool.drain(store) == 2
    [line] = [entry for entry in logs if entry["event"] == "spool_event_quarantined"]
    assert (line["event_id"], line["error"]) == (poison.id, "StoreRejected")
    assert spool.stats().segments == 0
    await spool.close()


async def test_spooled_and_quarantined_events_are_readable_by_their_owner_only(
    config: Config, store: SqlStore, tmp_path: Path
) -> None:
    """Segments and quarantined events hold message text and phone numbers; they were made
    with the umask's mode, under the usual 022 readable by every user of the machine."""
    spool_dir = tmp_path / "spool"
    with umask(0o022):
        unreachable = open_store(UNREACHABLE)
        hub = Hub(config, unreachable, spool=Spool(spool_dir, max_bytes=10**6))
        await accept(hub, 1)
        await hub.close()
        await unreachable.close()
        [segment] = spool_dir.glob("*.journal")
        assert (mode(spool_dir), mode(segment)) == (0o700, 0o600)

        poison = event_named(
            "evt_" + "9" * 26,
            NewDelivery(id="dlv_" + "9" * 26, destination_id="crm", priority=9, max_attempts=3),
        )
        (spool_dir / "0000000000002-host-1-000000002.journal").write_bytes(encode(poison))
        spool = Spool(spool_dir, max_bytes=10**6)
        assert await spool.drain(store) == 1
        await spool.close()
    [kept] = (spool_dir / "quarantine").iterdir()
    assert (mode(spool_dir / "quarantine"), mode(kept)) == (0o700, 0o600)


async def test_a_record_that_no_longer_decodes_is_quarantined_as_written(
    store: SqlStore, tmp_path: Path
) -> None:
    """A whole record (its checksum right) that does not decode as an event, as one written
    by another version might not, stopped the drain on every round, keeping every later
    event in the spool."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    stranger = orjson.dumps({"id": "evt_from_another_version", "tenant": "clinica-sol"})
    record = struct.pack(">II", len(stranger), zlib.crc32(stranger)) + stranger
    segment = spool_dir / "0000000000001-host-1-000000001.journal"
    segment.write_bytes(encode(new_event(1)) + record + encode(new_event(2)))
    spool = Spool(spool_dir, max_bytes=10**6)
    with capture_logs() as logs:
        assert await spool.drain(store) == 2
    for n in (1, 2):
        assert await store.get_event(f"evt_{n:026d}", None) is not None
    assert spool.stats().segments == 0
    [kept] = (spool_dir / "quarantine").iterdir()
    assert (kept.name, kept.read_bytes()) == (f"{segment.stem}-record000001.journal", record)
    [line] = [entry for entry in logs if entry["event"] == "spool_event_quarantined"]
    assert (line["segment"], line["error"]) == (segment.name, "ValidationError")
    await spool.close()


async def test_a_webhook_whose_events_do_not_all_fit_on_disk_is_refused_whole(
    down_hub: Hub, store: SqlStore, tmp_path: Path
) -> None:
    """A webhook's events are accepted together or refused together: a request answered
    503 is retried by its sender, so an event of it left in the spool is delivered twice."""
    spool = down_hub.spool
    assert spool is not None
    await accept(down_hub, 0)  # the segment exists, and the logs' file is far below the limit
    big = '"' + "x" * 5000 + '"'
    one, two = (msgspec.structs.replace(new_event(n), payload=big, deliveries=()) for n in (1, 2))
    limit = spool.stats().bytes + len(encode(one)) + 100  # room for one of them, not both
    with disk_full_past(limit), pytest.raises(HttpError) as refused:
        await down_hub.accept_all([one, two])
    assert refused.value.status == 503
    assert await spool.drain(store) == 1  # event 0 alone
    assert await store.get_event(one.id, None) is None


async def test_with_every_descriptor_taken_the_open_segment_takes_webhooks_and_no_500(
    down_hub: Hub, store: SqlStore
) -> None:
    """With every descriptor taken (a flood of client connections) and the store out of
    reach, a webhook the spool can write to its open segment is spooled (202); one that
    needs a new segment is refused 503 `spool_unavailable` with a Retry-After its sender
    honours, never a 500. Both once the spool has been listed, as every webhook lists it."""
    from tests.conftest import signed
    from tests.integration.test_ingress_api import MESSAGE

    transport = httpx.ASGITransport(app=create_app(down_hub))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:

        async def post(n: int) -> httpx.Response:
            headers = signed(MESSAGE, f"msg_{n}")
            return await http.post("/in/crm-events", content=MESSAGE, headers=headers)

        with out_of_descriptors():
            refused = await post(1)  # no segment is open: a new one needs a descriptor
        first = await post(2)  # opens a segment
        with out_of_descriptors():
            taken = await post(3)
    assert (refused.status_code, refused.json()["error"]) == (503, "spool_unavailable")
    assert refused.headers["retry-after"]
    for accepted in (first, taken):
        assert accepted.status_code == 202 and accepted.headers["x-estafeta-spooled"] == "1"
    assert down_hub.spool is not None
    assert await down_hub.spool.drain(store) == 2
    for accepted in (first, taken):
        assert await store.get_event(accepted.json()["id"], None) is not None


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_store_that_refuses_the_drains_writes_keeps_the_spool_and_says_why(
    store: SqlStore, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store answers again after an outage, but its role may not write (a replica
    promoted without the grants, a role recreated): the drain took the refusal for the
    events' own and quarantined every spooled event, a file and an error line each, for an
    operator to move back by hand. They stay spooled until the store takes them, and the
    drainer says why, once, instead of crashing."""
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    for n in range(3):
        await spool.append(new_event(n))
    async with store_as_role(database_url, "nowrite", "SELECT") as (reader, role):
        rounds = 0
        stop = asyncio.Event()
        real_drain = spool.drain

        async def three_rounds(store: SqlStore, until: asyncio.Event | None = None) -> int:
            nonlocal rounds
            try:
                return await real_drain(store, until)
            finally:
                rounds += 1
                if rounds == 3 or not spool.stats().segments:  # nothing more to try
                    stop.set()

        monkeypatch.setattr(spool, "drain", three_rounds)
        with capture_logs() as logs:
            await SpoolDrainer(spool, reader, interval_s=0.01).run(stop)
        monkeypatch.undo()
        assert not (tmp_path / "spool" / "quarantine").exists()
        assert spool.stats().segments == 1
        failed = [e for e in logs if e["event"] == "spool_drain_failed"]
        assert [e["error"] for e in failed] == [
            "the store failed: permission denied for table events (SQLSTATE 42501)"
        ], logs
        await execute(database_url, f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"')
        assert await spool.drain(reader) == 3
    for n in range(3):
        assert await store.get_event(f"evt_{n:026d}", None) is not None
    await spool.close()


# On SQLite the store's ping fails first out of descriptors (a new connection): the round
# never reaches the listing, so only PostgreSQL (pooled connections answer) shows these.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_with_every_descriptor_taken_the_drainer_waits_for_the_next_round(
    down_hub: Hub, store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events were spooled, the store answers again, and every descriptor is taken (a
    flood of client connections): `stats()` reports the spool as last listed, so the
    drainer tries, and listing the directory failed with EMFILE. The drainer crashed
    (`task_crashed`, restarted only after its pause, the task shown down in
    /health/detailed); it now tries again at its next round, as when the store is down."""
    ids = [await accept(down_hub, n) for n in range(3)]
    spool = down_hub.spool
    assert spool is not None and spool.stats().segments == 1
    stop = asyncio.Event()
    real_drain = spool.drain

    async def one_round(store: SqlStore, until: asyncio.Event | None = None) -> int:
        try:
            return await real_drain(store, until)
        finally:
            stop.set()

    monkeypatch.setattr(spool, "drain", one_round)
    with out_of_descriptors():
        await SpoolDrainer(spool, store, interval_s=0.01).run(stop)  # raised OSError
    monkeypatch.undo()
    assert await spool.drain(store) == 3
    for event_id in ids:
        assert await store.get_event(event_id, None) is not None


# On SQLite the store's ping fails first out of descriptors (a new connection): the round
# never reaches the listing, so only PostgreSQL (pooled connections answer) shows these.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_with_every_descriptor_taken_a_drain_round_keeps_the_open_segment(
    down_hub: Hub, store: SqlStore
) -> None:
    """With every descriptor taken, ingest that needs a new database connection spools,
    while the store answers the drainer's ping on a pooled one. The round closed the
    open segment, then could not list the directory: every webhook after it needed a new
    segment, a descriptor, and was refused 503 though the open one would have taken it."""
    spool = down_hub.spool
    assert spool is not None
    first = await accept(down_hub, 1)
    with out_of_descriptors():
        with contextlib.suppress(OSError, StoreUnavailable):  # this round cannot drain
            await spool.drain(store)
        second = await accept(down_hub, 2)  # raised HttpError 503 spool_unavailable
    assert await spool.drain(store) == 2
    for event_id in (first, second):
        assert await store.get_event(event_id, None) is not None
