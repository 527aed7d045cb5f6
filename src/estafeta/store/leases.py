"""The store's side of a worker's leases: lease due deliveries, complete them, give them back,
and take over those whose worker is gone.

A lease is what lets a worker move a delivery on: completing and releasing are guarded updates
(`… WHERE state = 'in_flight' AND lease_token = :token`), and a claim takes only leases whose
deadline passed, giving them a new token, so a late result from a worker whose lease expired
and was rescued never overwrites what happened since. The lease statement is dialect-specific
(sql/lease_*.sql, sharing due.sql's conditions); each engine runs it in `_lease_rows`, and
PostgreSQL replaces `complete` with one statement of its own.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from abc import abstractmethod
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, ClassVar

from sqlalchemy import bindparam, case, select, tuple_, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.state import DeliveryState
from estafeta.messaging.facts import storable
from estafeta.store import schema as s
from estafeta.store.base import SQL_DIR, each_value, in_chunks, written_in
from estafeta.store.messaging import MessagingOps, last_error
from estafeta.store.records import Completed, CompletedAttempt

# When a delivery `d` is due for a lease: one definition for both engines' lease statements.
_DUE = "\n".join(
    line for line in (SQL_DIR / "due.sql").read_text().splitlines() if not line.startswith("--")
)


# "No earlier delivery of its key to its destination is pending or in flight", asked of each
# row the lease reads: a probe of deliveries_ordering for each (SQLite's lease; PostgreSQL's
# joins each row to its key's first instead, LeaseOps.first_of_key).
NO_EARLIER_OF_ITS_KEY = """NOT EXISTS (
  SELECT 1 FROM deliveries AS head
  WHERE head.destination_id = d.destination_id
    AND head.ordering_key = d.ordering_key
    AND head.state IN ('pending', 'in_flight')
    AND head.id < d.id)"""


def _expanded(sql: str, snippets: Mapping[str, str]) -> str:
    """`sql` with each line that is only a `/* name */` marker replaced by `snippets[name]`,
    indented as the marker is (expanded again, so that a snippet may hold markers)."""

    def expand(marker: re.Match[str]) -> str:
        return textwrap.indent(_expanded(snippets[marker[2]], snippets), marker[1])

    pattern = r"^( *)/\* (" + "|".join(map(re.escape, snippets)) + r") \*/$"
    return re.sub(pattern, expand, sql, flags=re.MULTILINE)


# Leases one release statement names (two parameters each).
_LEASES_PER_STATEMENT = 1000

# The attempts of a completion (SQLite's: PostgreSQL's `complete` is a statement of its own).
# One recorded again because its first commit's answer was lost is written once.
_RECORD_ATTEMPTS = sqlite_insert(s.attempts).on_conflict_do_nothing(index_elements=["id"])

# Each destination with a pending delivery, by deliveries_destination_due.
_PENDING_DESTINATIONS = each_value("deliveries", "destination_id", "state = 'pending'")


class LeaseOps(MessagingOps):
    lease_sql_file: ClassVar[str]
    # due.sql's `/* first of its key */`, as this engine's lease statement words it, and any
    # other `/* name */` its statement holds.
    first_of_key: ClassVar[str] = NO_EARLIER_OF_ITS_KEY
    lease_snippets: ClassVar[Mapping[str, str]] = {}

    def __init__(self, engine: AsyncEngine, read_engine: AsyncEngine | None = None) -> None:
        super().__init__(engine, read_engine)
        self.lease_sql = _expanded(
            (SQL_DIR / self.lease_sql_file).read_text(),
            {"due": _DUE, "first of its key": self.first_of_key, **self.lease_snippets},
        )

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

    async def due_now(self, destinations: Collection[str], now_ms: int) -> int:
        """Make the pending deliveries of `destinations` that wait for a later retry due at
        `now_ms` (by deliveries_destination_due); returns how many."""
        if not destinations:
            return 0
        d = s.deliveries
        stmt = (
            update(d)
            .where(
                d.c.destination_id.in_(sorted(destinations)),
                # Written in, for the partial index (deliveries_destination_due) in a
                # prepared statement's generic plan too, as in `claim_expired`.
                d.c.state == written_in(DeliveryState.PENDING.value),
                d.c.next_attempt_at > now_ms,
            )
            .values(next_attempt_at=now_ms)
        )
        async with self._write() as conn:
            return (await conn.execute(stmt)).rowcount

    async def complete(self, batch: Sequence[CompletedAttempt], now_ms: int) -> int:
        """Record attempts and apply their transitions; returns how many were applied.

        A transition whose lease is no longer held (expired and rescued, or released) is not
        applied; its attempt is still recorded, because it did happen.
        """
        return (await self.complete_batch(batch, now_ms)).applied

    async def complete_batch(self, batch: Sequence[CompletedAttempt], now_ms: int) -> Completed:
        """`complete`, saying also which deliveries it dead-lettered: the workers count
        those, not the deaths they decided (a late one's is not applied)."""
        if not batch:
            return Completed(0)
        async with self._write() as conn:
            await conn.execute(_RECORD_ATTEMPTS, [attempt_row(item) for item in batch])
            completed = await self._apply_transitions(conn, batch, now_ms)
            await self._record_sends(conn, batch, now_ms)
        return completed

    async def _apply_transitions(
        self, conn: AsyncConnection, batch: Sequence[CompletedAttempt], now_ms: int
    ) -> Completed:
        """The guarded update of each delivery, one executemany (PostgreSQL's `complete` does
        this in its own statement and never comes here)."""
        updates = [
            {
                "b_id": item.delivery.id,
                "b_token": item.delivery.lease_token,
                "b_state": item.transition.to_state.value,
                "b_attempts": item.transition.attempts,
                "b_max": item.delivery.max_attempts,
                "b_next": next_attempt(item, now_ms),
                "b_error": last_error(item),
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
                # The limit decided with: the configuration's may have changed since it
                # was stored (delivery/attempts.py: governed).
                max_attempts=bindparam("b_max"),
                next_attempt_at=bindparam("b_next"),
                last_error=bindparam("b_error"),
                lease_token=None,
                lease_expires_at=None,
                leased_by=None,
                updated_at=bindparam("b_now"),
            )
        )
        dying = [u for u in updates if u["b_state"] == DeliveryState.DEAD.value]
        rest = [u for u in updates if u["b_state"] != DeliveryState.DEAD.value]
        applied = max((await conn.execute(stmt, rest)).rowcount, 0) if rest else 0
        # A death one statement each (they are few): its rowcount says whether it was
        # applied, which one executemany's total cannot.
        dead: set[str] = set()
        for u in dying:
            if (await conn.execute(stmt, u)).rowcount > 0:
                dead.add(str(u["b_id"]))
        return Completed(applied + len(dead), frozenset(dead))

    async def release(
        self, deliveries: Iterable[LeasedDelivery], now_ms: int, *, due_at: int | None = None
    ) -> int:
        """Give leases back unused: pending again, no attempt counted, due at `due_at` or
        by default at once in its place in the queue (its due time kept, or `now_ms` if that
        is earlier), so that deliveries accepted meanwhile do not go before it. Used at
        graceful shutdown and to give back what the worker may not send now (a spent rate
        limit, a circuit that opened)."""
        held = [(d.id, d.lease_token) for d in deliveries]
        if not held:
            return 0
        d = s.deliveries
        due = (
            case((d.c.next_attempt_at > now_ms, now_ms), else_=d.c.next_attempt_at)
            if due_at is None
            else due_at
        )
        released = 0
        async with self._write() as conn:
            # In chunks: a worker stopping with `concurrency = 10000` gives back as many, and
            # PostgreSQL fails a row IN list of ~10,000 pairs (54001 "stack depth limit
            # exceeded").
            for chunk in in_chunks(held, _LEASES_PER_STATEMENT):
                stmt = (
                    update(d)
                    .where(
                        tuple_(d.c.id, d.c.lease_token).in_(chunk),
                        d.c.state == DeliveryState.IN_FLIGHT.value,
                    )
                    .values(
                        state=DeliveryState.PENDING.value,
                        next_attempt_at=due,
                        lease_token=None,
                        lease_expires_at=None,
                        leased_by=None,
                        updated_at=now_ms,
                    )
                )
                released += max((await conn.execute(stmt)).rowcount, 0)
        return released

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
        # The state written into the statement: only then may its plan read the partial
        # index of in-flight rows (deliveries_lease_expiry). PostgreSQL keeps a prepared
        # statement's generic plan, made for any state; one made on a nearly empty table read
        # every delivery ever made at each rescue once the table grew.
        in_flight = d.c.state == written_in(DeliveryState.IN_FLIGHT.value)
        expired = (
            select(d.c.id)
            .where(in_flight, d.c.lease_expires_at <= now_ms)
            .order_by(d.c.lease_expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
            # Materialized: PostgreSQL may otherwise run a LIMIT … SKIP LOCKED subquery once
            # per row it compares, each run skipping what the last one locked, and so take
            # every expired lease however small the limit.
            .cte("expired")
            .prefix_with("MATERIALIZED")
        )
        stmt = (
            update(d)
            .where(
                d.c.id.in_(select(expired.c.id)),
                in_flight,
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
        async with self._write(proves_space=False) as conn:  # every few s, mostly finding none
            rows = (await conn.execute(stmt)).all()
        # Rescued leases are never sent: no due time, no payload.
        return [_leased((*r, None, ""), token, deadline) for r in rows]


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
        payload=r[9],  # as bytes: both statements return the text's UTF-8
    )


# A connector may name a failure by the provider's own code, of any length (SendPulse's
# `error` is a phrase): the class is cut to its column rather than failing the completion.
ERROR_CLASS_MAX: int = s.attempts.c.error_class.type.length  # type: ignore[attr-defined]


def attempt_row(item: CompletedAttempt) -> dict[str, Any]:
    """The `attempts` row of one completed attempt."""
    return {
        "id": item.attempt_id,
        "tenant_id": item.delivery.tenant_id,
        "delivery_id": item.delivery.id,
        "number": item.delivery.attempts + 1,
        "started_at": item.started_at,
        "duration_ms": item.outcome.duration_ms,
        "outcome": item.outcome.kind._value_,  # not `.value`: a property, two calls each
        "status_code": item.outcome.status_code,
        # A destination's or provider's words (a provider's code names the class too) may
        # hold a NUL: kept as U+FFFD on both engines (PostgreSQL text holds none; `pg_json`
        # does the same to its rows).
        "error_class": None
        if item.outcome.error_class is None
        else storable(item.outcome.error_class[:ERROR_CLASS_MAX]),
        "response_excerpt": storable(item.outcome.response_excerpt),
    }


def next_attempt(item: CompletedAttempt, now_ms: int) -> int:
    """When the delivery is due next; final states keep `now` (the column is NOT NULL)."""
    due = item.transition.next_attempt_at
    return due if due is not None else now_ms
