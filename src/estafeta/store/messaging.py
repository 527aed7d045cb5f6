"""The store's queries about WhatsApp conversations and the messages tenants send.

Everything here is written in the transaction that stores the events it comes from: an
inbound message and its conversation counter, a queued message and its send event, an
escalation and its `conversation.escalated` event are committed together or not at all.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from estafeta.delivery.state import DeliveryState
from estafeta.messaging.facts import (
    MESSAGE_REF_MAX,
    SEND_DESTINATION_PREFIX,
    STATUS_RANK,
    current_status,
    fitted,
    status_step,
    storable,
)
from estafeta.store import schema as s
from estafeta.store.base import StoreBase
from estafeta.store.records import (
    CompletedAttempt,
    MessageView,
    NewEvent,
    StatusChange,
)


def conversation_counts(events: Sequence[NewEvent]) -> list[tuple[Any, ...]]:
    """What a batch of stored messages adds to each conversation it touches, once per
    conversation: (tenant, conversation, contact name, first and last message time, inbound
    and outbound counts, updated_at, the time of the message the name came from). The newest
    message's contact name wins, of two of one time the later in the batch: a provider's late
    redelivery of an older message must not bring back a name the customer has changed."""
    rows: dict[tuple[str, str], list[Any]] = {}
    for e in events:
        if not (e.conversation_id and e.direction):
            continue
        row = rows.setdefault(
            (e.tenant_id, e.conversation_id),
            [e.tenant_id, e.conversation_id, None, e.occurred_at, e.occurred_at, 0, 0, 0, None],
        )
        if e.contact_name and (row[8] is None or e.occurred_at >= row[8]):
            row[2], row[8] = e.contact_name, e.occurred_at
        row[3] = min(row[3], e.occurred_at)
        row[4] = max(row[4], e.occurred_at)
        row[5 if e.direction == "inbound" else 6] += 1
        row[7] = max(row[7], e.received_at)
    return [tuple(row) for _, row in sorted(rows.items())]  # key order: no deadlocks


class MessagingOps(StoreBase):
    # -- written with the events ------------------------------------------------------------

    async def _record_messaging(self, conn: AsyncConnection, stored: Sequence[NewEvent]) -> None:
        """Conversation counters, queued messages and escalations of just-stored events."""
        touched = [e for e in stored if e.conversation_id and e.direction]
        if touched:
            await self._count_messages(conn, touched)
        queued = [e for e in stored if e.message is not None]
        if queued:
            await conn.execute(s.messages.insert(), [_message_row(e) for e in queued])
        for event in stored:
            if event.escalation is not None:
                await self._escalate(conn, event)

    @abstractmethod
    async def _count_messages(self, conn: AsyncConnection, events: Sequence[NewEvent]) -> None:
        """Add just-stored messages to their conversations' counters (`conversation_counts`)."""

    async def _escalate(self, conn: AsyncConnection, event: NewEvent) -> None:
        escalation = event.escalation
        assert escalation is not None and event.conversation_id  # noqa: S101 - caller checks
        c = s.conversations
        await conn.execute(
            update(c)
            .where(c.c.tenant_id == event.tenant_id, c.c.id == event.conversation_id)
            .values(
                status="escalated",
                escalated_at=event.received_at,
                escalation_reason=escalation.reason,
                escalation_priority=escalation.priority,
                updated_at=event.received_at,
            )
        )
        await conn.execute(
            s.escalations.insert().values(
                id=escalation.id,
                tenant_id=event.tenant_id,
                conversation_id=event.conversation_id,
                event_id=event.id,
                reason=escalation.reason,
                priority=escalation.priority,
                actor=escalation.actor,
                at=event.received_at,
            )
        )

    async def _record_sends(
        self, conn: AsyncConnection, batch: Sequence[CompletedAttempt], now_ms: int
    ) -> None:
        """A provider accepted a message (sent, with its id or ids) or sending gave up
        (failed). The second id is stored as the ingress stores a status's `message_ref`
        (`fitted`), so that a status naming it finds it whatever its length."""
        m = s.messages
        for item in batch:
            if not item.delivery.destination_id.startswith(SEND_DESTINATION_PREFIX):
                continue
            queued = and_(m.c.delivery_id == item.delivery.id, m.c.state == "queued")
            if item.outcome.succeeded:
                alt_id = item.outcome.external_alt_id
                external_id = item.outcome.external_id
                await conn.execute(
                    update(m)
                    .where(queued)
                    .values(
                        state="sent",
                        # Stored as the ingress stores a status's `message_ref` (`fitted`):
                        # an id longer than the column, or with a NUL, must neither fail the
                        # completion (the message would be sent again at every rescue) nor
                        # miss its statuses.
                        provider_message_id=fitted(external_id, MESSAGE_REF_MAX)
                        if external_id
                        else None,
                        provider_alt_id=fitted(alt_id, MESSAGE_REF_MAX) if alt_id else None,
                        sent_at=now_ms,
                        updated_at=now_ms,
                    )
                )
            elif item.transition.to_state is DeliveryState.DEAD:
                # Only when the delivery did die: a late failure whose lease was rescued is
                # not applied to the delivery (its retry may be sending it right now), and
                # must not fail the message either.
                d = s.deliveries
                died = select(d.c.id).where(
                    d.c.id == item.delivery.id, d.c.state == DeliveryState.DEAD.value
                )
                # A NUL in the provider's words failed the completion on PostgreSQL: the
                # message stayed queued, and was sent again once its lease expired.
                await conn.execute(
                    update(m)
                    .where(queued, m.c.delivery_id.in_(died))
                    .values(state="failed", error=last_error(item), updated_at=now_ms)
                )

    async def _requeue_sends(
        self, conn: AsyncConnection, delivery_ids: Sequence[str], now_ms: int
    ) -> None:
        """Replayed sends' messages are queued again, so that the send's outcome is recorded
        on them (`_record_sends` moves only queued messages) and the provider's id they get
        ties later status webhooks to them."""
        if not delivery_ids:
            return
        m = s.messages
        await conn.execute(
            update(m)
            .where(m.c.delivery_id.in_(delivery_ids), m.c.state == "failed")
            .values(state="queued", error=None, updated_at=now_ms)
        )

    # -- reads ------------------------------------------------------------------------------

    async def message_id_for_event(self, event_id: str) -> str | None:
        m = s.messages
        async with self._read() as conn:
            found: str | None = (
                await conn.execute(select(m.c.id).where(m.c.event_id == event_id))
            ).scalar()
        return found

    async def escalated_conversation(self, tenant_id: str, event_id: str) -> str | None:
        """The conversation whose escalation `event_id` is, or None (another event)."""
        e = s.escalations
        async with self._read() as conn:
            found: str | None = (
                await conn.execute(
                    select(e.c.conversation_id).where(
                        e.c.tenant_id == tenant_id, e.c.event_id == event_id
                    )
                )
            ).scalar()
        return found

    async def get_message(self, tenant_id: str | None, message_id: str) -> MessageView | None:
        """A sent message with the provider's status webhooks that name it, in order."""
        m, e = s.messages, s.events
        query = select(m).where(m.c.id == message_id)
        if tenant_id is not None:
            query = query.where(m.c.tenant_id == tenant_id)
        async with self._read() as conn:
            row = (await conn.execute(query)).first()
            if row is None:
                return None
            statuses: list[Any] = []
            if row.provider_message_id or row.provider_alt_id:
                kinds = await _source_kinds(conn, row.tenant_id)
                statuses = list(
                    (
                        await conn.execute(
                            select(e.c.occurred_at, e.c.payload)
                            .where(
                                e.c.tenant_id == row.tenant_id,  # tenants share nothing
                                e.c.source_id.in_(_kin(kinds, row.source_id)),
                                e.c.message_ref.in_(_provider_ids(row)),
                                e.c.type == "message.status",
                            )
                            .order_by(e.c.occurred_at, e.c.id)
                        )
                    ).all()
                )
        changes: list[StatusChange] = []
        for status in statuses:
            data = orjson.loads(status.payload)["data"]
            provider = data.get("provider")
            change = StatusChange(
                status_step(data),
                status.occurred_at,
                data.get("error"),
                provider if isinstance(provider, str) else None,
            )
            # One webhook received by two of the tenant's sources (Meta retries to every
            # subscribed app) is one step of the timeline.
            if change not in changes:
                changes.append(change)
        # In the order a message goes through them, then by time: statuses arrive out of order,
        # and a time says nothing of it when it is only the arrival (Twilio's callbacks carry
        # none) or a whole second (Meta's, where delivered and read often share one).
        changes.sort(key=lambda c: (STATUS_RANK.get(c.status, -1), c.at))
        return MessageView(
            id=row.id,
            tenant_id=row.tenant_id,
            source_id=row.source_id,
            conversation_id=row.conversation_id,
            recipient=row.recipient,
            content=orjson.loads(row.content),
            state=row.state,
            provider_message_id=row.provider_message_id,
            error=row.error,
            event_id=row.event_id,
            delivery_id=row.delivery_id,
            created_at=row.created_at,
            sent_at=row.sent_at,
            provider_statuses=tuple(changes),
            # A failed message is written only when sending gives up (and again only by a
            # replay, which queues it): its `updated_at` is that moment.
            failed_at=row.updated_at if row.state == "failed" else None,
        )


