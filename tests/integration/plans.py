"""Query plans, as the engine explains them, for tests that a read walks only what it answers
(an index range, not a scan and a sort): PostgreSQL's executed plan with the rows each node
read, SQLite's plan steps."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import orjson
from sqlalchemy import Select, event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from estafeta.store.sqlstore import SqlStore


async def explain(store: SqlStore, query: Select[Any]) -> Any:
    """The engine's plan of `query`, its parameters written in."""
    sql = query.compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True})
    return await explain_sql(store, str(sql))


async def explain_sql(store: SqlStore, sql: str, params: Mapping[str, Any] | None = None) -> Any:
    """The engine's plan of `sql` run with `params`: on PostgreSQL the executed plan's root
    node (EXPLAIN ANALYZE runs the statement; whatever it wrote is rolled back), on SQLite
    the plan's steps."""
    async with store.engine.connect() as conn:
        try:
            if store.engine.dialect.name == "postgresql":
                explained = text(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")
                return (await conn.execute(explained, params or {})).scalar_one()[0]["Plan"]
            steps = await conn.execute(text(f"EXPLAIN QUERY PLAN {sql}"), params or {})
            return [row.detail for row in steps]
        finally:
            await conn.rollback()


@contextmanager
def statements_ran(engine: AsyncEngine) -> Iterator[list[tuple[str, Any]]]:
    """The statements run on `engine` meanwhile, as the driver was given them (text and
    parameters), for `explain_ran`."""
    ran: list[tuple[str, Any]] = []

    def note(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        ran.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", note)
    try:
        yield ran
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", note)


async def explain_ran(store: SqlStore, sql: str, parameters: Any) -> Any:
    """The engine's plan (as `explain_sql` gives it) of a statement as the store ran it
    (`statements_ran`)."""
    async with store.engine.connect() as conn:
        try:
            if store.engine.dialect.name == "postgresql":
                explained = f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}"
                found = (await conn.exec_driver_sql(explained, tuple(parameters))).scalar_one()
                return (orjson.loads(found) if isinstance(found, str) else found)[0]["Plan"]
            steps = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", tuple(parameters))
            return [row.detail for row in steps]
        finally:
            await conn.rollback()  # whatever it wrote


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(node for child in plan.get("Plans", []) for node in plan_nodes(child))]


def read(node: dict[str, Any]) -> int:
    """How many rows a node of an executed plan read: those it kept and those it threw away
    after reading them, in every loop (EXPLAIN gives both per loop)."""
    kept = node["Actual Rows"]
    thrown = node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
    return int((kept + thrown) * node["Actual Loops"])


def rows_read(plan: dict[str, Any]) -> dict[str, int]:
    """How many rows of each table the executed plan read."""
    found: dict[str, int] = {}
    for node in plan_nodes(plan):
        if "Relation Name" in node:
            found[node["Relation Name"]] = found.get(node["Relation Name"], 0) + read(node)
    return found


def assert_walks_only(
    store: SqlStore,
    plan: Any,
    table: str,
    indexes: set[str],
    most: int,
    *,
    sorts: bool = False,
) -> None:
    """The plan reads `table` only through `indexes` (named `<table>_…`), and on PostgreSQL,
    where the plan was run, at most `most` of its rows; nothing is sorted unless `sorts`
    (a few rows after a join the planner hashed: at this size, reading a small table
    whole is cheaper than probing it, which is not what a large one gets)."""
    if store.engine.dialect.name == "postgresql":
        nodes = plan_nodes(plan)
        if not sorts:
            assert not {n["Node Type"] for n in nodes} & {"Sort", "Incremental Sort"}, plan
        assert not [
            n for n in nodes if n["Node Type"] == "Seq Scan" and n["Relation Name"] == table
        ], plan
        assert rows_read(plan)[table] <= most, plan
        used = {n["Index Name"] for n in nodes if n.get("Index Name", "").startswith(table)}
        assert used and used <= indexes, (used, plan)
    else:
        if not sorts:
            assert not any("TEMP B-TREE" in step for step in plan), plan
        steps = [step for step in plan if re.match(rf"(SCAN|SEARCH) {table}\b", step)]
        assert steps, plan
        for step in steps:
            found = re.search(r"USING (?:COVERING )?INDEX (\w+)", step)
            assert found and found[1] in indexes, plan


async def kept_plan(store: SqlStore, start: str) -> Any:
    """The generic plan PostgreSQL keeps for the store's prepared statement whose text
    starts with `start`, run (EXPLAIN ANALYZE, every parameter NULL; whatever it wrote is
    rolled back): the plan of each run once PostgreSQL has chosen it, as it has when the
    statement has no parameters, or after five runs when it costs less than the plans made
    per run. Asked on the pool's connection that ran the statement: the tests call the
    store one call at a time, so the pool holds one idle connection."""
    async with store.engine.connect() as conn:
        try:
            found = (
                await conn.execute(
                    text(
                        "SELECT name, cardinality(parameter_types), generic_plans"
                        " FROM pg_prepared_statements WHERE starts_with(statement, :start)"
                    ),
                    {"start": start},
                )
            ).all()
            assert len(found) == 1, found
            [(name, parameters, generic_plans)] = found
            assert generic_plans > 0, "PostgreSQL plans each run: no plan is kept"
            await conn.execute(text("SET LOCAL plan_cache_mode = force_generic_plan"))
            nulls = f"({', '.join(['NULL'] * parameters)})" if parameters else ""
            explained = text(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {name}{nulls}")
            return (await conn.execute(explained)).scalar_one()[0]["Plan"]
        finally:
            await conn.rollback()
