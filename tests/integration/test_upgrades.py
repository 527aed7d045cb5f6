"""Upgrading a database that holds data: from every earlier migration to this version's, on
SQLite and the real PostgreSQL.

A database is made at an older revision, filled with the rows that version wrote (deliveries
in every state, attempts, keys, circuits, conversations where the revision has them),
upgraded, and then has to hold the same rows, the same schema as a database made at this
version, and work: a lease, a rescue, a DLQ replay, a key check.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, column, inspect, select, table, text
from sqlalchemy.sql.expression import TableClause
from structlog.testing import capture_logs

from estafeta.api.auth import hash_key
from estafeta.errors import StoreError
from estafeta.store import open_store
from estafeta.store.migrate import (
    _MIGRATION_LOCK,
    current_revision,
    head_revision,
    known_revisions,
    upgrade,
)
from estafeta.store.records import DeadLetterFilter
from estafeta.store.schema import metadata
from estafeta.store.sqlstore import SqlStore
from tests.conftest import empty_database, lease_any
from tests.integration.store_support import message

EARLIER = sorted(known_revisions() - {head_revision()})
NOW = 1_800_000_000_000
T0 = NOW - 3_600_000
TENANT = "clinica-sol"
ACTIVE_KEY, REVOKED_KEY = "est_active-key", "est_revoked-key"


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[SqlStore]:
    store = open_store(url)
    try:
        yield store
    finally:
        await store.close()


# -- what each revision held ------------------------------------------------------------------


def delivery(delivery_id: str, event_id: str, state: str, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": delivery_id,
        "tenant_id": TENANT,
        "event_id": event_id,
        "destination_id": "crm",
        "state": state,
        "priority": 2,
        "ordering_key": None,
        "attempts": 0,
        "max_attempts": 5,
        "next_attempt_at": T0,
        "lease_token": None,
        "lease_expires_at": None,
        "leased_by": None,
        "last_error": None,
        "replays": 0,
        "created_at": T0,
        "updated_at": T0,
    }
    return row | values


def rows_at(revision: str) -> dict[str, list[dict[str, Any]]]:
    """Rows as estafeta at `revision` wrote them, table by table in insertion order."""
    conversations = revision >= "0003"

    def event(event_id: str, **values: Any) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": event_id,
            "tenant_id": TENANT,
            "source_id": "crm-events",
            "type": "lead.created",
            "idempotency_key": f"key-{event_id}",
            "occurred_at": T0,
            "received_at": T0,
            "payload": f'{{"id":"{event_id}","type":"lead.created","data":{{"n":1}}}}',
            "raw": '{"n":1}',
        }
        if conversations:
            row |= {"conversation_id": None, "message_ref": None}
        return row | values

    attempt_defaults = {"tenant_id": TENANT, "duration_ms": 12.5, "response_excerpt": ""}
    rows: dict[str, list[dict[str, Any]]] = {
        "tenants": [
            {
                "id": TENANT,
                "name": "Clínica Sol",
                "ingress_rate_limit": "100/minute",
                "updated_at": T0,
            }
        ],
        "sources": [{"id": "crm-events", "tenant_id": TENANT, "kind": "generic", "updated_at": T0}],
        "destinations": [
            {"id": d, "tenant_id": TENANT, "kind": "http", "url": f"http://x/{d}", "updated_at": T0}
            for d in ("crm", "billing")
        ],
        "routes": [
            {
                "id": "route-1",
                "tenant_id": TENANT,
                "events": '["lead.*"]',
                "filter": "data.n > 0",
                "destinations": '["crm", "billing"]',
                "priority": 2,
                "ordering_key": "data.n",
                "updated_at": T0,
            }
        ],
        "events": [event("evt_1"), event("evt_2", idempotency_key=None), event("evt_3")],
        "deliveries": [
            # Due, the head of its ordering key; the next one with that key waits behind it.
            delivery("dlv_a1", "evt_1", "pending", ordering_key="k1", next_attempt_at=NOW - 9)
            | {"attempts": 1, "last_error": "http_503: Service Unavailable"},
            delivery("dlv_a2", "evt_2", "pending", ordering_key="k1", next_attempt_at=NOW - 99),
            delivery(
                "dlv_b", "evt_1", "pending", destination_id="billing", next_attempt_at=NOW + 60_000
            ),
            delivery("dlv_c", "evt_2", "in_flight", attempts=2, lease_token="tok-1")
            | {"lease_expires_at": NOW - 5_000, "leased_by": "worker-old"},
            delivery("dlv_d", "evt_3", "succeeded", attempts=1, updated_at=T0 + 50),
            delivery("dlv_e1", "evt_3", "dead", destination_id="billing", attempts=5)
            | {"last_error": "http_500: boom", "updated_at": T0 + 500},
            delivery("dlv_e2", "evt_2", "dead", attempts=3, replays=1, updated_at=T0 + 100),
            delivery("dlv_f", "evt_1", "discarded", destination_id="billing", attempts=5),
        ],
        "attempts": [
            {"id": "att_1", "delivery_id": "dlv_d", "number": 1, "started_at": T0 + 40}
            | {"outcome": "success", "status_code": 200, "error_class": None},
            {"id": "att_2", "delivery_id": "dlv_e1", "number": 1, "started_at": T0 + 60}
            | {"outcome": "retryable", "status_code": 500, "error_class": "http_500"},
            {"id": "att_3", "delivery_id": "dlv_e1", "number": 2, "started_at": T0 + 400}
            | {"outcome": "retryable", "status_code": None, "error_class": "timeout"},
        ],
        "api_keys": [
            {"id": "key_1", "key_hash": hash_key(ACTIVE_KEY), "revoked_at": None},
            {"id": "key_2", "key_hash": hash_key(REVOKED_KEY), "revoked_at": T0 + 1},
        ],
        "audit_log": [
            {"id": "aud_1", "tenant_id": TENANT, "at": T0 + 7, "actor": "cli:ops"}
            | {"action": "replay", "detail": '{"ids":["dlv_e2"]}'}
        ],
    }
    for row in rows["attempts"]:
        row |= attempt_defaults
    for row in rows["api_keys"]:
        row |= {"tenant_id": TENANT, "label": "ops", "created_at": T0}
    if revision >= "0002":
        rows["circuits"] = [
            {"destination_id": "billing", "data": '{"state":"open","failures":5}', "updated_at": T0}
        ]
    if conversations:
        rows["events"].append(
            event("evt_4", type="message.received", conversation_id="5511999990000")
            | {"message_ref": "wamid.1"}
        )
        rows["conversations"] = [
            {
                "tenant_id": TENANT,
                "id": "5511999990000",
                "status": "escalated",
                "contact_name": "Maria",
                "first_message_at": T0,
                "last_message_at": T0 + 9,
                "inbound_count": 3,
                "outbound_count": 1,
                "escalated_at": T0 + 5,
                "escalation_reason": "wants a human",
                "escalation_priority": 1,
                "updated_at": T0 + 9,
            }
        ]
        rows["escalations"] = [
            {"id": "esc_1", "tenant_id": TENANT, "conversation_id": "5511999990000"}
            | {"event_id": "evt_4", "reason": "wants a human", "priority": 1}
            | {"actor": "tenant:clinica-sol", "at": T0 + 5}
        ]
        rows["messages"] = [
            {"id": "msg_1", "tenant_id": TENANT, "source_id": "crm-events"}
            | {"conversation_id": "5511999990000", "recipient": "5511999990000"}
            | {"content": '{"text":"hola"}', "state": "sent", "provider_message_id": "wamid.2"}
            | {"error": None, "event_id": "evt_4", "delivery_id": "dlv_d", "sent_at": T0 + 8}
            | {"created_at": T0 + 6, "updated_at": T0 + 8}
        ]
        if revision >= "0009":  # Z-API's second id of a sent message
            rows["messages"][0]["provider_alt_id"] = "zaap-2"
        if revision >= "0015":  # the name came with the conversation's last message
            rows["conversations"][0]["contact_name_at"] = T0 + 9
    if revision >= "0008":
        # A worker seen 5 s ago; from 0013, a newer `serve --no-workers` beside it.
        rows["processes"] = [
            {"id": "host:1:worker", "destinations": '["crm"]', "started_at": T0}
            | {"seen_at": NOW - 5_000, "stopped_at": None}
        ]
        if revision >= "0013":
            rows["processes"][0]["delivers"] = True
            rows["processes"].append(
                {"id": "host:2:http", "destinations": '["crm"]', "started_at": T0}
                | {"seen_at": NOW - 1_000, "stopped_at": None, "delivers": False}
            )
        if revision >= "0014":  # its delivery task ran steadily until it was last seen
            rows["processes"][0]["delivering_at"] = NOW - 5_000
            rows["processes"][1]["delivering_at"] = None
    return rows


def table_of(name: str, columns: Iterable[str]) -> TableClause:
    """The table as the revision had it (not schema.py's, which is this version's)."""
    return table(name, *(column(c) for c in columns))


async def insert(store: SqlStore, rows: dict[str, list[dict[str, Any]]]) -> None:
    async with store.engine.begin() as conn:
        for name, table_rows in rows.items():
            for row in table_rows:
                await conn.execute(table_of(name, row).insert().values(**row))


async def read_back(store: SqlStore, rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Every seeded table's rows, in the seeded columns, by primary key."""
    found: dict[str, Any] = {}
    async with store.engine.connect() as conn:
        for name, table_rows in rows.items():
            seeded = table_of(name, table_rows[0])
            key = ("tenant_id", "id") if name == "conversations" else (next(iter(table_rows[0])),)
            query = select(seeded).order_by(*(seeded.c[k] for k in key))
            found[name] = [dict(row._mapping) for row in await conn.execute(query)]
    return found


