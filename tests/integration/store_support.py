"""What the store tests share (test_store.py, test_store_lifecycle_model.py, test_upgrades.py):
events with their deliveries as ingest stores them, customers' messages, and attempts as a
worker completes them; an event's one delivery as the API shows it (the store and worker
tests); the mode of the files the store and the spool make (test_spool.py); and the rows a
command left (the CLI tests)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from msgspec.structs import replace
from sqlalchemy import insert, make_url, text

from estafeta.delivery.decision import Transition
from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.outcome import Outcome, OutcomeKind
from estafeta.delivery.state import DeliveryState
from estafeta.ids import new_id
from estafeta.store import open_store
from estafeta.store import schema as s
from estafeta.store.records import CompletedAttempt, DeliveryView, NewDelivery, NewEvent
from estafeta.store.sqlstore import SqlStore
from tests.acceptance.conftest import execute

NOW = 1_700_000_000_000


async def only_delivery(
    store: SqlStore, event_id: str, tenant_id: str | None = None
) -> DeliveryView:
    """The one delivery of the event, as the API shows it (to `tenant_id` when given)."""
    view = await store.get_event(event_id, tenant_id)
    assert view is not None
    [delivery] = view.deliveries
    return delivery


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """The process's umask set to `mask` for the block: what a file gets when made without
    a mode of its own."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def rows(database_url: str, sql: str) -> list[tuple[Any, ...]]:
    """What `sql` reads from the store at `database_url`, from a test that is not async."""

    async def read() -> list[tuple[Any, ...]]:
        store = open_store(database_url)
        try:
            async with store.engine.connect() as conn:
                return [tuple(r) for r in await conn.execute(text(sql))]
        finally:
            await store.close()

    return asyncio.run(read())


def event(
    key: str | None = None,
    *,
    tenant: str = "clinica-sol",
    source: str = "crm-events",
    destinations: tuple[str, ...] = ("crm",),
    priority: int = 2,
    at: int = NOW,
    event_type: str = "message.received",
    ordering_key: str | None = None,
    max_attempts: int = 3,
    make_id: Callable[[str, int], str] = new_id,
) -> NewEvent:
    """An event received at `at` (its deliveries are due then), one delivery to each of
    `destinations`; `make_id(prefix, at)` names the event and each delivery."""
    event_id = make_id("evt", at)
    return NewEvent(
        id=event_id,
        tenant_id=tenant,
        source_id=source,
        type=event_type,
        idempotency_key=key,
        occurred_at=at,
        received_at=at,
        payload=f'{{"id":"{event_id}","type":"{event_type}","data":{{}}}}',
        deliveries=tuple(
            NewDelivery(
                id=make_id("dlv", at),
                destination_id=d,
                priority=priority,
                max_attempts=max_attempts,
                ordering_key=ordering_key,
            )
            for d in destinations
        ),
    )


def message(
    wamid: str, customer: str, at: int, *, name: str | None, direction: str = "inbound"
) -> NewEvent:
    """A customer's message (or, `outbound`, one sent to them) at `at`, keyed `wamid`."""
    base = event(wamid, at=at)
    return replace(base, conversation_id=customer, direction=direction, contact_name=name)


def keyed(key: str, at: int, destination: str = "crm") -> NewEvent:
    """An event without an idempotency key whose one delivery has the ordering key `key`."""
    return event(at=at, destinations=(destination,), ordering_key=key)


def attempt(
    delivery: LeasedDelivery,
    to: DeliveryState,
    *,
    kind: OutcomeKind = OutcomeKind.SUCCESS,
    at: int = NOW,
    next_at: int | None = None,
    attempt_id: str | None = None,
) -> CompletedAttempt:
    """An attempt started at `at` under `delivery`'s lease, moving it `to` a state; a retry
    (`to` pending) is due at `next_at`, by default a second later."""
    status = 200 if kind is OutcomeKind.SUCCESS else 500
    return CompletedAttempt(
        delivery=delivery,
        outcome=Outcome(
            kind, 3.5, status_code=status, error_class=None if status == 200 else "http_500"
        ),
        transition=Transition(
            to_state=to,
            attempts=delivery.attempts + 1,
            next_attempt_at=(at + 1000 if next_at is None else next_at)
            if to is DeliveryState.PENDING
            else None,
            last_error=None if to is DeliveryState.SUCCEEDED else "http_500: Internal Server Error",
        ),
        started_at=at,
        attempt_id=new_id("att", at) if attempt_id is None else attempt_id,
    )


async def dead_deliveries(store: SqlStore, count: int) -> None:
    """`count` dead deliveries to crm, one event each, that died one a millisecond before
    NOW: written as a batch, as years of a hub's history would take to make."""
    events = [event(at=NOW - count + n) for n in range(count)]
    async with store.engine.begin() as conn:
        for chunk in range(0, count, 10_000):
            made = events[chunk : chunk + 10_000]
            await conn.execute(
                insert(s.events),
                [
                    {
                        "id": e.id,
                        "tenant_id": e.tenant_id,
                        "source_id": e.source_id,
                        "type": e.type,
                        "occurred_at": e.occurred_at,
                        "received_at": e.received_at,
                        "payload": e.payload,
                    }
                    for e in made
                ],
            )
            await conn.execute(
                insert(s.deliveries),
                [
                    {
                        "id": e.deliveries[0].id,
                        "tenant_id": e.tenant_id,
                        "event_id": e.id,
                        "destination_id": "crm",
                        "state": "dead",
                        "priority": 2,
                        "attempts": 3,
                        "max_attempts": 3,
                        "next_attempt_at": e.received_at,
                        "last_error": "http_503: Service Unavailable",
                        "created_at": e.received_at,
                        "updated_at": e.received_at,
                    }
                    for e in made
                ],
            )


@asynccontextmanager
async def store_as_role(
    database_url: str, name: str, *grants: str
) -> AsyncIterator[tuple[SqlStore, str]]:
    """The PostgreSQL store `database_url` (migrated) opened as a role of its own, named
    `estafeta_<name>_<database>` (roles belong to the server: another run's must not clash),
    granted only `grants` on its tables (`"SELECT"`: a grant missed when the database was set
    up); the store and the role's name, for the test to grant or revoke more. Dropped after."""
    role = f"estafeta_{name}_{make_url(database_url).database}"
    await execute(
        database_url,
        f'CREATE ROLE "{role}" LOGIN',
        *(f'GRANT {grant} ON ALL TABLES IN SCHEMA public TO "{role}"' for grant in grants),
    )
    opened = open_store(make_url(database_url).set(username=role).render_as_string(False))
    try:
        yield opened, role
    finally:
        await opened.close()
        await execute(database_url, f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"')
