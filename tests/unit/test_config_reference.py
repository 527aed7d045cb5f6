"""docs/configuration.md, the reference an operator configures from, against the models that
read the file: every key of each section is in its table, with the default it really has."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from estafeta.config.models import (
    DestinationConfig,
    RedisConfig,
    RouteConfig,
    SecurityConfig,
    ServerConfig,
    SourceConfig,
    StorageConfig,
    TenantConfig,
    WorkerConfig,
)

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
SECTIONS: dict[str, type[BaseModel]] = {
    "[server]": ServerConfig,
    "[storage]": StorageConfig,
    "[redis]": RedisConfig,
    "[worker]": WorkerConfig,
    "[security]": SecurityConfig,
    "[[tenants]]": TenantConfig,
    "[[destinations]]": DestinationConfig,
    "[[routes]]": RouteConfig,
}


# Defaults the reference states in words, for they depend on something else.
EXPLAINED = {
    ("[[destinations]]", "url"),  # required for `http`
    ("[[destinations]]", "timeout_s"),  # by kind
    ("[[routes]]", "id"),  # route-N
}


def section(title: str) -> str:
    text = REFERENCE.read_text(encoding="utf-8")
    start = text.index(f"## `{title}`\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def documented_defaults(title: str) -> dict[str, str]:
    """Each key of the section's table, with its default column as written."""
    rows = re.findall(r"^\| `(\w+)` \| [^|]*(?:\\\|[^|]*)* \| ([^|]*) \|", section(title), re.M)
    return dict(rows)


def keys_of(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def written(value: Any) -> str | None:
    """How the reference writes a plain default; None for the ones it explains in words."""
    if value is None:
        return "none"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    return None


@pytest.mark.parametrize("title", SECTIONS)
def test_the_reference_lists_every_key_of_each_section(title: str) -> None:
    assert sorted(documented_defaults(title)) == sorted(keys_of(SECTIONS[title]))


@pytest.mark.parametrize("title", SECTIONS)
def test_the_reference_states_each_plain_default_as_it_is(title: str) -> None:
    documented = documented_defaults(title)
    wrong = {}
    for name, field in SECTIONS[title].model_fields.items():
        key = field.alias or name
        if (title, key) in EXPLAINED:
            continue
        if field.default_factory is not None:
            expected = written(field.default_factory())  # type: ignore[call-arg]
        elif field.default is PydanticUndefined:
            expected = "required"
        else:
            expected = written(field.default)
        if expected is None or key not in documented:
            continue
        stated = documented[key].strip().strip("`")
        if not stated.startswith(expected) and not documented[key].startswith(expected):
            wrong[key] = (documented[key], expected)
    assert wrong == {}


def test_the_reference_names_every_key_a_source_may_have() -> None:
    text = section("[[sources]]")
    missing = [key for key in keys_of(SourceConfig) if f"`{key}`" not in text]
    assert missing == []


def test_the_graph_api_base_is_stated_as_the_one_sends_use() -> None:
    # The example's commented `api_base` said "default" of a base pinned to an older Graph
    # version than the one sends use: uncommented, it moved every send back to it.
    from estafeta.connectors.whatsapp.cloud import DEFAULT_API_BASE, GRAPH_VERSION

    example = (REFERENCE.parents[1] / "config.example.toml").read_text(encoding="utf-8")
    line = next(line for line in example.splitlines() if "api_base = " in line)
    assert f'api_base = "{DEFAULT_API_BASE}"' in line
    assert GRAPH_VERSION in example
    assert f"`{DEFAULT_API_BASE}`" in section("[[sources]]")
    assert f"`{GRAPH_VERSION}`" in section("[[sources]]")


def test_the_example_does_not_promise_what_master_key_does_not_do() -> None:
    # Accepted and unused (the reference says so); the example said it encrypted credentials.
    example = (REFERENCE.parents[1] / "config.example.toml").read_text(encoding="utf-8")
    start = example.index("# master_key")
    said = example[start : example.index("\n\n", start)]
    assert "not used yet" in said