# -- the schema, as the database reports it ---------------------------------------------------


def schema_of(connection: Connection) -> dict[str, Any]:
    """Tables with their columns (type, nullability, default), indexes (with their partial
    predicates), check, unique, foreign-key and primary-key constraints."""
    inspector = inspect(connection)
    described: dict[str, Any] = {}
    for name in sorted(inspector.get_table_names()):
        indexes = [
            (
                index["name"],
                tuple(index["column_names"]),
                bool(index["unique"]),
                sorted((k, str(v)) for k, v in index.get("dialect_options", {}).items()),
            )
            for index in inspector.get_indexes(name)
        ]
        described[name] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                for c in inspector.get_columns(name)
            ],
            "indexes": sorted(indexes),
            "checks": sorted(
                (c["name"], c["sqltext"]) for c in inspector.get_check_constraints(name)
            ),
            "uniques": sorted(
                (u["name"], tuple(u["column_names"]))
                for u in inspector.get_unique_constraints(name)
            ),
            "foreign_keys": sorted(
                (tuple(f["constrained_columns"]), f["referred_table"], str(f.get("options")))
                for f in inspector.get_foreign_keys(name)
            ),
            "primary_key": tuple(inspector.get_pk_constraint(name)["constrained_columns"]),
        }
    return described


