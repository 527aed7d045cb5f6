"""The store: every query estafeta runs, as named operations over SQLAlchemy Core.

`SqlStore` is the one class that serves SQLite and PostgreSQL; what differs between the
engines (connection set-up, the lease statement, the INSERT … ON CONFLICT construct) lives in
`sqlite.py` and `postgres.py`. Its operations come in groups, a module each, composed here:

* `ingest.py`: events stored with their deliveries, deduplicated by key;
* `leases.py`: a worker's leases: lease, complete, release, claim expired ones;
* `dead_letters.py`: list, replay and discard dead deliveries;
* `views.py`: reads for the API, the CLI and health;
* `circuits.py`: the circuit breakers' shared state, when no Redis is configured;
* `messaging.py`: WhatsApp conversations and the messages tenants send;
* `conversations.py`: reads of conversations, and of their messages page by page;
* `processes.py`: the running processes and the destinations their configurations name;
* `api_keys.py`: the tenants' API keys (created, listed, revoked; audited in `audit.py`).

What belongs to the store as a whole stays here: its schema's version, and what operators
configure (tenants with their sources, destinations and routes).
The engines, the transaction helpers and the translation of drivers' errors are in `base.py`.
Runtime code outside this package holds no SQL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from sqlalchemy import bindparam, select, update

from estafeta.delivery.state import DeliveryState
from estafeta.errors import StoreError
from estafeta.messaging.facts import SEND_DESTINATION_PREFIX
from estafeta.store import schema as s
from estafeta.store.api_keys import ApiKeyOps
from estafeta.store.base import store_errors
from estafeta.store.circuits import CircuitOps
from estafeta.store.conversations import ConversationOps
from estafeta.store.dead_letters import DeadLetterOps
from estafeta.store.ingest import IngestOps
from estafeta.store.leases import LeaseOps
from estafeta.store.processes import ProcessOps
from estafeta.store.views import ViewOps, state_is
from estafeta.urls import outline

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from estafeta.config import Config
    from estafeta.store.records import DeadLetterFilter


class SqlStore(
    IngestOps,
    LeaseOps,
    DeadLetterOps,
    ViewOps,
    CircuitOps,
    ProcessOps,
    ConversationOps,
    ApiKeyOps,
):
    """Base class; use `open_store(url)` to get the one for an engine."""

    dialect: ClassVar[str]

    async def migrate(self) -> None:
        """Create or upgrade the schema to the newest migration."""
        await self._migrate_on(self.engine)

    async def _migrate_on(self, engine: AsyncEngine) -> None:
        from estafeta.store.migrate import upgrade

        with store_errors():  # not chained: a driver's text may quote data (store/base.py)
            await upgrade(engine)

    async def require_schema(self) -> None:
        """Refuse a database whose schema is not this version's (never migrated, or by an
        older or newer estafeta): its statements would fail one by one with the driver's
        own errors, far from the cause."""
        from estafeta.store.migrate import current_revision, schema_problem

        # On the read engine: on SQLite, the writer's BEGIN IMMEDIATE would make every
        # command, read-only ones too, wait for (and fail behind) a write lock held elsewhere.
        with store_errors():
            current = await current_revision(self.read_engine)
        problem = schema_problem(current)
        if problem is not None:
            raise StoreError(f"the database {problem}")

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
        # Where each points only: its user, password, path or query may be its credentials,
        # which nothing reads from here and every dump of the database would hold.
        destinations: list[dict[str, Any]] = [
            {
                "id": d.id,
                "tenant_id": d.tenant,
                "kind": d.kind,
                "url": None if d.url is None else outline(d.url),
            }
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
                if not rows:
                    continue
                for row in rows:
                    row["updated_at"] = now_ms
                # In id order, not the file's: processes starting at once on files that list
                # them in another order (a rolling change) would each hold a row the other
                # waits for, a deadlock on PostgreSQL that fails one of them at start.
                rows.sort(key=lambda row: str(row["id"]))
                # One executemany per table: a statement per row took seconds at every start
                # for a configuration of hundreds of tenants.
                stmt = self._insert(table)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["id"],
                    set_={k: getattr(stmt.excluded, k) for k in rows[0] if k != "id"},
                )
                await conn.execute(stmt, rows)
            await _outline_stored_urls(conn)

    async def tenant_exists(self, tenant_id: str) -> bool:
        query = select(s.tenants.c.id).where(s.tenants.c.id == tenant_id)
        async with self._read() as conn:
            return (await conn.execute(query)).first() is not None

    async def destination_exists(self, destination_id: str, tenant_id: str | None = None) -> bool:
        """A configured destination, or a provider source's sends (`send:<source id>`), of
        `tenant_id` when one is given."""
        source_id = destination_id.removeprefix(SEND_DESTINATION_PREFIX)
        table = s.sources if source_id != destination_id else s.destinations
        query = select(table.c.id).where(table.c.id == source_id)
        if tenant_id is not None:
            query = query.where(table.c.tenant_id == tenant_id)
        async with self._read() as conn:
            return (await conn.execute(query)).first() is not None

    async def unknown_in(self, chosen: DeadLetterFilter) -> tuple[str, str] | None:
        """The tenant or destination a DLQ selection names that the store does not know, as
        (what, name): such a selection finds nothing, whatever the DLQ holds, and "0 dead
        deliveries" would hide the typo. A tenant's selection knows only its destinations,
        and those its dead deliveries name: a destination id the configuration has since
        given to another tenant leaves them dead there (`unknown_destination`)."""
        if chosen.tenant_id is not None and not await self.tenant_exists(chosen.tenant_id):
            return "tenant", chosen.tenant_id
        destination = chosen.destination_id
        if (
            destination is not None
            and not await self.destination_exists(destination, chosen.tenant_id)
            and not (
                chosen.tenant_id is not None and await self._has_dead(chosen.tenant_id, destination)
            )
        ):
            return "destination", destination
        return None

    async def _has_dead(self, tenant_id: str, destination_id: str) -> bool:
        """Whether a dead delivery of `tenant_id` names `destination_id` (by the tenant's
        index by state; asked only when the store does not give the tenant that destination)."""
        d = s.deliveries
        query = select(d.c.id).where(
            d.c.tenant_id == tenant_id,
            state_is(DeliveryState.DEAD),
            d.c.destination_id == destination_id,
        )
        async with self._read() as conn:
            return (await conn.execute(query.limit(1))).first() is not None


async def _outline_stored_urls(conn: AsyncConnection) -> None:
    """Rewrite every destination URL stored whole (by a version before the outline) to its
    outline, those of destinations since removed from the file too: sync never deletes
    their rows, which would keep a hook's token in every dump for good. One read of a row
    per destination at start; a write only the first time."""
    d = s.destinations
    rows = (await conn.execute(select(d.c.id, d.c.url).where(d.c.url.is_not(None)))).all()
    outlines = ((i, url, outline(url)) for i, url in rows)
    whole = [{"b_id": i, "b_url": short} for i, url, short in outlines if short != url]
    if whole:
        await conn.execute(
            update(d).where(d.c.id == bindparam("b_id")).values(url=bindparam("b_url")), whole
        )