async def sent_states(conn: AsyncConnection, tenant_id: str, sent: Sequence[Any]) -> dict[str, str]:
    """The state now of each of the tenant's sent messages `sent` (rows with `id`, `state`,
    `source_id`, `provider_message_id`, `provider_alt_id`), by id: the furthest of what
    sending knows and what the provider's status webhooks said, as GET /messages/{id}.

    The statuses are found by the provider's ids (`_provider_ids`) among the statuses the
    tenant's sources of the sending source's kind received (`_kin`), never by the recipient
    a webhook names: that is the customer's WhatsApp id, which can differ from the number
    sent to (a Brazilian mobile registered before the ninth digit)."""
    e = s.events
    kinds = await _source_kinds(conn, tenant_id) if sent else {}
    statuses: dict[tuple[str, str], list[str]] = {}
    by_group: dict[str, tuple[str, set[str]]] = {}  # group: (a source, its ids)
    for r in sent:
        if r.provider_message_id or r.provider_alt_id:
            group = by_group.setdefault(_group(kinds, r.source_id), (r.source_id, set()))
            group[1].update(_provider_ids(r))
    if by_group:
        named = or_(
            *(
                and_(e.c.source_id.in_(_kin(kinds, source)), e.c.message_ref.in_(sorted(refs)))
                for _, (source, refs) in sorted(by_group.items())
            )
        )
        for change in (
            await conn.execute(
                select(e.c.source_id, e.c.message_ref, e.c.payload).where(
                    named, e.c.tenant_id == tenant_id, e.c.type == "message.status"
                )
            )
        ).all():
            status = status_step(orjson.loads(change.payload)["data"])
            key = (_group(kinds, change.source_id), change.message_ref)
            statuses.setdefault(key, []).append(status)
    return {
        r.id: current_status(
            r.state,
            [
                status
                for ref in _provider_ids(r)
                for status in statuses.get((_group(kinds, r.source_id), ref), [])
            ],
        )
        for r in sent
    }


