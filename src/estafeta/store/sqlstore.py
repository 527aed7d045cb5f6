"""The store: every query estafeta runs, as named operations over SQLAlchemy Core.

One class serves SQLite and PostgreSQL; what differs between the engines (connection set-up,
the lease statement, the INSERT … ON CONFLICT construct) lives in `sqlite.py` and
`postgres.py`. Runtime code outside this package holds no SQL.

Every state change of a delivery is a guarded update (`… WHERE state = 'in_flight' AND
lease_token = :token`), so a late result from a worker whose lease expired and was rescued
never overwrites what happened since.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from abc import abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.state import DeliveryState
from estafeta.errors import StoreError, StoreUnavailable
from estafeta.ids import new_id
from estafeta.messaging.facts import SEND_DESTINATION_PREFIX
from estafeta.store import schema as s
from estafeta.store.base import store_errors, unavailable
from estafeta.store.messaging import MessagingOps
from estafeta.store.records import (
    AttemptView,
    CompletedAttempt,
    DeadLetterFilter,
    DeliveryView,
    EventView,
    InsertResult,
    NewEvent,
    QueueStats,
)

if TYPE_CHECKING:
    from estafeta.config import Config

SQL_DIR = Path(__file__).parent / "sql"
# When a delivery `d` is due for a lease: one definition for both engines' lease statements.
_DUE = "\n".join(
    line for line in (SQL_DIR / "due.sql").read_text().splitlines() if not line.startswith("--")
)


def _with_due(sql: str) -> str:
    """`sql` with due.sql's conditions, indented as its `/* due */` markers are."""
    return re.sub(
        r"^( *)/\* due \*/$",
        lambda marker: textwrap.indent(_DUE, marker.group(1)),
        sql,
        flags=re.MULTILINE,
    )


# The state and lease columns of a delivery stored without a lease.
UNLEASED = (DeliveryState.PENDING.value, None, None, None)
IN_FLIGHT = DeliveryState.IN_FLIGHT.value
# Each destination with a pending delivery: the next one after the last, by the index.
_PENDING_DESTINATIONS = text(
    """
    WITH RECURSIVE pending(destination_id) AS (
        SELECT min(destination_id) FROM deliveries WHERE state = 'pending'
        UNION ALL
        SELECT (SELECT min(d.destination_id) FROM deliveries AS d
                WHERE d.state = 'pending' AND d.destination_id > pending.destination_id)
        FROM pending
        WHERE pending.destination_id IS NOT NULL
    )
    SELECT destination_id FROM pending WHERE destination_id IS NOT NULL
    """
)


