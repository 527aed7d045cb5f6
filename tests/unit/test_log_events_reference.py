"""docs/operations.md's table of log events, the runbook an operator reads a log line
against, holds every event the code logs, at the level the code logs it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "operations.md"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}


def logged_events() -> dict[str, set[str]]:
    """Each `log.<level>("event", ...)` in the package: the event and its levels."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "src" / "estafeta").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and re.fullmatch(r"[a-z][a-z_]+", node.args[0].value)
            ):
                continue
            level = "error" if node.func.attr == "exception" else node.func.attr
            found.setdefault(node.args[0].value, set()).add(level)
    return found


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


def test_the_circuit_events_logged_by_state_are_in_the_runbook() -> None:
    # Logged as f"circuit_{state}" (delivery/breakers.py): one row per state.
    from estafeta.delivery.circuit import CircuitState

    documented = documented_levels()
    assert {f"circuit_{state.value}" for state in CircuitState} <= set(documented)