async def _source_kinds(conn: AsyncConnection, tenant_id: str) -> dict[str, str]:
    """The kind of each of the tenant's sources (a handful)."""
    src = s.sources
    rows = await conn.execute(select(src.c.id, src.c.kind).where(src.c.tenant_id == tenant_id))
    return {r.id: r.kind for r in rows}


def _group(kinds: dict[str, str], source_id: str) -> str:
    """The sources whose status webhooks may be about one another's messages: those of one
    kind (the provider's ids are its own, unique across its accounts, and one Meta app posts
    every number's webhooks to the one URL of one source); a source no longer configured is
    a group of its own, so its messages still find the statuses it received."""
    kind = kinds.get(source_id)
    return f"kind:{kind}" if kind is not None else f"source:{source_id}"


def _kin(kinds: dict[str, str], source_id: str) -> list[str]:
    """The sources of `source_id`'s group (`_group`)."""
    group = _group(kinds, source_id)
    return sorted({source_id, *(sid for sid in kinds if _group(kinds, sid) == group)})


def _provider_ids(row: Any) -> list[str]:
    """The ids the provider gave a sent message, that its status webhooks name: its message
    id and, from Z-API, the zaapId a DeliveryCallback may name it by instead."""
    return [ref for ref in (row.provider_message_id, row.provider_alt_id) if ref]


def _message_row(event: NewEvent) -> dict[str, Any]:
    message = event.message
    assert message is not None and event.conversation_id  # noqa: S101 - filtered by the caller
    return {
        "id": message.id,
        "tenant_id": event.tenant_id,
        "source_id": message.source_id,
        "conversation_id": event.conversation_id,
        "recipient": message.recipient,
        "content": message.content,
        "state": "queued",
        "event_id": event.id,
        # Hub.send_message puts the send delivery first, before anything routes add.
        "delivery_id": event.deliveries[0].id,
        "created_at": event.received_at,
        "updated_at": event.received_at,
    }


def last_error(item: CompletedAttempt) -> str | None:
    """The delivery's (and a failed message's) `last_error`, a NUL kept as U+FFFD on both
    engines, as the attempt's excerpt is (`storable`)."""
    error = item.transition.last_error
    return None if error is None else storable(error)
