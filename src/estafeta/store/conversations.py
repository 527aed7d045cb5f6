"""The store's reads of WhatsApp conversations: the list, one conversation, its messages page
by page, and closing one.

Pages are keyset pages (no offsets): each starts strictly `after` the position of the last
row of the previous one, so that rows added meanwhile never shift a page, and a page costs
the same at the start of a conversation of thousands of messages as at its end.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Select,
    Text,
    and_,
    bindparam,
    or_,
    select,
    tuple_,
    union_all,
    update,
)

from estafeta.store import schema as s
from estafeta.store.base import StoreBase, each_value, in_chunks, written_in
from estafeta.store.messaging import sent_states
from estafeta.store.records import ConversationView, Interaction

# The position of one message in a conversation: (time, direction, id). Oldest first; at one
# instant inbound messages (events) before outbound ones (sent messages), each table's in the
# order of its ids as its engine orders them. Both the order and the `after` condition are
# computed by the engine within a table, so that a page never skips or repeats a message
# whatever the database's collation.
MessagePosition = tuple[int, str, str]
_DIRECTIONS = ("inbound", "outbound")


def _after(at: Any, id_: Any, direction: str, position: MessagePosition) -> ColumnElement[bool]:
    """Rows of one direction's table that come after `position` in the order above."""
    p_at, p_direction, p_id = position
    if p_direction == direction:
        # A row comparison, so that the index (…, time, id) starts the page at the position
        # itself rather than at the position's millisecond (or, on PostgreSQL for an OR of
        # two conditions, at the conversation's first message).
        return tuple_(at, id_) > tuple_(p_at, p_id)
    if _DIRECTIONS.index(direction) > _DIRECTIONS.index(p_direction):
        return at >= p_at  # type: ignore[no-any-return]
    return at > p_at  # type: ignore[no-any-return]


def message_page_queries(
    tenant_id: str, conversation_id: str, *, limit: int, after: MessagePosition | None
) -> tuple[Select[Any], Select[Any]]:
    """A page's reads: up to `limit` inbound messages (events) and up to `limit` outbound ones
    (sent messages) after `after`, each in its index's order (migration 0011)."""
    e, m = s.events, s.messages
    inbound_query = (
        select(e.c.id, e.c.occurred_at, e.c.payload)
        .where(
            e.c.tenant_id == tenant_id,
            e.c.conversation_id == conversation_id,
            e.c.type == "message.received",
        )
        .order_by(e.c.occurred_at, e.c.id)
        .limit(limit)
    )
    outbound_query = (
        select(
            m.c.id,
            m.c.created_at,
            m.c.content,
            m.c.state,
            m.c.source_id,
            m.c.provider_message_id,
            m.c.provider_alt_id,
        )
        .where(m.c.tenant_id == tenant_id, m.c.conversation_id == conversation_id)
        .order_by(m.c.created_at, m.c.id)
        .limit(limit)
    )
    if after is not None:
        inbound_query = inbound_query.where(_after(e.c.occurred_at, e.c.id, "inbound", after))
        outbound_query = outbound_query.where(_after(m.c.created_at, m.c.id, "outbound", after))
    return inbound_query, outbound_query


def _most_recent_first(columns: Any) -> tuple[Any, ...]:
    """The list's order, of the conversations table or of a union of its pages."""
    return (columns.last_message_at.desc(), columns.tenant_id.desc(), columns.id.desc())


@lru_cache(maxsize=8)  # 8 shapes: the four status filters, first page or not (15 MB at 300)
def conversation_list_statement(tenants: int, status: str | None, paged: bool) -> Select[Any]:
    """A page of the list (ConversationOps.list_conversations) of the conversations of
    `tenants` tenants (parameters `tenant_0`…): each tenant's read by its index in the list's
    order, or by the escalated ones' (migration 0011), up to `limit`; those of several
    tenants merged by the engine (a sort of at most `limit` a tenant, not of every
    conversation of the hub). `paged`: starting after the position `after_*`.

    Made once per shape and kept: the admin's list of every tenant is a branch per tenant,
    and building and compiling one of 300 took ~0.25 s of Python on the event loop; kept,
    SQLAlchemy compiles it once and PostgreSQL keeps its plan (~110 ms to make at 300)."""
    if tenants != 1:
        each = [select(_tenant_page(i, status, paged).subquery()) for i in range(tenants)]
        merged = union_all(*each).subquery()
        return (
            select(merged)
            .order_by(*_most_recent_first(merged.c))
            .limit(bindparam("limit", type_=Integer))
        )
    return _tenant_page(0, status, paged)


def conversation_list_params(
    tenant_ids: Sequence[str], limit: int, after: tuple[int, str, str] | None
) -> dict[str, Any]:
    """The values of `conversation_list_statement`'s parameters."""
    params: dict[str, Any] = {f"tenant_{i}": t for i, t in enumerate(tenant_ids)}
    params["limit"] = limit
    if after is not None:
        params["after_at"], params["after_tenant"], params["after_id"] = after
    return params


