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
from sqlalchemy import ColumnElement, Select, func, select

from estafeta.delivery.state import QUEUE_STATES, DeliveryState
from estafeta.store import schema as s
from estafeta.store.base import StoreBase, written_in
from estafeta.store.records import AttemptView, DeliveryView, EventView, QueueDepths, QueueStats

# The attempts an event's read lists per delivery: its latest. A delivery's life holds at
# most `max_attempts` (≤ 100) of them, but each replay starts another, so a dead delivery
# replayed again and again (by a script, every hour) had its event's answer grow without end.
ATTEMPT_LOG_LIMIT = 100


def latest_attempts(delivery_ids: Sequence[str]) -> Select[Any]:
    """The latest `ATTEMPT_LOG_LIMIT` attempts of each delivery, by delivery, oldest first."""
    a = s.attempts
    recency = (
        func.row_number()
        .over(partition_by=a.c.delivery_id, order_by=(a.c.started_at.desc(), a.c.id.desc()))
        .label("recency")
    )
    ranked = select(a, recency).where(a.c.delivery_id.in_(delivery_ids)).subquery()
    return (
        select(*(ranked.c[column.name] for column in a.columns))
        .where(ranked.c.recency <= ATTEMPT_LOG_LIMIT)
        .order_by(ranked.c.delivery_id, ranked.c.started_at, ranked.c.id)
    )


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
            attempt_rows = (await conn.execute(latest_attempts(ids))).all() if ids else []
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

    async def queue_depths(self) -> QueueDepths:
        """Pending, in-flight and dead deliveries, each counted on its state's partial index
        (the alerts' question, asked every few seconds: no scan of the succeeded history)."""
        async with self._read() as conn:
            pending, in_flight, dead = (await conn.execute(queue_depths_query())).one()
        return QueueDepths(pending=int(pending), in_flight=int(in_flight), dead=int(dead))

    async def queue_stats(
        self, tenant_id: str | None = None, *, history: bool = False
    ) -> QueueStats:
        """How many deliveries are in each state (those with none left out), and the earliest
        due time among pending ones.

        By default the queue's states only (pending, in flight, dead), each counted on an
        index that holds that state alone (or the tenant's): what /metrics and
        /health/detailed ask on every scrape, at the same cost however much history the
        store keeps (counting every state took 160 ms at 2,000,000 deliveries). `history`
        adds succeeded and discarded, a walk of every delivery ever made: for the demo, the
        tests and other small stores."""
        states = list(DeliveryState) if history else QUEUE_STATES
        async with self._read() as conn:
            row = (await conn.execute(queue_stats_query(tenant_id, states))).one()
        by_state = {state.value: int(n) for state, n in zip(states, row[1:], strict=True) if n}
        return QueueStats(by_state=by_state, oldest_pending_at=row[0])


def queue_depths_query() -> Select[Any]:
    """One row: the pending, in-flight and dead deliveries, each counted on its own partial
    index."""
    return select(
        *(
            select(func.count()).where(state_is(state)).scalar_subquery()
            for state in (DeliveryState.PENDING, DeliveryState.IN_FLIGHT, DeliveryState.DEAD)
        )
    )


def queue_stats_query(tenant_id: str | None, states: Sequence[DeliveryState]) -> Select[Any]:
    """One row: the earliest due time among pending deliveries, then the count of each of
    `states`, each a subquery of its own so that each reads its own index."""
    d = s.deliveries

    def of_tenant(query: Select[Any]) -> Select[Any]:
        return query if tenant_id is None else query.where(d.c.tenant_id == tenant_id)

    counts = [
        of_tenant(select(func.count()).where(state_is(state))).scalar_subquery() for state in states
    ]
    oldest = of_tenant(
        select(func.min(d.c.next_attempt_at)).where(state_is(DeliveryState.PENDING))
    ).scalar_subquery()
    return select(oldest, *counts)


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
