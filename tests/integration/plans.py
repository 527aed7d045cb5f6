"""Query plans, as the engine explains them, for tests that a read walks only what it answers
(an index range, not a scan and a sort): PostgreSQL's executed plan with the rows each node
read, SQLite's plan steps."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Select, text

from estafeta.store.sqlstore import SqlStore


async def explain(store: SqlStore, query: Select[Any]) -> Any:
    sql = query.compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True})
    async with store.engine.connect() as conn:
        if store.engine.dialect.name == "postgresql":
            explained = f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}"
            return (await conn.execute(text(explained))).scalar_one()[0]["Plan"]
        return [row.detail for row in await conn.execute(text(f"EXPLAIN QUERY PLAN {sql}"))]


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(node for child in plan.get("Plans", []) for node in plan_nodes(child))]


def rows_read(plan: dict[str, Any]) -> dict[str, int]:
    """How many rows of each table the executed plan read, those it kept and those it
    threw away after reading them."""
    read: dict[str, int] = {}
    for node in plan_nodes(plan):
        if "Relation Name" in node:
            rows = node["Actual Rows"] * node["Actual Loops"]
            rows += node.get("Rows Removed by Filter", 0)
            rows += node.get("Rows Removed by Index Recheck", 0)
            read[node["Relation Name"]] = read.get(node["Relation Name"], 0) + rows
    return read


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