def _tenant_page(i: int, status: str | None, paged: bool) -> Select[Any]:
    """The page of the `i`th tenant named."""
    c = s.conversations
    query = (
        select(c)
        .where(c.c.tenant_id == bindparam(f"tenant_{i}", type_=Text))
        .order_by(*_most_recent_first(c.c))
        .limit(bindparam("limit", type_=Integer))
    )
    if paged:
        at = bindparam("after_at", type_=BigInteger)
        tenant = bindparam("after_tenant", type_=Text)
        query = query.where(
            # The bound alone starts the index range at the cursor's millisecond; the rest
            # is the engine's order of ties within it.
            c.c.last_message_at <= at,
            or_(
                c.c.last_message_at < at,
                and_(
                    c.c.last_message_at == at,
                    or_(
                        c.c.tenant_id < tenant,
                        and_(c.c.tenant_id == tenant, c.c.id < bindparam("after_id", type_=Text)),
                    ),
                ),
            ),
        )
    if status is not None:
        query = query.where(c.c.status == written_in(status))  # conversations_escalated
    return query


# SQLITE_MAX_COMPOUND_SELECT's default: the most UNION ALL branches one statement may hold.
_SQLITE_MAX_BRANCHES = 500

# Every tenant with a conversation, by the conversations' primary key.
_TENANTS_WITH_CONVERSATIONS = each_value("conversations", "tenant_id")


class ConversationOps(StoreBase):
    async def list_conversations(
        self,
        tenant_id: str | None,
        *,
        status: str | None = None,
        limit: int = 100,
        after: tuple[int, str, str] | None = None,
    ) -> list[ConversationView]:
        """Most recent last message first, ties by tenant and id (both descending), so that
        the order is total and a page can start `after` the (last_message_at, tenant, id) of
        the previous page's last conversation."""
        async with self._read() as conn:
            if tenant_id is not None:
                tenants = [tenant_id]
            else:
                tenants = [row[0] for row in await conn.execute(_TENANTS_WITH_CONVERSATIONS)]
                if not tenants:
                    return []
            # SQLite refuses a compound SELECT of more than 500 terms: past that many
            # tenants, a statement per group of them, their pages merged here (each page
            # comes in the list's order; str order is SQLite's BINARY collation's).
            size = len(tenants) if self.dialect != "sqlite" else _SQLITE_MAX_BRANCHES
            pages: list[list[ConversationView]] = []
            for group in in_chunks(tenants, size):
                statement = conversation_list_statement(len(group), status, after is not None)
                params = conversation_list_params(group, limit, after)
                pages.append(
                    [_conversation(r) for r in (await conn.execute(statement, params)).all()]
                )
        if len(pages) == 1:
            return pages[0]
        merged = heapq.merge(
            *pages, key=lambda c: (c.last_message_at, c.tenant_id, c.id), reverse=True
        )
        return list(itertools.islice(merged, limit))

    async def get_conversation(
        self, tenant_id: str, conversation_id: str
    ) -> ConversationView | None:
        c = s.conversations
        async with self._read() as conn:
            row = (
                await conn.execute(
                    select(c).where(c.c.tenant_id == tenant_id, c.c.id == conversation_id)
                )
            ).first()
        return None if row is None else _conversation(row)

    async def conversation_messages(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        limit: int = 100,
        after: MessagePosition | None = None,
    ) -> list[Interaction]:
        """Up to `limit` messages of the conversation, both ways, oldest first (the order of
        `MessagePosition`), starting after `after`; a sent one with its state now (what
        sending knows and the provider's status webhooks say, as GET /messages/{id})."""
        inbound_query, outbound_query = message_page_queries(
            tenant_id, conversation_id, limit=limit, after=after
        )
        async with self._read() as conn:
            inbound = (await conn.execute(inbound_query)).all()
            outbound = (await conn.execute(outbound_query)).all()
            # Merged by (time, direction); each table's rows keep the engine's order.
            page = list(
                heapq.merge(
                    ((r.occurred_at, 0, r) for r in inbound),
                    ((r.created_at, 1, r) for r in outbound),
                    key=lambda item: item[:2],
                )
            )[:limit]
            sent = [r for _, direction, r in page if direction == 1]
            states = await sent_states(conn, tenant_id, sent)
        return [
            Interaction(at, "inbound", r.id, orjson.loads(r.payload)["data"])
            if direction == 0
            else Interaction(
                at, "outbound", r.id, {**orjson.loads(r.content), "state": states[r.id]}
            )
            for at, direction, r in page
        ]

    async def set_conversation_status(
        self, tenant_id: str, conversation_id: str, status: str, now_ms: int
    ) -> bool:
        c = s.conversations
        async with self._write() as conn:
            result = await conn.execute(
                update(c)
                .where(c.c.tenant_id == tenant_id, c.c.id == conversation_id)
                .values(status=status, updated_at=now_ms)
            )
        return bool(result.rowcount)


def _conversation(r: Any) -> ConversationView:
    return ConversationView(
        tenant_id=r.tenant_id,
        id=r.id,
        status=r.status,
        contact_name=r.contact_name,
        first_message_at=r.first_message_at,
        last_message_at=r.last_message_at,
        inbound_count=r.inbound_count,
        outbound_count=r.outbound_count,
        escalated_at=r.escalated_at,
        escalation_reason=r.escalation_reason,
        escalation_priority=r.escalation_priority,
    )
