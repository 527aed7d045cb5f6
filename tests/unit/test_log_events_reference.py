"""docs/operations.md's table of log events, the runbook an operator reads a log line
against, holds every event the code logs, at the level the code logs it, and names the
fields each carries."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "operations.md"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}


def logged_events() -> dict[str, set[str]]:
    """Each event the package logs, and its levels."""
    found: dict[str, set[str]] = {}
    for event, level, _ in logged_calls():
        found.setdefault(event, set()).add(level)
    return found


# Named once above the table, not in each row; and `exc_info`, structlog's traceback.
COMMON_FIELDS = {"worker", "exc_info"}


def logged_calls() -> Iterator[tuple[str, str, list[str]]]:
    """Each `log.<level>("event", ...)` in the package: the event, its level, the fields
    it names (not those spread from a dict)."""
    for path in (ROOT / "src" / "estafeta").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and re.fullmatch(r"[a-z][a-z_]+", node.args[0].value)
            ):
                level = "error" if node.func.attr == "exception" else node.func.attr
                fields = [k.arg for k in node.keywords if k.arg is not None]
                yield node.args[0].value, level, fields


def documented_levels() -> dict[str, str]:
    rows = re.findall(r"^\| `([a-z_]+)` \| ([a-z]+) \|", RUNBOOK.read_text(encoding="utf-8"), re.M)
    return dict(rows)


def test_every_logged_event_is_in_the_runbook_at_its_level() -> None:
    logged = logged_events()
    assert len(logged) > 20  # the scan finds the package's events at all
    documented = documented_levels()
    undocumented = sorted(set(logged) - set(documented))
    assert undocumented == []
    wrong_level = {e: (documented[e], sorted(levels)) for e, levels in logged.items()}
    wrong_level = {e: v for e, v in wrong_level.items() if v[1] != [v[0]]}
    assert wrong_level == {}


def test_every_field_a_line_carries_is_named_in_its_row() -> None:
    # Before: `events_spooled` gained `error` and `server_stopped` `addresses`: nothing
    # held the runbook to say so.
    rows = dict(re.findall(r"^\| `([a-z_]+)` \|(.*)$", RUNBOOK.read_text(encoding="utf-8"), re.M))
    unnamed = {
        (event, field)
        for event, _, fields in logged_calls()
        for field in fields
        if field not in COMMON_FIELDS and f"`{field}`" not in rows.get(event, "")
    }
    assert sorted(unnamed) == []


def test_the_circuit_events_logged_by_state_are_in_the_runbook() -> None:
    # Logged as f"circuit_{state}" (delivery/breakers.py): one row per state.
    from estafeta.delivery.circuit import CircuitState

    documented = documented_levels()
    assert {f"circuit_{state.value}" for state in CircuitState} <= set(documented)