async def schema(store: SqlStore) -> dict[str, Any]:
    async with store.engine.connect() as conn:
        return await conn.run_sync(schema_of)


# -- the upgrade ------------------------------------------------------------------------------


@pytest.mark.parametrize("revision", EARLIER)
async def test_a_database_of_an_earlier_version_upgrades_with_every_row_and_works(
    engine: str, revision: str, tmp_path: Path
) -> None:
    rows = rows_at(revision)
    with (
        empty_database(engine, tmp_path, "upgraded") as url,
        empty_database(engine, tmp_path, "fresh") as fresh_url,
    ):
        async with opened(url) as store:
            await upgrade(store.engine, revision)
            await insert(store, rows)
            before = await read_back(store, rows)
        assert sum(len(table) for table in before.values()) == sum(map(len, rows.values()))

        async with opened(url) as store:
            await store.migrate()
            assert await current_revision(store.engine) == head_revision()
            await store.require_schema()
            assert await read_back(store, rows) == before
            async with opened(fresh_url) as fresh:
                await fresh.migrate()
                assert await schema(store) == await schema(fresh)

            await store.migrate()  # again: nothing to do, nothing changed
            assert await read_back(store, rows) == before

            # It works: the due head of key k1 is leased (not the one behind it, not the
            # future one), the abandoned lease is rescued, keys resolve, the DLQ replays.
            leased = await lease_any(store, now_ms=NOW, worker_id="worker-new")
            assert [d.id for d in leased] == ["dlv_a1"]
            assert (leased[0].attempts, leased[0].ordering_key) == (1, "k1")
            rescued = await store.claim_expired(now_ms=NOW, lease_ms=30_000, worker_id="w")
            assert [d.id for d in rescued] == ["dlv_c"]
            if "processes" in rows:  # the worker delivered when it was last seen
                assert await store.last_delivering_at() == NOW - 5_000
            assert await store.tenant_for_key(hash_key(ACTIVE_KEY)) == TENANT
            assert await store.tenant_for_key(hash_key(REVOKED_KEY)) is None
            dead = await store.list_dead(DeadLetterFilter())
            assert [(d.id, d.attempts, d.last_error) for d in dead] == [
                ("dlv_e2", 3, None),
                ("dlv_e1", 5, "http_500: boom"),
            ]
            replayed = await store.replay(
                DeadLetterFilter(destination_id="billing"), actor="cli:ops", now_ms=NOW
            )
            assert replayed == ["dlv_e1"]
            stats = await store.queue_stats(history=True)
            assert stats.by_state == {
                "pending": 3,
                "in_flight": 2,
                "succeeded": 1,
                "dead": 1,
                "discarded": 1,
            }
            if "conversations" in rows:  # a name of before 0015 is dated by its last message
                maria = "5511999990000"
                await store.insert_events([message("old", maria, T0 + 8, name="Maria Velha")])
                renamed = await store.get_conversation(TENANT, maria)
                assert renamed is not None and renamed.contact_name == "Maria"
                await store.insert_events([message("new", maria, T0 + 10, name="Maria Nova")])
                renamed = await store.get_conversation(TENANT, maria)
                assert renamed is not None and renamed.contact_name == "Maria Nova"


