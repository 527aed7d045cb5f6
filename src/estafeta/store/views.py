"""The store's reads for the API, the CLI and health: an event with its deliveries and their
attempts, and the queue's counts.

Nothing here writes: every read goes to the read engine (on SQLite a second one, so that reads
never queue behind writes), and answers with the records of records.py. The delivery view
(`delivery_view_query`, `delivery_view`) is shared with the dead-letter queue's list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Executable,
    ScalarSelect,
    Select,
    func,
    literal_column,
    select,
    text,
    union_all,
)

from estafeta.delivery.state import QUEUE_STATES, DeliveryState
from estafeta.store import schema as s
from estafeta.store.base import SQL_DIR, StoreBase, found_values, in_chunks, written_in
from estafeta.store.records import AttemptView, DeliveryView, EventView, QueueDepths, QueueStats

# The attempts an event's read lists per delivery: its latest. A delivery's life holds at
# most `max_attempts` (≤ 100) of them, but each replay starts another, so a dead delivery
# replayed again and again (by a script, every hour) had its event's answer grow without end.
ATTEMPT_LOG_LIMIT = 100
# Deliveries whose attempts one statement reads: a UNION ALL of one query each, well under
# SQLite's 500 terms of a compound statement.
ATTEMPT_LOG_CHUNK = 100

# The queue's counts (/metrics, /health/detailed) count each state's deliveries one by one up
# to this many, ~35 ms on PostgreSQL: a million pending took 0.35 s a scrape, a walk that
# grows with the backlog (past READ_TIMEOUT_S near ten million, the gauge then missing just
# when an operator looks). Past it, PostgreSQL's estimate (`QueueStats.estimated`).
QUEUE_COUNT_LIMIT = 100_000
# The index that holds each state of the queue alone (schema.py), whose rows PostgreSQL
# estimates.
STATE_INDEXES = {
    DeliveryState.PENDING.value: "deliveries_destination_due",
    DeliveryState.IN_FLIGHT.value: "deliveries_lease_expiry",
    DeliveryState.DEAD.value: "deliveries_dead",
}
# Each of those indexes' order, in which SQLite counts the hub's rows of a state. It keeps no
# statistics (nothing runs ANALYZE) and so takes a partial index for as large as its table:
# an unordered count walked deliveries_tenant_state, every delivery ever made, on every
# scrape, health check and alerts' round (0.2-0.4 s at a million deliveries, growing with
# them towards READ_TIMEOUT_S). In its index's order, the index is what it reads. Not on
# PostgreSQL: its statistics find the index, and an order could add a sort.
STATE_ORDERS = {
    DeliveryState.PENDING: ("destination_id", "priority", "next_attempt_at", "id"),
    DeliveryState.IN_FLIGHT: ("lease_expires_at",),
    DeliveryState.DEAD: ("updated_at", "id"),
}
_ESTIMATED_ROWS = text((SQL_DIR / "estimated_rows_postgresql.sql").read_text())
# Every priority a delivery may have (the schema's deliveries_priority_range).
PRIORITIES = range(5)
# The earliest due time among pending deliveries: each destination found by the lease's
# index (a loose index scan), then the first due of each of its priorities, by that index.
_EARLIEST_DUE = text(
    f"""
    WITH RECURSIVE {found_values("deliveries", "destination_id", "state = 'pending'")}
    SELECT min((SELECT d.next_attempt_at FROM deliveries AS d
                WHERE d.state = 'pending' AND d.destination_id = found.value
                  AND d.priority = p.priority
                ORDER BY d.next_attempt_at LIMIT 1))
    FROM found, ({" UNION ALL ".join(f"SELECT {n} AS priority" for n in PRIORITIES)}) AS p
    WHERE found.value IS NOT NULL
    """  # noqa: S608 - the store's own names and numbers, never input
)


def latest_attempts(delivery_ids: Sequence[str]) -> Select[Any]:
    """The latest `ATTEMPT_LOG_LIMIT` attempts of each delivery, by delivery, oldest first:
    each delivery's a backward range of attempts_delivery, that many rows at most, where
    ranking them all walked and sorted every attempt of a delivery replayed again and again."""
    a = s.attempts
    latest = union_all(
        *(
            select(a)
            .where(a.c.delivery_id == delivery_id)
            .order_by(a.c.started_at.desc(), a.c.id.desc())
            .limit(ATTEMPT_LOG_LIMIT)
            .subquery()
            .select()
            for delivery_id in delivery_ids
        )
    ).subquery()
    return select(latest).order_by(latest.c.delivery_id, latest.c.started_at, latest.c.id)


class ViewOps(StoreBase):
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
                    delivery_view_query()
                    .where(s.deliveries.c.event_id == event_id)
                    .order_by(s.deliveries.c.id)
                )
            ).all()
            ids = [r.id for r in delivery_rows]
            attempt_rows = [
                row
                for chunk in in_chunks(ids, ATTEMPT_LOG_CHUNK)
                for row in (await conn.execute(latest_attempts(chunk))).all()
            ]
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
                delivery_view(r, tuple(by_delivery.get(r.id, ()))) for r in delivery_rows
            ),
        )

    async def queue_depths(self, counted_to: int = QUEUE_COUNT_LIMIT) -> QueueDepths:
        """Pending, in-flight and dead deliveries, each counted on its state's partial index
        (the alerts' question, asked every few seconds: no scan of the succeeded history),
        and each to `counted_to` at most: the alerts ask whether one reached a threshold."""
        async with self._read() as conn:
            pending, in_flight, dead = (
                await conn.execute(queue_depths_query(self.dialect, counted_to))
            ).one()
        return QueueDepths(pending=int(pending), in_flight=int(in_flight), dead=int(dead))

    async def queue_stats(
        self,
        tenant_id: str | None = None,
        *,
        history: bool = False,
        counted_to: int = QUEUE_COUNT_LIMIT,
    ) -> QueueStats:
        """How many deliveries are in each state (those with none left out), and the earliest
        due time among pending ones.

        By default the queue's states only (pending, in flight, dead), each counted on an
        index that holds that state alone (or the tenant's), and each to `counted_to`: what
        /metrics and /health/detailed ask on every scrape, at the same cost however much
        history the store keeps (counting every state took 160 ms at 2,000,000 deliveries)
        and however large an outage's backlog. A state counted to `counted_to` is in
        `estimated`: on PostgreSQL, the whole hub's (no `tenant_id`) takes the engine's
        estimate of its rows when that is larger; otherwise it stays `counted_to`, "at
        least". `history` adds succeeded and discarded, exactly, a walk of every delivery
        ever made: for the demo, the tests and other small stores."""
        states = list(DeliveryState) if history else QUEUE_STATES
        bound = None if history else counted_to
        async with self._read() as conn:
            row = (
                await conn.execute(queue_stats_query(tenant_id, states, bound, self.dialect))
            ).one()
            oldest = (await conn.execute(earliest_due_query(tenant_id))).scalar()
            by_state = {state.value: int(n) for state, n in zip(states, row, strict=True) if n}
            estimated = {s for s, n in by_state.items() if bound is not None and n >= bound}
            if estimated and tenant_id is None and self.dialect == "postgresql":
                names = [STATE_INDEXES[s] for s in sorted(estimated)]
                rows = await conn.execute(_ESTIMATED_ROWS, {"names": names})
                guesses = {index: int(n) for index, n in rows.all()}
                for state in estimated:
                    by_state[state] = max(by_state[state], guesses.get(STATE_INDEXES[state], 0))
        return QueueStats(
            by_state=by_state, oldest_pending_at=oldest, estimated=frozenset(estimated)
        )


def counted(query: Select[Any], counted_to: int | None) -> ScalarSelect[Any]:
    """How many rows `query` selects: to `counted_to` at most (a walk of that many index
    entries at most, in `query`'s order), or all of them (None)."""
    if counted_to is None:
        return query.with_only_columns(func.count()).order_by(None).scalar_subquery()
    rows = query.with_only_columns(literal_column("1")).limit(counted_to).subquery()
    return select(func.count()).select_from(rows).scalar_subquery()


def in_state(state: DeliveryState, dialect: str) -> Select[Any]:
    """The hub's deliveries in `state`: on SQLite in the order of the state's index, when it
    has one (STATE_ORDERS)."""
    d = s.deliveries
    query = select(d.c.id).where(state_is(state))
    if dialect != "sqlite":
        return query
    return query.order_by(*(d.c[name] for name in STATE_ORDERS.get(state, ())))


def queue_depths_query(dialect: str, counted_to: int = QUEUE_COUNT_LIMIT) -> Select[Any]:
    """One row: the pending, in-flight and dead deliveries, each counted on its own partial
    index, to `counted_to` at most (the statement for `dialect`'s engine)."""
    return select(
        *(
            counted(in_state(state, dialect), counted_to)
            for state in (DeliveryState.PENDING, DeliveryState.IN_FLIGHT, DeliveryState.DEAD)
        )
    )


def queue_stats_query(
    tenant_id: str | None, states: Sequence[DeliveryState], counted_to: int | None, dialect: str
) -> Select[Any]:
    """One row: the count of each of `states` (to `counted_to` at most, or all), each a
    subquery of its own so that each reads its own index."""
    d = s.deliveries

    def of_tenant(state: DeliveryState) -> Select[Any]:
        if tenant_id is None:
            return in_state(state, dialect)
        # A tenant's, by deliveries_tenant_state (its own rows of the state), in no order.
        return select(d.c.id).where(state_is(state), d.c.tenant_id == tenant_id)

    return select(*(counted(of_tenant(state), counted_to) for state in states))


def earliest_due_query(tenant_id: str | None) -> Executable:
    """One value: the earliest due time among pending deliveries (None when there is none).

    The hub's is read as the lease reads (deliveries_destination_due, by destination, then
    priority, then due time): the first of each destination's priorities, a few probes
    however large the backlog (a min() over every pending delivery took 0.2 s at a million).
    A tenant's walks its pending ones (deliveries_tenant_state): no operator read asks it."""
    if tenant_id is None:
        return _EARLIEST_DUE
    d = s.deliveries
    return select(func.min(d.c.next_attempt_at)).where(
        state_is(DeliveryState.PENDING), d.c.tenant_id == tenant_id
    )


def state_is(state: DeliveryState) -> ColumnElement[bool]:
    """`deliveries.state = '<state>'`, for the partial indexes of one state."""
    return s.deliveries.c.state == written_in(state.value)


def delivery_view_query() -> Select[Any]:
    """Deliveries with their event's type: the rows `delivery_view` reads."""
    d = s.deliveries
    return select(d, s.events.c.type.label("event_type")).join(
        s.events, s.events.c.id == d.c.event_id
    )


def delivery_view(r: Any, attempt_log: tuple[AttemptView, ...] = ()) -> DeliveryView:
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
