"""The store's ingest: events stored with their deliveries, deduplicated by key.

The hot path of every webhook: a batch is stored in one transaction, and each event's fate
says whether it was stored or is a duplicate, and of which event (`fates`). The general path
lives here; each engine replaces `_store_candidates` with a faster one for plain webhooks, and
builds its batch inserts from the same column tuples (`event_row`, `delivery_rows`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from estafeta.delivery.state import DeliveryState
from estafeta.errors import StoreError
from estafeta.store import schema as s
from estafeta.store.base import in_chunks
from estafeta.store.messaging import MessagingOps
from estafeta.store.records import InsertResult, NewEvent

# The state and lease columns of a delivery stored without a lease.
UNLEASED = (DeliveryState.PENDING.value, None, None, None)
IN_FLIGHT = DeliveryState.IN_FLIGHT.value
# Keys looked up by one statement (three parameters each).
_KEYS_PER_STATEMENT = 1000

Key = tuple[str, str, str]  # (tenant, source, idempotency key): see `event_key`


@dataclass(frozen=True, slots=True)
class Inserted:
    """What a batch insert knows of its events: the ids it stored, and the original's id of
    each key it found stored already."""

    ids: set[str]
    originals: dict[Key, str] = field(default_factory=dict)

    def unanswered(self, events: Sequence[NewEvent]) -> list[NewEvent]:
        """The events neither stored nor matched to their original: on PostgreSQL, whose
        statement sees the store as it began, those whose original another process committed
        while it ran."""
        return [e for e in events if e.id not in self.ids and event_key(e) not in self.originals]


class IngestOps(MessagingOps):
    # True when the engine's `_insert_new_events` stores the events' deliveries too.
    deliveries_stored_with_events: ClassVar[bool] = False

    async def insert_events(
        self, batch: Sequence[NewEvent], *, by_id: bool = False
    ) -> list[InsertResult]:
        """Store events with their deliveries in one transaction, deduplicating by key.

        An event whose (tenant, source, idempotency key) is already stored, or appears earlier
        in the same batch, is not stored again: its result names the original event. With
        `by_id` (importing the spool, which may import a segment twice after a crash), an
        event whose id is already stored is a duplicate of itself.
        """
        first_in_batch: dict[Key, int] = {}
        candidates: list[int] = []
        for index, event in enumerate(batch):
            if event.idempotency_key is not None:
                key = event_key(event)
                if key in first_in_batch:
                    continue  # resolved below, once the first one's fate is known
                first_in_batch[key] = index
            candidates.append(index)

        fates = await self._store_candidates([batch[i] for i in candidates], by_id=by_id)
        results: list[InsertResult | None] = [None] * len(batch)
        for index, fate in zip(candidates, fates, strict=True):
            results[index] = fate
        for index, event in enumerate(batch):
            if results[index] is None:  # a repeat of a key earlier in this batch
                first = results[first_in_batch[event_key(event)]]
                assert first is not None  # noqa: S101 - candidates are all resolved
                results[index] = InsertResult(first.event_id, duplicate=True)
        return [r for r in results if r is not None]

    async def _store_candidates(
        self, events: Sequence[NewEvent], *, by_id: bool
    ) -> list[InsertResult]:
        """Store events with distinct keys, and all that comes with them, in one transaction;
        returns each one's fate in order. Engines may replace this with a faster path."""
        async with self._write() as conn:
            already = await self._existing_ids(conn, [e.id for e in events]) if by_id else set()
            to_insert = [e for e in events if e.id not in already]
            inserted = await self._insert_new_events(conn, to_insert)
            originals = await self._originals(to_insert, inserted, conn)
            stored = [e for e in to_insert if e.id in inserted.ids]
            if not self.deliveries_stored_with_events and any(e.deliveries for e in stored):
                await self._insert_deliveries(conn, stored)
            await self._record_messaging(conn, stored)
            # Inside the transaction: should an event's fate be unknown, nothing is committed,
            # and the group committer may safely store the batch again event by event.
            results = fates(events, inserted.ids, already, originals)
        return results

    async def _originals(
        self, events: Sequence[NewEvent], inserted: Inserted, conn: AsyncConnection | None
    ) -> dict[Key, str]:
        """The original of each key these events were not stored under: as the insert found
        it, and read (in `conn`'s transaction, else in a read of its own) only for those it
        did not find. Read again for every duplicate, the originals of a provider's resent
        burst cost a second lookup of keys the insert had just answered."""
        unanswered = inserted.unanswered(events)
        if not unanswered:
            return inserted.originals
        if conn is not None:
            return {**inserted.originals, **await self._ids_by_key(conn, unanswered)}
        async with self._read() as read:
            return {**inserted.originals, **await self._ids_by_key(read, unanswered)}

    async def stored_ids_by_key(self, events: Sequence[NewEvent]) -> dict[Key, str]:
        """The stored event id for each (tenant, source, key) of these events that exists."""
        async with self._read() as conn:
            return await self._ids_by_key(conn, events)

    async def _existing_ids(self, conn: AsyncConnection, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        query = select(s.events.c.id).where(s.events.c.id.in_(ids))
        return set((await conn.execute(query)).scalars().all())

    async def _ids_by_key(
        self, conn: AsyncConnection, events: Sequence[NewEvent]
    ) -> dict[Key, str]:
        """The stored event id for each (tenant, source, key) of these events that exists.
        PostgreSQL replaces this with one statement of its own (postgres.py)."""
        keys = [
            (e.tenant_id, e.source_id, e.idempotency_key)
            for e in events
            if e.idempotency_key is not None
        ]
        e = s.events
        found: dict[Key, str] = {}
        # A few statements of a bounded size rather than one: a batch of the general path may
        # hold 500 requests' events, and SQLite fails a statement past its variable limit
        # (PostgreSQL a row IN list of ~10,000 keys: 54001 "stack depth limit exceeded").
        for chunk in in_chunks(keys, _KEYS_PER_STATEMENT):
            query = select(e.c.tenant_id, e.c.source_id, e.c.idempotency_key, e.c.id).where(
                tuple_(e.c.tenant_id, e.c.source_id, e.c.idempotency_key).in_(chunk)
            )
            found.update({(t, src, k): i for t, src, k, i in (await conn.execute(query)).all()})
        return found

    @abstractmethod
    async def _insert_new_events(
        self, conn: AsyncConnection, events: Sequence[NewEvent]
    ) -> Inserted:
        """Insert the events whose key is not stored yet; returns the ids inserted and the
        originals of the keys found stored."""

    @abstractmethod
    async def _insert_deliveries(self, conn: AsyncConnection, events: Sequence[NewEvent]) -> None:
        """Insert every delivery of these (just stored) events, state pending, due now."""


def event_key(event: NewEvent) -> Key:
    """(tenant, source, idempotency key): what a duplicate shares with its original."""
    return (event.tenant_id, event.source_id, event.idempotency_key or "")


def fates(
    events: Sequence[NewEvent],
    inserted: Collection[str],
    already: Collection[str],
    existing: dict[Key, str],
) -> list[InsertResult]:
    """What happened to each event: stored, already stored under its own id (`already`), or
    a duplicate of the stored event with its key (`existing`)."""
    results: list[InsertResult] = []
    for event in events:
        if event.id in inserted:
            results.append(InsertResult(event.id, duplicate=False))
        elif event.id in already:
            results.append(InsertResult(event.id, duplicate=True))
        else:
            original = existing.get(event_key(event))
            if original is None:
                raise StoreError("an event conflicted on its key but was not found")
            results.append(InsertResult(original, duplicate=True))
    return results


def event_row(event: NewEvent) -> tuple[Any, ...]:
    """An event as the column tuple both engines' batch inserts take."""
    return (
        event.id,
        event.tenant_id,
        event.source_id,
        event.type,
        event.idempotency_key,
        event.occurred_at,
        event.received_at,
        event.payload,
        event.raw,
        event.conversation_id,
        event.message_ref,
    )


def delivery_rows(events: Sequence[NewEvent]) -> list[tuple[Any, ...]]:
    """(id, tenant, event, destination, priority, ordering key, max attempts, due, state,
    lease token, lease deadline, leased by) of each delivery of these events: the column
    tuple both engines' batch inserts take. A delivery leased as it is stored (`lease`) goes
    in flight under that lease; any other is pending."""
    rows: list[tuple[Any, ...]] = []
    for event in events:
        for d in event.deliveries:
            lease = d.lease
            rows.append(
                (
                    d.id,
                    event.tenant_id,
                    event.id,
                    d.destination_id,
                    d.priority,
                    d.ordering_key,
                    d.max_attempts,
                    event.received_at,
                    *(
                        UNLEASED
                        if lease is None
                        else (IN_FLIGHT, lease.token, lease.expires_at, lease.worker_id)
                    ),
                )
            )
    return rows