# -- waiting for another migration on PostgreSQL ------------------------------------------------


async def test_a_migration_waits_for_another_as_long_as_it_takes_and_says_whose(
    tmp_path: Path,
) -> None:
    """The docs: several `migrate` or `serve` starting at once migrate one after another, and
    a migration takes the time it needs. Before, a statement_timeout or lock_timeout (of the
    role, or the URL's documented `options`) cancelled the wait for another process's
    migration, or a long index build, as `the store cannot be reached` (exit 3); and the wait
    was silent, however long (a `migrate` killed during an index build leaves its server
    process building it, holding the lock)."""
    with empty_database("postgresql", tmp_path, "waiting") as url:
        async with opened(url) as store:
            await upgrade(store.engine, "0011")
            async with store.engine.connect() as holder:  # another process's migration
                await holder.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK}
                )
                holder_pid = (await holder.execute(text("SELECT pg_backend_pid()"))).scalar()
                timeouts = "options=-c%20statement_timeout%3D100%20-c%20lock_timeout%3D100"
                async with opened(f"{url}{'&' if '?' in url else '?'}{timeouts}") as second:
                    with capture_logs() as logs:
                        migrating = asyncio.ensure_future(second.migrate())
                        for _ in range(200):  # up to 10 s for it to say it waits
                            if migrating.done() or any(
                                e["event"] == "schema_migration_waiting" for e in logs
                            ):
                                break
                            await asyncio.sleep(0.05)
                        assert not migrating.done(), migrating.exception()
                        assert [e for e in logs if e["event"].startswith("schema_")] == [
                            {
                                "event": "schema_migration_waiting",
                                "holder_pid": holder_pid,
                                "log_level": "info",
                            }
                        ]
                        await asyncio.sleep(0.5)  # five times the URL's timeouts
                        assert not migrating.done(), migrating.exception()
                        await holder.rollback()  # the other migration ends
                        await migrating
            assert await current_revision(store.engine) == head_revision()


