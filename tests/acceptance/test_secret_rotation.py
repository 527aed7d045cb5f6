"""Rotating secrets as an operator does it (docs/operations.md, "Rotating a secret"), with the
real `estafeta` command and a TOML file: a source's `secret` and a destination's `secret`
written as lists of the new and the old."""

from __future__ import annotations

from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    TENANT,
    Estafeta,
    http_destination,
    hub_client,
    hub_config,
    run_cli,
    signed_request,
    write_config,
)
from tests.conftest import ROTATED_SECRET, SINK_SECRET, SOURCE_SECRET, UNKNOWN_SECRET


@pytest.mark.timeout(60)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_serve_accepts_old_and_new_and_signs_for_both(
    database_url: str, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    # The sink verifies with SINK_SECRET: the destination's old secret, listed second.
    crm = http_destination("crm", f"{sink.url}/hooks/crm", secret=[ROTATED_SECRET, SINK_SECRET])
    data = hub_config(
        database_url,
        tmp_path,
        destinations=[crm],
        routes=[{"tenant": TENANT, "events": ["lead.*"], "destinations": ["crm"]}],
    )
    data["sources"][0]["secret"] = [ROTATED_SECRET, SOURCE_SECRET]  # crm-events
    serve = await estafeta.serve(write_config(tmp_path / "estafeta.toml", data))
    async with hub_client(serve) as hub:
        for n, secret in enumerate((UNKNOWN_SECRET, SOURCE_SECRET, ROTATED_SECRET)):
            raw, headers = signed_request(
                {"type": "lead.created", "data": {"n": n}}, f"m{n}", secret
            )
            url = f"{serve.base_url}/in/crm-events"
            async with hub.http.post(url, data=raw, headers=headers) as answer:
                assert answer.status == (401 if secret == UNKNOWN_SECRET else 202)
        assert await sink.wait_for(lambda s: len(s.delivered_ids) == 2, timeout_s=30)
    assert sink.bad_signatures == []
    for received in sink.received:  # the new secret's receiver verifies them too
        headers = received.headers
        assert len(headers["webhook-signature"].split(" ")) == 2
        event = Webhook(ROTATED_SECRET).verify(received.body.decode(), headers)
        assert event["data"]["n"] in (1, 2)
    assert not any(s in serve.stderr() for s in (ROTATED_SECRET, SOURCE_SECRET, SINK_SECRET))


async def test_check_config_locates_a_bad_secret_in_a_list(tmp_path: Path) -> None:
    data = hub_config("sqlite:///./x.db", tmp_path, destinations=[], routes=[])
    data["sources"][0]["secret"] = [ROTATED_SECRET, ROTATED_SECRET]
    data["sources"][1]["api_key"] = []
    bad = write_config(tmp_path / "bad.toml", data)
    result = await run_cli("check-config", str(bad), cwd=tmp_path)
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [
        f"{bad}: sources[0].secret[1]: the same secret as item 0: list each secret once",
        f"{bad}: sources[1].api_key: must not be empty: write at least one secret",
        "2 problems found",
    ]
    assert ROTATED_SECRET not in result.stderr + result.stdout
