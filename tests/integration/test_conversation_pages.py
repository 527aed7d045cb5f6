"""A page reads its own rows, not everything before it, on both engines: a page of a long
conversation's messages, and a page of a tenant's thousands of conversations. The queries the
store runs, explained by the engine."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from sqlalchemy import Select, event, insert, text

from estafeta.store import schema as s
from estafeta.store.conversations import (
    MessagePosition,
    conversation_list_params,
    conversation_list_statement,
    message_page_queries,
)
from estafeta.store.sqlstore import SqlStore
from tests.integration.plans import assert_walks_only, explain

TENANT = "clinica-sol"
MARIA = "5511987654321"
INBOUND, STATUSES, OUTBOUND = 3_000, 3_000, 1_000
LIMIT = 50
T0 = 1_751_371_200_000


async def _a_long_conversation(store: SqlStore) -> None:
    """Maria's messages both ways, the provider's status events about the sent ones, and
    another conversation of the same tenant, as ingest and sending store them."""
    events: list[dict[str, Any]] = []
    for n in range(INBOUND):
        for conversation in (MARIA, "5521912345678"):
            events.append(
                {
                    "id": f"evt_{conversation}_{n:05d}",
                    "tenant_id": TENANT,
                    "source_id": "wa-sol",
                    "type": "message.received",
                    "idempotency_key": f"wamid.{conversation}.{n}",
                    # Two messages a millisecond: a page boundary falls inside one.
                    "occurred_at": T0 + n // 2,
                    "received_at": T0 + n // 2 + 100,
                    "payload": orjson.dumps({"data": {"text": f"mensagem {n}"}}).decode(),
                    "raw": None,
                    "conversation_id": conversation,
                    "message_ref": f"wamid.{conversation}.{n}",
                }
            )
    for n in range(STATUSES):
        events.append(
            {
                "id": f"evt_status_{n:05d}",
                "tenant_id": TENANT,
                "source_id": "wa-sol",
                "type": "message.status",
                "idempotency_key": f"wamid.out{n % OUTBOUND}:{n}",
                "occurred_at": T0 + n,
                "received_at": T0 + n + 100,
                "payload": orjson.dumps({"data": {"status": "delivered"}}).decode(),
                "raw": None,
                "conversation_id": MARIA,
                "message_ref": f"wamid.out{n % OUTBOUND}",
            }
        )
    messages = [
        {
            "id": f"msg_{n:05d}",
            "tenant_id": TENANT,
            "source_id": "wa-sol",
            "conversation_id": MARIA,
            "recipient": f"+{MARIA}",
            "content": orjson.dumps({"text": f"resposta {n}"}).decode(),
            "state": "sent",
            "provider_message_id": f"wamid.out{n}",
            "error": None,
            "event_id": f"evt_{MARIA}_{n:05d}",
            "delivery_id": f"dlv_{n:05d}",
            "sent_at": T0 + 3 * n + 1,
            "created_at": T0 + 3 * n,
            "updated_at": T0 + 3 * n + 1,
            "provider_alt_id": None,
        }
        for n in range(OUTBOUND)
    ]
    async with store.engine.begin() as conn:
        await conn.execute(insert(s.events), events)
        await conn.execute(insert(s.messages), messages)
        await conn.execute(text("ANALYZE"))


async def test_a_page_of_a_long_conversation_reads_only_its_own_rows(store: SqlStore) -> None:
    await _a_long_conversation(store)
    # The whole conversation, page by page, as the API reads it: where the pages start.
    positions: list[MessagePosition | None] = [None]
    everything = []
    while True:
        page = await store.conversation_messages(TENANT, MARIA, limit=500, after=positions[-1])
        everything += page
        if len(page) < 500:
            break
        positions.append((page[-1].at, page[-1].direction, page[-1].id))
    assert len(everything) == INBOUND + OUTBOUND
    assert len({(i.direction, i.id) for i in everything}) == INBOUND + OUTBOUND
    starts = [positions[0], positions[1], positions[len(positions) // 2], positions[-1]]
    # A page after an outbound message, and after an inbound one, both at one millisecond.
    starts += [(T0 + 900, "outbound", "msg_00300"), (T0 + 900, "inbound", f"evt_{MARIA}_01800")]

    for after in starts:
        for query, table, index in zip(
            message_page_queries(TENANT, MARIA, limit=LIMIT, after=after),
            ("events", "messages"),
            ("events_conversation", "messages_conversation"),
            strict=True,
        ):
            # At most the page's rows: none read to be sorted or filtered away.
            assert_walks_only(store, await explain(store, query), table, {index}, LIMIT)


CONVERSATIONS = 3_000


async def test_a_page_of_a_tenants_conversations_reads_only_its_own_rows(
    store: SqlStore,
) -> None:
    rows = [
        {
            "tenant_id": tenant,
            "id": f"55119{n:08d}",
            # One conversation in twenty escalated, a few open, the rest closed.
            "status": "escalated" if n % 20 == 7 else "open" if n % 10 == 3 else "closed",
            "contact_name": None,
            "first_message_at": T0,
            "last_message_at": T0 + n // 2,  # two a millisecond: ties on every page
            "inbound_count": 1,
            "outbound_count": 0,
            "updated_at": T0 + n // 2,
        }
        for tenant in (TENANT, "outra-clinica")
        for n in range(CONVERSATIONS)
    ]
    async with store.engine.begin() as conn:
        await conn.execute(insert(s.conversations), rows)
        await conn.execute(text("ANALYZE"))

    # A tenant's key sees its own; the admin key, without ?tenant=, every tenant's.
    for scope, status in itertools.product((TENANT, None), (None, "escalated", "open", "closed")):
        expected = sorted(
            (r for r in rows if scope in (None, r["tenant_id"]) and status in (None, r["status"])),
            key=lambda r: (r["last_message_at"], r["tenant_id"], r["id"]),
            reverse=True,
        )
        # Page by page as the API reads them: every conversation once, most recent first.
        seen: list[tuple[str, str]] = []
        positions: list[tuple[int, str, str] | None] = [None]
        while True:
            page = await store.list_conversations(
                scope, status=status, limit=LIMIT, after=positions[-1]
            )
            seen += [(c.tenant_id, c.id) for c in page]
            if len(page) < LIMIT:
                break
            positions.append((page[-1].last_message_at, page[-1].tenant_id, page[-1].id))
        assert seen == [(r["tenant_id"], r["id"]) for r in expected], (scope, status)
        if status in ("open", "closed"):
            continue  # common: read by the tenant's index, skipping the few of another status
        index = "conversations_tenant_last" if status is None else "conversations_escalated"
        tenants = [TENANT] if scope else [TENANT, "outra-clinica"]
        for after in (positions[0], positions[-1], positions[len(positions) // 2]):
            statement = conversation_list_statement(len(tenants), status, after is not None)
            query = statement.params(conversation_list_params(tenants, LIMIT, after))
            # Each tenant's page, and the conversations of the cursor's millisecond (two
            # here) that came on the page before: read at the range's start, then passed
            # over. Several tenants' pages are merged by a sort of those rows alone.
            plan = await explain(store, query)
            most = len(tenants) * (LIMIT + 2)
            assert_walks_only(store, plan, "conversations", {index}, most, sorts=scope is None)


async def test_the_list_of_every_tenant_keeps_its_statement_from_page_to_page(
    store: SqlStore,
) -> None:
    # The admin's list is a branch per tenant: built anew for each page it cost ~0.25 s of
    # Python at 300 tenants, on the event loop every request and webhook waits on, and
    # PostgreSQL planned it anew each time (~110 ms). Kept, a page costs ~4 ms of Python and
    # PostgreSQL reuses its plan (~10 ms): the same statement runs for every page of a shape.
    tenants = [f"clinica-{n:03d}" for n in range(40)]
    rows = [
        {
            "tenant_id": tenant,
            "id": f"55119{n:08d}",
            "status": "open",
            "contact_name": None,
            "first_message_at": T0,
            "last_message_at": T0 + n * 100 + i,
            "inbound_count": 1,
            "outbound_count": 0,
            "updated_at": T0,
        }
        for i, tenant in enumerate(tenants)
        for n in range(5)
    ]
    async with store.engine.begin() as conn:
        await conn.execute(insert(s.conversations), rows)
    ran: list[object] = []

    def record(conn: Any, statement: object, *args: Any) -> None:
        if isinstance(statement, Select):  # the page; the tenants are found by a text query
            ran.append(statement)

    engine = store.read_engine.sync_engine
    event.listen(engine, "before_execute", record)
    try:
        first = await store.list_conversations(None, limit=7)
        second = await store.list_conversations(
            None, limit=7, after=(first[-1].last_message_at, first[-1].tenant_id, first[-1].id)
        )
        third = await store.list_conversations(
            None, limit=7, after=(second[-1].last_message_at, second[-1].tenant_id, second[-1].id)
        )
    finally:
        event.remove(engine, "before_execute", record)
    expected = sorted(rows, key=lambda r: (r["last_message_at"], r["tenant_id"], r["id"]))[::-1]
    assert [(c.tenant_id, c.id) for c in first + second + third] == [
        (r["tenant_id"], r["id"]) for r in expected[:21]
    ]
    assert len(ran) == 3 and ran[1] is ran[2]  # the first page's has no `after`


async def test_the_admin_list_of_more_than_500_tenants_is_one_page_on_sqlite_too(
    store: SqlStore,
) -> None:
    """The admin key's list is a UNION ALL branch per tenant with a conversation; SQLite
    refuses a compound SELECT of more than 500 (every admin list was a 500 past that)."""
    rows = [
        {
            "tenant_id": f"clinica-{n:04d}",
            "id": "5511987654321",
            "status": "open",
            "contact_name": None,
            "first_message_at": T0,
            "last_message_at": T0 + n,
            "inbound_count": 1,
            "outbound_count": 0,
            "updated_at": T0 + n,
        }
        for n in range(501)
    ]
    async with store.engine.begin() as conn:
        await conn.execute(insert(s.conversations), rows)
    page = await store.list_conversations(None, limit=10)
    assert [c.tenant_id for c in page] == [f"clinica-{n:04d}" for n in range(500, 490, -1)]
    after = (page[-1].last_message_at, page[-1].tenant_id, page[-1].id)
    rest = await store.list_conversations(None, limit=1_000, after=after)
    assert [c.tenant_id for c in rest] == [f"clinica-{n:04d}" for n in range(490, -1, -1)]
