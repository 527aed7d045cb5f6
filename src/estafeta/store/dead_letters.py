"""The store's dead-letter queue: list the dead deliveries an operator selects, replay them
(dead → pending) or discard them (dead → discarded).

One selection (`DeadLetterFilter`, by ids or by destination, type and time) serves the three.
A move is a guarded update (`… WHERE state = 'dead'`), written to the audit log in the same
transaction, and a replayed message send's message is queued again with it. A large move is
made `_MOVED_PER_TRANSACTION` at a time, each batch its own transaction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import ColumnElement, Select, case, func, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from estafeta.delivery.state import DeliveryState
from estafeta.messaging.facts import SEND_DESTINATION_PREFIX
from estafeta.store import schema as s
from estafeta.store.audit import audit
from estafeta.store.messaging import MessagingOps
from estafeta.store.records import DeadGroup, DeadLetterFilter, DeliveryView
from estafeta.store.views import delivery_view, delivery_view_query, state_is

# The order of every selection: a limited list shows what a move with its limit would take.
_OLDEST_DEATH_FIRST = (s.deliveries.c.updated_at, s.deliveries.c.id)
# Most dead deliveries one transaction moves. A replay of every one after an outage
# (`dlq replay --all --limit 1000000`) was one transaction: SQLite's one write lock held
# 2 s a 100,000, every webhook and worker waiting for it (ingest spooled past 5 s), and on
# either engine no replayed delivery could be sent before the last was replayed. A batch
# holds the lock ~20 ms; its ids are as many parameters, well under every driver's limit.
_MOVED_PER_TRANSACTION = 1_000


def dead_conditions(f: DeadLetterFilter) -> list[ColumnElement[bool]]:
    """The dead deliveries `f` selects: read by an index of dead ones alone (deliveries_dead,
    a destination's deliveries_dead_destination, or the tenant's by state), never by a walk
    of the history."""
    d = s.deliveries
    conditions: list[ColumnElement[bool]] = [state_is(DeliveryState.DEAD)]
    if f.tenant_id is not None:
        conditions.append(d.c.tenant_id == f.tenant_id)
    if f.delivery_ids:
        conditions.append(d.c.id.in_(f.delivery_ids))
    if f.destination_id is not None:
        conditions.append(d.c.destination_id == f.destination_id)
    if f.event_type is not None:
        # Probed by the event's primary key for each dead delivery: SQLite made `event_id IN
        # (SELECT id FROM events WHERE type = …)` a scan of every event ever stored, each
        # page of the list (0.1-0.4 s at 300,000 events) and each batch of a move.
        typed = s.events.alias("typed")
        conditions.append(
            select(typed.c.id)
            .where(typed.c.id == d.c.event_id, typed.c.type == f.event_type)
            .exists()
        )
    if f.since is not None:
        conditions.append(d.c.updated_at >= f.since)
    if f.until is not None:
        conditions.append(d.c.updated_at < f.until)
    if f.after is not None:
        # A row comparison: an index range on (updated_at, id), where an OR would be a walk.
        conditions.append(tuple_(*_OLDEST_DEATH_FIRST) > tuple_(*f.after))
    return conditions


def _limits_of(chosen: Sequence[tuple[str, str]], limits: Mapping[str, int]) -> dict[str, Any]:
    """The `max_attempts` that the `chosen` deliveries (id, destination) take when replayed:
    their destination's in `limits` (the configuration in force), else the stored one. Only
    the destinations chosen are named: two parameters each, beside the chunk's ids."""
    taken = {dest: limits[dest] for _, dest in chosen if dest in limits}
    if not taken:
        return {}
    d = s.deliveries
    return {"max_attempts": case(taken, value=d.c.destination_id, else_=d.c.max_attempts)}


def dead_list_query(f: DeadLetterFilter) -> Select[Any]:
    """What `list_dead` reads: the selected dead deliveries, oldest death first."""
    return (
        delivery_view_query()
        .where(*dead_conditions(f))
        .order_by(*_OLDEST_DEATH_FIRST)
        .limit(f.batch)
    )


@dataclass
class MoveProgress:
    """A move of dead deliveries as its batches commit, for a command that may be stopped
    (`dlq replay` on Ctrl-C) or fail between them: the ids of the batches committed so far,
    and whether to stop before the next batch."""

    moved: list[str] = field(default_factory=list)
    stop: bool = False
    # Whether `stop` left deliveries of the selection unmoved: one asked for while the last
    # batch was moved ends nothing, and the move is whole.
    cut: bool = False
    # Whether the limit left deliveries of the selection dead: a command that says only how
    # many it moved reads the same as one that moved them all.
    more: bool = False