async def test_a_migration_that_fails_says_so_and_keeps_nothing_of_it(
    engine: str, tmp_path: Path
) -> None:
    """Before, a failed migration said only the driver's class (`error: DATABASE: the store
    failed: ProgrammingError (SQLSTATE 42P07)`): neither that a migration failed nor in what
    state it left the database. Here 0012's index name is taken by an index of the operator's;
    0010 (a pair of one key in flight given back) and 0011 ran before it in the same
    transaction."""
    rows = rows_at("0009")
    rows["deliveries"] += [  # a race of before 0010 left two of key k2 in flight
        delivery(f"dlv_k{n}", "evt_3", "in_flight", ordering_key="k2", lease_token=f"t{n}")
        | {"lease_expires_at": NOW}
        for n in (1, 2)
    ]
    with empty_database(engine, tmp_path, "failing") as url:
        async with opened(url) as store:
            await upgrade(store.engine, "0009")
            await insert(store, rows)
            async with store.engine.begin() as conn:
                await conn.execute(text("CREATE INDEX deliveries_dead ON audit_log (at)"))
            before = await read_back(store, rows)
            before_schema = await schema(store)

            with pytest.raises(StoreError) as failed:
                await store.migrate()
            assert str(failed.value).endswith(
                f", while migrating the schema from 0009 to {head_revision()}: none of it was"
                " kept (the database is still at 0009)"
            ), failed.value
            assert await current_revision(store.engine) == "0009"
            assert await read_back(store, rows) == before
            assert await schema(store) == before_schema

            async with store.engine.begin() as conn:  # the operator drops theirs
                await conn.execute(text("DROP INDEX deliveries_dead"))
            await store.migrate()
            assert await current_revision(store.engine) == head_revision()
            stats = await store.queue_stats()
            assert stats.by_state["in_flight"] == 2  # dlv_c and dlv_k1; dlv_k2 given back


# -- the migrations build schema.py's tables --------------------------------------------------


def normalized(described: dict[str, Any]) -> dict[str, Any]:
    """PostgreSQL's text of a partial index's predicate without its casts and parentheses: an
    index built before a column was widened (0002, then 0006) keeps casts of the old type."""
    for table_described in described.values():
        table_described["indexes"] = [
            (name, columns, unique, [(k, re.sub(r"::[a-z ]+(\[\])?|[()]", "", v)) for k, v in opts])
            for name, columns, unique, opts in table_described["indexes"]
        ]
    return described


async def test_the_migrations_build_the_declared_tables_with_their_checks_and_defaults(
    engine: str, tmp_path: Path
) -> None:
    """test_store.py's comparison (Alembic's) leaves out CHECK constraints, server defaults
    and partial indexes' predicates: the code reads schema.py, the database has what the
    migrations made."""
    with (
        empty_database(engine, tmp_path, "migrated") as url,
        empty_database(engine, tmp_path, "declared") as declared_url,
    ):
        async with opened(url) as migrated, opened(declared_url) as declared:
            await migrated.migrate()
            async with declared.engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
            made = await schema(migrated)
            del made["alembic_version"]
            assert normalized(made) == normalized(await schema(declared))
