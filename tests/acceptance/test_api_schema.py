"""The HTTP API against its own OpenAPI document, with schemathesis, on PostgreSQL (whose
column types and text rules are the strict ones): whatever a client sends to any operation,
valid by the schema or not, the answer is never a server error.

One `estafeta serve` for the module, on a database of its own; every operation gets a
bounded number of generated requests, each sent twice: with the admin key (who reads every
tenant) and with a tenant's key (who alone may publish, send and act on conversations).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from estafeta.api.app import create_app
from estafeta.config import load_config_dict
from estafeta.hub import Hub
from estafeta.store import open_store
from tests.acceptance.conftest import (
    ADMIN_KEY,
    TENANT,
    Estafeta,
    free_port,
    run_cli,
    write_config,
)
from tests.conftest import base_config, fresh_database

EXAMPLES_PER_OPERATION = 100


@dataclass(frozen=True)
class Served:
    """The hub under test: where it answers, and a tenant's API key."""

    url: str
    tenant_key: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with fresh_database("estafeta_api_schema") as database_url:
        yield from _serve(tmp_path_factory.mktemp("api-schema"), database_url)


def _serve(workdir: Path, database_url: str) -> Iterator[Served]:
    """`estafeta serve` on `database_url` until the generator is closed, and a tenant key."""
    settings = base_config(
        database_url,
        server={"listen": f"127.0.0.1:{free_port()}"},
        storage={"url": database_url, "spool_dir": str(workdir / "spool")},
    )
    # A source that can send, named as the API's example names one, so that generated
    # messages get past "unknown source" into validation and queueing. Its provider is a
    # closed port: queued sends fail and are retried, which is the worker's business.
    settings["sources"].append(
        {
            "id": "wa-sol",
            "tenant": TENANT,
            "kind": "whatsapp_cloud",
            "app_secret": "schema-app-secret",
            "verify_token": "schema-verify-token",
            "access_token": "schema-access-token",
            "phone_number_id": "106540352242922",
            "api_base": "http://127.0.0.1:9",
        }
    )
    config = write_config(workdir / "estafeta.toml", settings)
    launcher = Estafeta(workdir)

    async def started() -> Served:
        server = await launcher.serve(config)
        created = await run_cli(
            "keys", "create", "--config", str(config), "--tenant", TENANT, cwd=workdir
        )
        assert created.returncode == 0, created
        return Served(server.base_url, created.stdout.strip())

    try:
        yield asyncio.run(started())  # this module's tests are not coroutines
    finally:
        launcher.kill_all()


def _openapi() -> dict[str, Any]:
    """The API's OpenAPI document, as `GET /openapi.json` serves it (built without I/O: the
    store is never opened), so that operations are known when tests are collected."""
    config = load_config_dict(base_config("sqlite:///never-opened.db"))
    document: dict[str, Any] = create_app(Hub(config, open_store(config.storage.url))).api.openapi()
    return document


schema = schemathesis.openapi.from_dict(_openapi())


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_request_gets_a_server_error(case: schemathesis.Case[Any], served: Served) -> None:
    for key in (ADMIN_KEY, served.tenant_key):
        case.call_and_validate(
            base_url=served.url,
            headers={"authorization": f"Bearer {key}"},
            checks=[not_a_server_error],
        )
