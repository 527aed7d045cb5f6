"""The production engine: PostgreSQL via asyncpg.

Many ingress and worker processes on many machines share one database; the lease statement
(sql/lease_postgresql.sql) uses FOR UPDATE SKIP LOCKED so they never lease the same row.

The hot paths are one statement each and go straight to an asyncpg connection kept for them
(store/held.py), outside an explicit transaction, so that each is one round trip and one
commit (a SQLAlchemy transaction costs three: BEGIN, the statement, COMMIT):

* ingest stores a batch of webhooks, their deliveries and their conversations' counters
  (sql/store_batch_postgresql.sql);
* a worker leases a batch of deliveries (sql/lease_postgresql.sql);
* a worker records a batch of attempts and applies their transitions
  (sql/complete_postgresql.sql).

A batch that needs more statements (a queued message or an escalation, a spool import, a
message send's bookkeeping) runs the same statement inside a SQLAlchemy transaction.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import asyncpg
import orjson
from sqlalchemy import event, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from estafeta.errors import LeaseRaced, StoreDeadlocked, StoreUnavailable
from estafeta.messaging.facts import SEND_DESTINATION_PREFIX, storable
from estafeta.store.base import SQL_DIR
from estafeta.store.held import HeldConnections
from estafeta.store.idle_limit import learn_limit, nearly_ended, went_idle
from estafeta.store.ingest import Inserted, Key, delivery_rows, event_key, event_row, fates
from estafeta.store.leases import attempt_row, next_attempt
from estafeta.store.postgres_connect import postgres_engine_args, refuse_transaction_pooling
from estafeta.store.records import Completed, CompletedAttempt, InsertResult, NewEvent
from estafeta.store.schema import ORDERING_IN_FLIGHT
from estafeta.store.sqlstore import SqlStore

T = TypeVar("T")


def positional(sql: str) -> tuple[str, tuple[str, ...]]:
    """A statement with `:name` parameters (as SQLAlchemy's text() takes it) rewritten with
    asyncpg's `$n`, and the names in `$n` order; a name used twice is one parameter."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return re.sub(r"(?<![:\w]):([a-z_][a-z0-9_]*)", number, body), tuple(names)


class Statement:
    """One SQL statement, runnable by SQLAlchemy (`:name`) and by asyncpg (`$n`)."""

    def __init__(self, sql: str) -> None:
        self.text = text(sql)
        self.positional, self.names = positional(sql)

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


def _statement(name: str) -> Statement:
    return Statement((SQL_DIR / name).read_text())


_STORE_BATCH = _statement("store_batch_postgresql.sql")
_IDS_BY_KEY = _statement("ids_by_key_postgresql.sql")
_COMPLETE = _statement("complete_postgresql.sql")
# Field names of the batch statement's JSON rows, in `event_row` and `delivery_rows` order.
_EVENT_FIELDS = (
    "id",
    "tenant_id",
    "source_id",
    "type",
    "idempotency_key",
    "occurred_at",
    "received_at",
    "payload",
    "raw",
    "conversation_id",
    "message_ref",
)
_DELIVERY_FIELDS = (
    "id",
    "tenant_id",
    "event_id",
    "destination_id",
    "priority",
    "ordering_key",
    "max_attempts",
    "due",
    "state",
    "lease_token",
    "lease_expires_at",
    "leased_by",
)


def pg_json(rows: list[dict[str, Any]]) -> bytes:
    """Rows as the UTF-8 JSON the batch statements read. Sent as bytes (`bytea`, read back
    with `convert_from`): as a str, it was decoded from orjson's UTF-8 here and encoded
    again by asyncpg, two passes over every payload (1.4 % of a webhook's instructions).
    PostgreSQL text cannot hold U+0000: a stray NUL in what a provider or a destination sent
    becomes U+FFFD here, instead of failing the statement and with it the webhook (retried by
    its provider forever) or the attempt's record (sent again after every lease)."""
    encoded = orjson.dumps(rows)
    if b"\\u0000" not in encoded:  # the common case: one scan in C
        return encoded
    return orjson.dumps(
        [{k: storable(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows]
    )


def _batch_params(events: Sequence[NewEvent]) -> dict[str, bytes]:
    """The batch statement's two parameters: events and deliveries as JSON rows."""
    event_objects = [
        dict(
            zip(_EVENT_FIELDS, event_row(e), strict=True),
            direction=e.direction,
            contact_name=e.contact_name,
            n=n,
        )
        for n, e in enumerate(events)
    ]
    delivery_objects = [
        dict(zip(_DELIVERY_FIELDS, row, strict=True)) for row in delivery_rows(events)
    ]
    return {
        "events": pg_json(event_objects),
        "deliveries": pg_json(delivery_objects),
    }


# Tries of a batch PostgreSQL fails to break a deadlock: the other transaction goes on once
# this one is failed, so the next try passes.
DEADLOCK_TRIES = 3


async def _again_if_deadlocked(store: Callable[[], Awaitable[T]]) -> T:
    """`store()`, run again when PostgreSQL failed it to break a deadlock (nothing of it was
    committed). Batches take events and conversations in key order, but an escalation
    updates its conversation after the batch statement has counted the batch's messages:
    a batch holding one and a webhook stored at the same time by another process, each
    holding a conversation the other waits for, deadlock. The failed one was answered as if
    the store were unreachable (503, or spooled with every event after it for a while)."""
    for _ in range(DEADLOCK_TRIES - 1):
        try:
            return await store()
        except StoreDeadlocked:
            continue
    return await store()


def _complete_params(batch: Sequence[CompletedAttempt], now_ms: int) -> dict[str, Any]:
    """The completion statement's parameters: the time, and per attempt its `attempts` row
    with its delivery's lease token and transition, as JSON rows."""
    attempts = []
    for item in batch:
        row = attempt_row(item)  # added to in place: one dict per attempt, not two
        row["lease_token"] = item.delivery.lease_token
        row["state"] = item.transition.to_state._value_  # not `.value`: a property's calls
        row["attempts"] = item.transition.attempts
        row["max_attempts"] = item.delivery.max_attempts
        row["next_attempt_at"] = next_attempt(item, now_ms)
        row["last_error"] = item.transition.last_error
        attempts.append(row)
    return {"now": now_ms, "attempts": pg_json(attempts)}


_CLOCK_MS = text("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS bigint)")

CONNECT_TIMEOUT_S = 5  # a new connection, before the store counts as unreachable
COMMAND_TIMEOUT_S = 30  # any statement: a request must not hang on a stuck database


# A new session's settings in one round trip: jit off, READ COMMITTED, and the session's
# `idle_session_timeout` in milliseconds (0: none; NULL before PostgreSQL 14).
_SESSION_SET_UP = (
    "SELECT set_config('jit', 'off', false),"
    " set_config('default_transaction_isolation', 'read committed', false),"
    " (SELECT setting FROM pg_settings WHERE name = 'idle_session_timeout')"
)


def _set_up_session(dbapi_connection: Any, record: Any) -> None:
    """Every statement here takes a millisecond or two, and the lease's per-destination
    LIMIT is a guess to the planner (a tenth of the backlog): costed that high, it was
    JIT-compiled on every run, 0.4 s a lease at 1,000,000 waiting. Set on each new session
    rather than as a startup parameter, which PgBouncer refuses. Transactions are READ
    COMMITTED whatever `default_transaction_isolation` the database or the role sets: the
    lease and the completion are written for it, and under SERIALIZABLE workers competing
    for one backlog failed each other's statements (40001) as though the store were
    unreachable, an attempt sent but not recorded. The same round trip reads the
    session's `idle_session_timeout` (store/idle_limit.py)."""
    # On asyncpg itself: a DB-API cursor would open a transaction the kept connections
    # (held.py) then ran every statement inside, never committed.
    row = dbapi_connection.run_async(lambda driver: driver.fetchrow(_SESSION_SET_UP))
    learn_limit(record.info, row[2])


def _ended_by_server(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Refuse a pooled connection the server has ended while it sat idle (an administrator's
    pg_terminate_backend, idle_session_timeout, a proxy failing over), or is about to end
    for idleness (store/idle_limit.py): the pool then opens a new one in its place. Handed
    out, its first statement failed, and the request with it (503), once after every such
    event. asyncpg reads the server's goodbye as it comes, so this costs no round trip,
    unlike `pool_pre_ping` (three on asyncpg: BEGIN, `;`, ROLLBACK); a connection cut
    without a word (the network) is the outage's case."""
    driver = dbapi_connection.driver_connection
    if driver is None or driver.is_closed():
        raise DisconnectionError("the server closed this pooled connection")
    if nearly_ended(record.info):
        raise DisconnectionError("the server ends this pooled connection for idleness")


def _returned(_dbapi_connection: Any, record: Any) -> None:
    went_idle(record.info)


# The lease (sql/lease_postgresql.sql) is written to run as index probes joined by nested
# loops, and is told so: a prepared statement's generic plan is made for the tables as they
# were, and PostgreSQL keeps one made while the deliveries were few once the runs on a large
# backlog cost more on average. Made on a nearly empty table, that plan read every delivery
# and hashed every event at each lease (80–230 ms instead of ~3; a fresh database's first
# burst drained at a third of its speed) until an ANALYZE replaced it. Planning every run
# instead (`plan_cache_mode`) cost the server ~1.2 ms a lease at 30,000 waiting, and more
# once the index ends are dead rows. The ingest and completion statements are left alone.
_LEASE_PLANNER = (
    ("enable_seqscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
)


# Each row a lease reads, joined to the first pending or in-flight delivery of its key: one
# probe of deliveries_ordering per key rather than per row, since PostgreSQL memoizes a
# lateral join by its parameters (the key) where it runs a subquery in WHERE again for every
# row. A key's backlog behind its head in flight is walked at ~0.5 µs a row instead of ~16
# (one key of 20,000 waiting: a lease took 700 ms, now ~30).
_HEAD_OF_ITS_KEY = """LEFT JOIN LATERAL (
    SELECT k.id
    FROM deliveries AS k
    WHERE k.destination_id = d.destination_id
      AND k.ordering_key = d.ordering_key
      AND k.state IN ('pending', 'in_flight')
    ORDER BY k.id
    LIMIT 1
) AS head ON d.ordering_key IS NOT NULL"""


def _inserted_of(events: Sequence[NewEvent], rows: Sequence[Any]) -> Inserted:
    """What the batch statement's rows (id, original) say of its events: those stored
    (original NULL), and each duplicate's original, but for one whose original another
    process committed while the statement ran (not listed)."""
    inserted = {event_id for event_id, original in rows if original is None}
    originals = {event_id: original for event_id, original in rows if original is not None}
    return Inserted(inserted, {event_key(e): originals[e.id] for e in events if e.id in originals})


class PostgresStore(SqlStore):
    dialect = "postgresql"
    lease_sql_file = "lease_postgresql.sql"
    first_of_key = "d.id = head.id"
    lease_snippets: ClassVar[Mapping[str, str]] = {"head of its key": _HEAD_OF_ITS_KEY}
    # Events, their deliveries and their conversations' counters go in one statement.
    deliveries_stored_with_events = True

    def __init__(
        self, *args: Any, connect_args: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._lease = Statement(self.lease_sql)
        # As many as run at once: ingest's concurrent flushes, a worker's lease and completes.
        self._held = HeldConnections(self.engine, keep=8)
        self._held_for_leases = HeldConnections(self.engine, keep=1, planner=_LEASE_PLANNER)
        # What the URL gave asyncpg (store/postgres_connect.py), for migrate()'s engine too.
        self._connect_args = dict(connect_args or {})

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 10) -> PostgresStore:
        """The store for a configured `postgresql://` URL (any form config/models.py takes)."""
        engine_url, from_url = postgres_engine_args(url)
        engine = create_async_engine(
            engine_url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=False,
            connect_args={
                "timeout": CONNECT_TIMEOUT_S,
                **from_url,
                "command_timeout": COMMAND_TIMEOUT_S,
            },
            hide_parameters=True,  # parameters hold phone numbers and message text
        )
        event.listen(engine.sync_engine, "connect", _set_up_session)
        event.listen(engine.sync_engine.pool, "checkout", _ended_by_server)
        event.listen(engine.sync_engine.pool, "checkin", _returned)
        return cls(engine, connect_args=from_url)

    async def require_schema(self) -> None:
        await refuse_transaction_pooling(self.engine, self._connect_args)
        await super().require_schema()

    async def migrate(self) -> None:
        """As every store does, but on a connection of its own with no time limit on its
        statements: a migration may rightly take longer than any request (an index built
        over millions of deliveries, a wait for another process's migration to finish)."""
        await refuse_transaction_pooling(self.engine, self._connect_args)
        engine = create_async_engine(
            self.engine.url,
            poolclass=NullPool,
            connect_args={
                "timeout": CONNECT_TIMEOUT_S,
                **self._connect_args,
                "command_timeout": None,
            },
            hide_parameters=True,
        )
        try:
            await self._migrate_on(engine)
        finally:
            await engine.dispose()

    def _insert(self, table: Any) -> Any:
        return pg_insert(table)

    async def close(self) -> None:
        await self._held.close()
        await self._held_for_leases.close()
        await super().close()

    async def clock_ms(self) -> int:
        """The database server's time: one clock for every process on every machine."""
        async with self._read() as conn:
            return int((await conn.execute(_CLOCK_MS)).scalar_one())

    async def _fetch(self, statement: Statement, params: Mapping[str, Any]) -> list[Any]:
        """A hot statement's rows, run on a kept connection (held.py) outside any
        transaction: one round trip, and its own commit. Its writes (webhooks, attempts) are
        watched for a full disk like the general path's: they bypass `_write`."""
        async with self._held.driver() as driver:
            with self._space_watched():  # inside: it needs the driver's own error
                return list(await driver.fetch(statement.positional, *statement.args(params)))

    # -- ingest -----------------------------------------------------------------------------

    async def _store_candidates(
        self, events: Sequence[NewEvent], *, by_id: bool
    ) -> list[InsertResult]:
        """Webhooks (the hot path) in one autocommitted statement; a batch that also holds
        queued messages or escalations, or a spool import, in the general transaction."""
        if by_id or any(e.message is not None or e.escalation is not None for e in events):
            general = super()._store_candidates
            return await _again_if_deadlocked(lambda: general(events, by_id=by_id))
        if not events:
            return []
        params = _batch_params(events)
        rows = await _again_if_deadlocked(lambda: self._fetch(_STORE_BATCH, params))
        try:
            return await self._fates_of(events, rows)
        except StoreUnavailable:
            raise
        except Exception as exc:
            # The batch is committed: as a bad batch it would be stored again event by event
            # (group_commit.py), one without a key failing on its own id though stored. As
            # unavailable it goes to the spool, whose import finds each event by its id.
            raise StoreUnavailable(
                f"the batch was committed, its fates could not be read: {type(exc).__name__}"
            ) from None  # not chained: a driver's text may quote data (store/base.py)

    async def _fates_of(self, events: Sequence[NewEvent], rows: list[Any]) -> list[InsertResult]:
        """Each event's fate from the batch statement's rows."""
        inserted = _inserted_of(events, rows)
        return fates(events, inserted.ids, (), await self._originals(events, inserted, None))

    async def _insert_new_events(
        self, conn: AsyncConnection, events: Sequence[NewEvent]
    ) -> Inserted:
        if not events:
            return Inserted(set())
        rows = (await conn.execute(_STORE_BATCH.text, _batch_params(events))).all()
        return _inserted_of(events, rows)

    async def _ids_by_key(
        self, conn: AsyncConnection, events: Sequence[NewEvent]
    ) -> dict[Key, str]:
        """One statement, a probe of the key's index per key (sql/ids_by_key_postgresql.sql)."""
        keyed = [e for e in events if e.idempotency_key is not None]
        if not keyed:
            return {}
        params = {
            "tenant_ids": [e.tenant_id for e in keyed],
            "source_ids": [e.source_id for e in keyed],
            "idempotency_keys": [e.idempotency_key for e in keyed],
        }
        rows = (await conn.execute(_IDS_BY_KEY.text, params)).all()
        return {(t, src, k): i for t, src, k, i in rows}

    async def _insert_deliveries(self, conn: AsyncConnection, events: Sequence[NewEvent]) -> None:
        """Nothing left to do: `_insert_new_events` stored them with their events."""

    async def _count_messages(self, conn: AsyncConnection, events: Sequence[NewEvent]) -> None:
        """Nothing left to do: `_insert_new_events` counted them with their events."""

    # -- the delivery lifecycle -------------------------------------------------------------

    async def _lease_rows(self, params: dict[str, Any]) -> list[Any]:
        """The statement reads the store as it was when it began: a delivery of a key stored
        or replayed since may look like the key's head while another worker's lease, not yet
        committed, is putting a later one of the key in flight. The unique index on a key's
        in-flight deliveries makes this lease wait for that one and then fail; nothing of it
        was applied, and the next lease sees the store as it is."""
        async with self._held_for_leases.driver() as driver:
            try:
                return list(await driver.fetch(self._lease.positional, *self._lease.args(params)))
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != ORDERING_IN_FLIGHT:
                    raise
                raise LeaseRaced() from None

    async def complete_batch(self, batch: Sequence[CompletedAttempt], now_ms: int) -> Completed:
        """Attempts and transitions in one statement (sql/complete_postgresql.sql); a batch
        holding message sends also records what the provider answered, in one transaction."""
        if not batch:
            return Completed(0)
        params = _complete_params(batch, now_ms)
        if not any(i.delivery.destination_id.startswith(SEND_DESTINATION_PREFIX) for i in batch):
            [(applied, dead)] = await self._fetch(_COMPLETE, params)
        else:
            async with self._write() as conn:
                applied, dead = (await conn.execute(_COMPLETE.text, params)).one()
                await self._record_sends(conn, batch, now_ms)
        return Completed(int(applied), frozenset(dead))