class DeadLetterOps(MessagingOps):
    async def list_dead(self, f: DeadLetterFilter) -> list[DeliveryView]:
        query = dead_list_query(f)
        async with self._read() as conn:
            return [delivery_view(r) for r in (await conn.execute(query)).all()]

    async def dead_summary(self, f: DeadLetterFilter) -> list[DeadGroup]:
        """The selected dead deliveries (all of them: `f.limit` is not applied) counted by
        tenant, destination and last error, the largest groups first: what thousands of
        lines of `dlq list` would say."""
        d = s.deliveries
        count = func.count().label("n")
        query = (
            select(
                d.c.tenant_id,
                d.c.destination_id,
                d.c.last_error,
                count,
                func.min(d.c.updated_at),
                func.max(d.c.updated_at),
            )
            .where(*dead_conditions(f))
            .group_by(d.c.tenant_id, d.c.destination_id, d.c.last_error)
            .order_by(count.desc(), d.c.tenant_id, d.c.destination_id, d.c.last_error)
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [DeadGroup(*row) for row in rows]

    async def replay(
        self,
        f: DeadLetterFilter,
        *,
        actor: str,
        now_ms: int,
        limits: Mapping[str, int] | None = None,
        progress: MoveProgress | None = None,
    ) -> list[str]:
        """Dead → pending with fresh attempts; recorded in the audit log. Returns the ids.

        `limits`: the `max_attempts` of each destination in the configuration in force
        (delivery/attempts.py: attempt_limits), which the replayed deliveries take: the
        operator may have raised it before replaying. A destination it lacks keeps the
        stored limit."""
        return await self._move_dead(
            f, actor=actor, now_ms=now_ms, action="replay", limits=limits or {}, progress=progress
        )

    async def discard(
        self, f: DeadLetterFilter, *, actor: str, now_ms: int, progress: MoveProgress | None = None
    ) -> list[str]:
        """Dead → discarded (final); recorded in the audit log. Returns the ids."""
        return await self._move_dead(
            f, actor=actor, now_ms=now_ms, action="discard", limits={}, progress=progress
        )

    async def _move_dead(
        self,
        f: DeadLetterFilter,
        *,
        actor: str,
        now_ms: int,
        action: str,
        limits: Mapping[str, int],
        progress: MoveProgress | None = None,
    ) -> list[str]:
        """The selected dead deliveries moved, `_MOVED_PER_TRANSACTION` at a time, each batch
        audited in its own transaction: interrupted, the batches committed stay moved (and
        are in `progress`, which can stop the move between batches)."""
        progress = progress or MoveProgress()
        d = s.deliveries
        position = tuple_(*_OLDEST_DEATH_FIRST)
        # The newest death selected when the move begins: those replayed that die again
        # meanwhile die after it, and are not replayed twice by one command (nor a death
        # after it taken, as one transaction would not have seen it).
        newest = (
            select(*_OLDEST_DEATH_FIRST)
            .where(*dead_conditions(f))
            .order_by(*(column.desc() for column in _OLDEST_DEATH_FIRST))
            .limit(1)
        )
        async with self._read() as conn:
            last = (await conn.execute(newest)).first()
        moved = progress.moved
        step, left = f, f.batch
        while last is not None and left > 0:
            if progress.stop:
                progress.cut = True
                break
            size = min(left, _MOVED_PER_TRANSACTION)
            step = replace(step, limit=size)
            chosen = (
                select(d.c.id, d.c.destination_id, d.c.updated_at)
                .where(*dead_conditions(step), position <= tuple_(*last))
                .order_by(*_OLDEST_DEATH_FIRST)
                .limit(step.batch)
            )
            async with self._write() as conn:
                began = time.monotonic()  # the lock is held from here to the commit
                selected = (await conn.execute(chosen)).all()
                if not selected:
                    break
                pairs = [(row.id, row.destination_id) for row in selected]
                batch = await self._move_batch(conn, pairs, actor, now_ms, action, limits)
            moved.extend(batch)  # once committed
            left -= len(selected)
            if len(selected) < size:
                break  # the selection ran out: a stop asked for now leaves nothing unmoved
            if self.dialect == "sqlite":
                # The write lock left free as long as the batch held it: a writer waiting
                # for it (ingest, a worker) retries at SQLite's busy-handler pauses, up to
                # 100 ms apart, and the next batch's BEGIN IMMEDIATE at once took it first.
                await asyncio.sleep(time.monotonic() - began)
            # The next batch starts after this one (an index range): each batch reads on,
            # whatever another operator's move of the same rows left dead or not.
            step = replace(step, after=(selected[-1].updated_at, selected[-1].id))
        if last is not None and left <= 0:
            progress.more = await self._any_dead(step, last)
        return sorted(moved)

    async def _any_dead(self, f: DeadLetterFilter, last: tuple[int, str]) -> bool:
        """Whether a dead delivery of `f` (after where it ended) died by `last`: one that the
        selection as the move began held, and its limit left."""
        d = s.deliveries
        query = (
            select(d.c.id)
            .where(*dead_conditions(f), tuple_(*_OLDEST_DEATH_FIRST) <= tuple_(*last))
            .limit(1)
        )
        async with self._read() as conn:
            return (await conn.execute(query)).first() is not None

    async def _move_batch(
        self,
        conn: AsyncConnection,
        chosen: Sequence[tuple[str, str]],
        actor: str,
        now_ms: int,
        action: str,
        limits: Mapping[str, int],
    ) -> list[str]:
        """Move those of the `chosen` deliveries (id, destination) still dead, in `conn`'s
        transaction."""
        d = s.deliveries
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
        stmt = (
            update(d)
            .where(
                d.c.id.in_([delivery_id for delivery_id, _ in chosen]),
                d.c.state == DeliveryState.DEAD.value,
            )
            .values(**values, **_limits_of(chosen, limits))
            .returning(d.c.id, d.c.tenant_id, d.c.destination_id)
        )
        moved = (await conn.execute(stmt)).all()
        if action == "replay":
            sends = [i for i, _, dest in moved if dest.startswith(SEND_DESTINATION_PREFIX)]
            await self._requeue_sends(conn, sends, now_ms)
        per_tenant: dict[str, list[str]] = {}
        for delivery_id, tenant_id, _ in moved:
            per_tenant.setdefault(tenant_id, []).append(delivery_id)
        for tenant_id, delivery_ids in per_tenant.items():
            await audit(
                conn,
                tenant_id=tenant_id,
                actor=actor,
                action=f"dlq.{action}",
                detail={"deliveries": sorted(delivery_ids), "count": len(delivery_ids)},
                now_ms=now_ms,
            )
        return [delivery_id for delivery_id, _, _ in moved]