class SqlStore(MessagingOps):
    """Base class; use `open_store(url)` to get the one for an engine."""

    dialect: ClassVar[str]
    lease_sql_file: ClassVar[str]
    # True when the engine's `_insert_new_events` stores the events' deliveries too.
    deliveries_stored_with_events: ClassVar[bool] = False

    def __init__(self, engine: AsyncEngine, read_engine: AsyncEngine | None = None) -> None:
        super().__init__(engine, read_engine)
        self.lease_sql = _with_due((SQL_DIR / self.lease_sql_file).read_text())

    async def migrate(self) -> None:
        """Create or upgrade the schema to the newest migration."""
        from estafeta.store.migrate import upgrade

        try:
            await upgrade(self.engine)
        except Exception as exc:
            if unavailable(exc):
                raise StoreUnavailable(
                    f"the store cannot be reached: {type(exc).__name__}"
                ) from None  # not chained: a driver's text may quote data (store/base.py)
            raise

    async def require_schema(self) -> None:
        """Refuse a database whose schema is not this version's (never migrated, or by an
        older or newer estafeta): its statements would fail one by one with the driver's
        own errors, far from the cause."""
        from estafeta.store.migrate import current_revision, head_revision

        with store_errors():
            current = await current_revision(self.engine)
        head = head_revision()
        if current != head:
            found = (
                "has no estafeta schema"
                if current is None
                else f"has the schema of migration {current}, not this version's {head}"
            )
            raise StoreError(
                f"the database {found}: run `estafeta migrate` "
                "(`estafeta serve` also migrates at start, unless --no-migrate)"
            )

    # -- configuration ----------------------------------------------------------------------

    async def sync_config(self, config: Config, now_ms: int) -> None:
        """Upsert the configuration's tenants, sources, destinations and routes."""
        tenants: list[dict[str, Any]] = [
            {"id": t.id, "name": t.name, "ingress_rate_limit": t.ingress_rate_limit}
            for t in config.tenants
        ]
        sources: list[dict[str, Any]] = [
            {"id": x.id, "tenant_id": x.tenant, "kind": x.kind} for x in config.sources
        ]
        destinations: list[dict[str, Any]] = [
            {"id": d.id, "tenant_id": d.tenant, "kind": d.kind, "url": d.url}
            for d in config.destinations
        ]
        routes: list[dict[str, Any]] = [
            {
                "id": route_id,
                "tenant_id": r.tenant,
                "events": orjson.dumps(r.events).decode(),
                "filter": r.filter,
                "destinations": orjson.dumps(r.destinations).decode(),
                "priority": r.priority,
                "ordering_key": r.ordering_key,
            }
            for route_id, r in zip(config.route_ids(), config.routes, strict=True)
        ]
        async with self._write() as conn:
            for table, rows in (
                (s.tenants, tenants),
                (s.sources, sources),
                (s.destinations, destinations),
                (s.routes, routes),
            ):
                for row in rows:
                    row["updated_at"] = now_ms
                    stmt = self._insert(table).values(**row)
                    stmt = stmt.on_conflict_do_update(
                        index_elements=["id"],
                        set_={k: getattr(stmt.excluded, k) for k in row if k != "id"},
                    )
                    await conn.execute(stmt)

    # -- ingest -----------------------------------------------------------------------------

    async def insert_events(
        self, batch: Sequence[NewEvent], *, by_id: bool = False
    ) -> list[InsertResult]:
        """Store events with their deliveries in one transaction, deduplicating by key.

        An event whose (tenant, source, idempotency key) is already stored, or appears earlier
        in the same batch, is not stored again: its result names the original event. With
        `by_id` (importing the spool, which may import a segment twice after a crash), an
        event whose id is already stored is a duplicate of itself.
        """
        first_in_batch: dict[tuple[str, str, str], int] = {}
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
            existing = await self._ids_by_key(conn, [e for e in to_insert if e.id not in inserted])
            stored = [e for e in to_insert if e.id in inserted]
            if not self.deliveries_stored_with_events and any(e.deliveries for e in stored):
                await self._insert_deliveries(conn, stored)
            await self._record_messaging(conn, stored)
            # Inside the transaction: should an event's fate be unknown, nothing is committed,
            # and the group committer may safely store the batch again event by event.
            results = fates(events, inserted, already, existing)
        return results

    async def _existing_ids(self, conn: AsyncConnection, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        query = select(s.events.c.id).where(s.events.c.id.in_(ids))
        return set((await conn.execute(query)).scalars().all())

    async def _ids_by_key(
        self, conn: AsyncConnection, events: Sequence[NewEvent]
    ) -> dict[tuple[str, str, str], str]:
        """The stored event id for each (tenant, source, key) of these events that exists."""
        keys = [
            (e.tenant_id, e.source_id, e.idempotency_key)
            for e in events
            if e.idempotency_key is not None
        ]
        if not keys:
            return {}
        e = s.events
        query = select(e.c.tenant_id, e.c.source_id, e.c.idempotency_key, e.c.id).where(
            tuple_(e.c.tenant_id, e.c.source_id, e.c.idempotency_key).in_(keys)
        )
        return {(t, src, k): i for t, src, k, i in (await conn.execute(query)).all()}

    @abstractmethod
    async def _insert_new_events(
        self, conn: AsyncConnection, events: Sequence[NewEvent]
    ) -> set[str]:
        """Insert the events whose key is not stored yet; returns the ids inserted."""

    @abstractmethod
    async def _insert_deliveries(self, conn: AsyncConnection, events: Sequence[NewEvent]) -> None:
        """Insert every delivery of these (just stored) events, state pending, due now."""

    # -- the delivery lifecycle -------------------------------------------------------------

    async def lease(
        self,
        *,
        now_ms: int,
        rooms: Mapping[str, int],
        lease_ms: int,
        worker_id: str,
        limit: int | None = None,
        sending: Mapping[str, int] | None = None,
    ) -> list[LeasedDelivery]:
        """Lease up to `limit` due deliveries (default: as many as the rooms hold), at most
        `rooms[d]` of each destination `d`; a destination not named keeps its deliveries.
        Best first (sql/lease_*.sql): highest priority, then the destination with the fewest
        in flight (`sending[d]`, and those this lease takes), then FIFO."""
        rooms = {d: room for d, room in rooms.items() if room > 0}
        total = sum(rooms.values()) if limit is None else min(limit, sum(rooms.values()))
        if total <= 0:
            return []
        sending = sending or {}
        params = _lease_params(
            now_ms,
            lease_ms,
            worker_id,
            limit=total,
            destinations=list(rooms),
            rooms=list(rooms.values()),
            sending=[sending.get(d, 0) for d in rooms],
        )
        return _leased_batch(await self._lease_rows(params), params)

    @abstractmethod
    async def _lease_rows(self, params: dict[str, Any]) -> list[Any]:
        """The rows the engine's lease statement returns for `params`."""

    async def pending_destinations(self) -> set[str]:
        """Every destination with a pending delivery, due or not: one index probe per
        destination (a loose scan of deliveries_destination_due), however large the
        backlog."""
        async with self._read() as conn:
            return {row[0] for row in await conn.execute(_PENDING_DESTINATIONS)}

    async def complete(self, batch: Sequence[CompletedAttempt], now_ms: int) -> int:
        """Record attempts and apply their transitions; returns how many were applied.

        A transition whose lease is no longer held (expired and rescued, or released) is not
        applied; its attempt is still recorded, because it did happen.
        """
        if not batch:
            return 0
        async with self._write() as conn:
            await conn.execute(s.attempts.insert(), [attempt_row(item) for item in batch])
            applied = await self._apply_transitions(conn, batch, now_ms)
            await self._record_sends(conn, batch, now_ms)
        return applied

    async def _apply_transitions(
        self, conn: AsyncConnection, batch: Sequence[CompletedAttempt], now_ms: int
    ) -> int:
        """The guarded update of each delivery (one executemany; PostgreSQL overrides it)."""
        updates = [
            {
                "b_id": item.delivery.id,
                "b_token": item.delivery.lease_token,
                "b_state": item.transition.to_state.value,
                "b_attempts": item.transition.attempts,
                "b_next": next_attempt(item, now_ms),
                "b_error": item.transition.last_error,
                "b_now": now_ms,
            }
            for item in batch
        ]
        stmt = (
            update(s.deliveries)
            .where(
                s.deliveries.c.id == bindparam("b_id"),
                s.deliveries.c.state == DeliveryState.IN_FLIGHT.value,
                s.deliveries.c.lease_token == bindparam("b_token"),
            )
            .values(
                state=bindparam("b_state"),
                attempts=bindparam("b_attempts"),
                next_attempt_at=bindparam("b_next"),
                last_error=bindparam("b_error"),
                lease_token=None,
                lease_expires_at=None,
                leased_by=None,
                updated_at=bindparam("b_now"),
            )
        )
        result = await conn.execute(stmt, updates)
        return max(result.rowcount, 0)

    async def release(
        self, deliveries: Iterable[LeasedDelivery], now_ms: int, *, due_at: int | None = None
    ) -> int:
        """Give leases back unused: pending again, due at `due_at` (default now), no attempt
        counted. Used at graceful shutdown, and to snooze a delivery whose destination is
        over its rate limit."""
        held = [(d.id, d.lease_token) for d in deliveries]
        if not held:
            return 0
        d = s.deliveries
        stmt = (
            update(d)
            .where(
                tuple_(d.c.id, d.c.lease_token).in_(held),
                d.c.state == DeliveryState.IN_FLIGHT.value,
            )
            .values(
                state=DeliveryState.PENDING.value,
                next_attempt_at=now_ms if due_at is None else due_at,
                lease_token=None,
                lease_expires_at=None,
                leased_by=None,
                updated_at=now_ms,
            )
        )
        async with self._write() as conn:
            result = await conn.execute(stmt)
        return max(result.rowcount, 0)

    async def claim_expired(
        self, *, now_ms: int, lease_ms: int, worker_id: str, limit: int = 500
    ) -> list[LeasedDelivery]:
        """Take over in-flight deliveries whose lease deadline passed (their worker is gone).

        The claim gives each a new token and deadline in one statement, so of several workers
        rescuing at once exactly one owns each row; the caller then records the lost attempt
        and applies its transition with `complete` under the new token. (FOR UPDATE SKIP
        LOCKED on PostgreSQL; SQLite renders no locking clause and has one writer anyway.)
        """
        d = s.deliveries
        token = secrets.token_hex(8)
        deadline = now_ms + lease_ms
        expired = (
            select(d.c.id)
            .where(d.c.state == DeliveryState.IN_FLIGHT.value, d.c.lease_expires_at <= now_ms)
            .order_by(d.c.lease_expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        stmt = (
            update(d)
            .where(
                d.c.id.in_(expired),
                d.c.state == DeliveryState.IN_FLIGHT.value,
                d.c.lease_expires_at <= now_ms,
            )
            .values(lease_token=token, lease_expires_at=deadline, leased_by=worker_id)
            .returning(
                d.c.id,
                d.c.tenant_id,
                d.c.event_id,
                d.c.destination_id,
                d.c.attempts,
                d.c.max_attempts,
                d.c.priority,
                d.c.ordering_key,
            )
        )
        async with self._write() as conn:
            rows = (await conn.execute(stmt)).all()
        # Rescued leases are never sent: no due time, no payload.
        return [_leased((*r, None, ""), token, deadline) for r in rows]

    # -- the dead-letter queue --------------------------------------------------------------

    def _dead_conditions(self, f: DeadLetterFilter) -> list[ColumnElement[bool]]:
        d = s.deliveries
        conditions: list[ColumnElement[bool]] = [d.c.state == DeliveryState.DEAD.value]
        if f.tenant_id is not None:
            conditions.append(d.c.tenant_id == f.tenant_id)
        if f.delivery_ids:
            conditions.append(d.c.id.in_(f.delivery_ids))
        if f.destination_id is not None:
            conditions.append(d.c.destination_id == f.destination_id)
        if f.event_type is not None:
            conditions.append(
                d.c.event_id.in_(select(s.events.c.id).where(s.events.c.type == f.event_type))
            )
        if f.since is not None:
            conditions.append(d.c.updated_at >= f.since)
        if f.until is not None:
            conditions.append(d.c.updated_at < f.until)
        return conditions

    async def list_dead(self, f: DeadLetterFilter) -> list[DeliveryView]:
        query = (
            _delivery_view_query()
            .where(*self._dead_conditions(f))
            .order_by(s.deliveries.c.updated_at, s.deliveries.c.id)
            .limit(f.batch)
        )
        async with self._read() as conn:
            return [_delivery_view(r) for r in (await conn.execute(query)).all()]

    async def replay(self, f: DeadLetterFilter, *, actor: str, now_ms: int) -> list[str]:
        """Dead → pending with fresh attempts; recorded in the audit log. Returns the ids."""
        return await self._move_dead(f, actor=actor, now_ms=now_ms, action="replay")

    async def discard(self, f: DeadLetterFilter, *, actor: str, now_ms: int) -> list[str]:
        """Dead → discarded (final); recorded in the audit log. Returns the ids."""
        return await self._move_dead(f, actor=actor, now_ms=now_ms, action="discard")

    async def _move_dead(
        self, f: DeadLetterFilter, *, actor: str, now_ms: int, action: str
    ) -> list[str]:
        d = s.deliveries
        chosen = select(d.c.id).where(*self._dead_conditions(f)).limit(f.batch)
        if action == "replay":
            values: dict[str, Any] = {
                "state": DeliveryState.PENDING.value,
                "attempts": 0,
                "next_attempt_at": now_ms,
                "replays": d.c.replays + 1,
                "updated_at": now_ms,
            }
        else:
            values = {"state": DeliveryState.DISCARDED.value, "updated_at": now_ms}
        async with self._write() as conn:
            ids = list((await conn.execute(chosen)).scalars().all())
            if not ids:
                return []
            stmt = (
                update(d)
                .where(d.c.id.in_(ids), d.c.state == DeliveryState.DEAD.value)
                .values(**values)
                .returning(d.c.id, d.c.tenant_id, d.c.destination_id)
            )
            moved = (await conn.execute(stmt)).all()
            if action == "replay":
                await self._requeue_sends(
                    conn,
                    [i for i, _, dest in moved if dest.startswith(SEND_DESTINATION_PREFIX)],
                    now_ms,
                )
            per_tenant: dict[str, list[str]] = {}
            for delivery_id, tenant_id, _ in moved:
                per_tenant.setdefault(tenant_id, []).append(delivery_id)
            for tenant_id, delivery_ids in per_tenant.items():
                await conn.execute(
                    s.audit_log.insert().values(
                        id=new_id("aud", now_ms),
                        tenant_id=tenant_id,
                        at=now_ms,
                        actor=actor,
                        action=f"dlq.{action}",
                        detail=orjson.dumps(
                            {"deliveries": sorted(delivery_ids), "count": len(delivery_ids)}
                        ).decode(),
                    )
                )
        return sorted(delivery_id for delivery_id, _, _ in moved)

    # -- reads for the API, the CLI and health ----------------------------------------------

    async def get_event(self, event_id: str, tenant_id: str | None) -> EventView | None:
        """The event with its deliveries and their attempts; None if absent or not the tenant's."""
        e = s.events
        query = select(e).where(e.c.id == event_id)
        if tenant_id is not None:
            query = query.where(e.c.tenant_id == tenant_id)
        async with self._read() as conn:
            row = (await conn.execute(query)).first()
            if row is None:
                return None
            delivery_rows = (
                await conn.execute(
                    _delivery_view_query()
                    .where(s.deliveries.c.event_id == event_id)
                    .order_by(s.deliveries.c.id)
                )
            ).all()
            ids = [r.id for r in delivery_rows]
            attempt_rows = (
                (
                    await conn.execute(
                        select(s.attempts)
                        .where(s.attempts.c.delivery_id.in_(ids))
                        .order_by(s.attempts.c.delivery_id, s.attempts.c.started_at)
                    )
                ).all()
                if ids
                else []
            )
        by_delivery: dict[str, list[AttemptView]] = {}
        for a in attempt_rows:
            by_delivery.setdefault(a.delivery_id, []).append(
                AttemptView(
                    id=a.id,
                    number=a.number,
                    started_at=a.started_at,
                    duration_ms=a.duration_ms,
                    outcome=a.outcome,
                    status_code=a.status_code,
                    error_class=a.error_class,
                    response_excerpt=a.response_excerpt,
                )
            )
        return EventView(
            id=row.id,
            tenant_id=row.tenant_id,
            source_id=row.source_id,
            type=row.type,
            idempotency_key=row.idempotency_key,
            occurred_at=row.occurred_at,
            received_at=row.received_at,
            payload=orjson.loads(row.payload),
            deliveries=tuple(
                _delivery_view(r, tuple(by_delivery.get(r.id, ()))) for r in delivery_rows
            ),
        )

    async def pending_count(self) -> int:
        """Pending deliveries, counted on the partial lease index (the backlog alert's
        question, asked every few seconds: no scan of the succeeded history)."""
        d = s.deliveries
        query = select(func.count()).where(d.c.state == DeliveryState.PENDING.value)
        async with self._read() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def queue_stats(self, tenant_id: str | None = None) -> QueueStats:
        d = s.deliveries
        counts = select(d.c.state, func.count()).group_by(d.c.state)
        oldest = select(func.min(d.c.next_attempt_at)).where(
            d.c.state == DeliveryState.PENDING.value
        )
        if tenant_id is not None:
            counts = counts.where(d.c.tenant_id == tenant_id)
            oldest = oldest.where(d.c.tenant_id == tenant_id)
        async with self._read() as conn:
            by_state = {state: int(n) for state, n in (await conn.execute(counts)).all()}
            oldest_at = (await conn.execute(oldest)).scalar()
        return QueueStats(by_state=by_state, oldest_pending_at=oldest_at)

    # -- circuit breakers (when no Redis is configured) ------------------------------------

    async def circuit_states(self) -> dict[str, dict[str, Any]]:
        """Every stored circuit, by destination id (the breaker's own JSON form)."""
        async with self._read() as conn:
            rows = (
                await conn.execute(select(s.circuits.c.destination_id, s.circuits.c.data))
            ).all()
        return {destination_id: orjson.loads(data) for destination_id, data in rows}

    async def update_circuit(
        self,
        destination_id: str,
        change: Callable[[dict[str, Any] | None], dict[str, Any]],
        now_ms: int,
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Read-modify-write one circuit atomically across processes; (before, after).

        The row is locked for the transaction (FOR UPDATE on PostgreSQL; SQLite's write
        lock is already held since BEGIN IMMEDIATE), so concurrent updates serialise.
        """
        c = s.circuits
        async with self._write() as conn:
            # Make sure the row exists first: FOR UPDATE locks rows, and a missing row is no
            # lock at all, so two first updates would both read "nothing" and one be lost.
            placeholder = self._insert(c).values(
                destination_id=destination_id, data="null", updated_at=now_ms
            )
            await conn.execute(
                placeholder.on_conflict_do_nothing(index_elements=["destination_id"])
            )
            found = (
                await conn.execute(
                    select(c.c.data).where(c.c.destination_id == destination_id).with_for_update()
                )
            ).scalar_one()
            before = orjson.loads(found)
            after = change(before)
            await conn.execute(
                update(c)
                .where(c.c.destination_id == destination_id)
                .values(data=orjson.dumps(after).decode(), updated_at=now_ms)
            )
        return before, after

    # -- API keys ---------------------------------------------------------------------------

    async def create_api_key(
        self, *, tenant_id: str, key_hash: str, label: str, now_ms: int
    ) -> str:
        key_id = new_id("key", now_ms)
        async with self._write() as conn:
            await conn.execute(
                s.api_keys.insert().values(
                    id=key_id,
                    tenant_id=tenant_id,
                    key_hash=key_hash,
                    label=label,
                    created_at=now_ms,
                )
            )
        return key_id

    async def tenant_for_key(self, key_hash: str) -> str | None:
        """The tenant owning an unrevoked key with this hash, or None."""
        k = s.api_keys
        query = select(k.c.tenant_id).where(
            and_(k.c.key_hash == key_hash, k.c.revoked_at.is_(None))
        )
        async with self._read() as conn:
            return (await conn.execute(query)).scalar()

    async def tenant_exists(self, tenant_id: str) -> bool:
        query = select(s.tenants.c.id).where(s.tenants.c.id == tenant_id)
        async with self._read() as conn:
            return (await conn.execute(query)).first() is not None


def _lease_params(now_ms: int, lease_ms: int, worker_id: str, **more: Any) -> dict[str, Any]:
    """The parameters every lease statement takes, with a new lease token."""
    return {
        "now": now_ms,
        "token": secrets.token_hex(8),
        "deadline": now_ms + lease_ms,
        "worker": worker_id,
        **more,
    }


def _leased_batch(rows: list[Any], params: Mapping[str, Any]) -> list[LeasedDelivery]:
    """The rows a lease statement run with `params` returned, by priority, due time and id:
    (id, tenant, event, destination, attempts, max_attempts, priority, ordering key, due,
    payload). Neither engine orders an UPDATE's RETURNING."""
    rows.sort(key=lambda r: (r[6], r[8], r[0]))
    return [_leased(r, params["token"], params["deadline"]) for r in rows]


def _leased(r: Any, token: str, deadline: int) -> LeasedDelivery:
    """A row of the lease statement (by position) as the worker holds it under this lease."""
    return LeasedDelivery(
        id=r[0],
        tenant_id=r[1],
        event_id=r[2],
        destination_id=r[3],
        attempts=r[4],
        max_attempts=r[5],
        priority=r[6],
        ordering_key=r[7],
        lease_token=token,
        lease_expires_at=deadline,
        payload=r[9].encode(),
    )


def attempt_row(item: CompletedAttempt) -> dict[str, Any]:
    """The `attempts` row of one completed attempt."""
    return {
        "id": item.attempt_id,
        "tenant_id": item.delivery.tenant_id,
        "delivery_id": item.delivery.id,
        "number": item.delivery.attempts + 1,
        "started_at": item.started_at,
        "duration_ms": item.outcome.duration_ms,
        "outcome": item.outcome.kind.value,
        "status_code": item.outcome.status_code,
        "error_class": item.outcome.error_class,
        "response_excerpt": item.outcome.response_excerpt,
    }


def event_key(event: NewEvent) -> tuple[str, str, str]:
    """(tenant, source, idempotency key): what a duplicate shares with its original."""
    return (event.tenant_id, event.source_id, event.idempotency_key or "")


def fates(
    events: Sequence[NewEvent],
    inserted: Collection[str],
    already: Collection[str],
    existing: dict[tuple[str, str, str], str],
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


def next_attempt(item: CompletedAttempt, now_ms: int) -> int:
    """When the delivery is due next; final states keep `now` (the column is NOT NULL)."""
    due = item.transition.next_attempt_at
    return due if due is not None else now_ms


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


def _delivery_view_query() -> Select[Any]:
    d = s.deliveries
    return select(d, s.events.c.type.label("event_type")).join(
        s.events, s.events.c.id == d.c.event_id
    )


def _delivery_view(r: Any, attempt_log: tuple[AttemptView, ...] = ()) -> DeliveryView:
    return DeliveryView(
        id=r.id,
        tenant_id=r.tenant_id,
        event_id=r.event_id,
        event_type=r.event_type,
        destination_id=r.destination_id,
        state=r.state,
        priority=r.priority,
        attempts=r.attempts,
        max_attempts=r.max_attempts,
        next_attempt_at=r.next_attempt_at,
        last_error=r.last_error,
        replays=r.replays,
        created_at=r.created_at,
        updated_at=r.updated_at,
        attempt_log=attempt_log,
    )
