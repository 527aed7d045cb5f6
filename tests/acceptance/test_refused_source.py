"""A source whose every webhook is refused (its sender signs with a secret rotated at one
end only) is alerted on by `serve`, and the alert ends when one of its events is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from estafeta.testing.sink import Sink
from tests.acceptance.conftest import (
    Estafeta,
    hub_client,
    leads_to_crm_config,
    signed_request,
)
from tests.conftest import SINK_SECRET

ALERT = '\nestafeta_alert_firing{alert="webhooks_refused"} '


@pytest.mark.timeout(60)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_source_refused_again_and_again_is_alerted_until_it_is_accepted(
    database_url: str, tmp_path: Path, estafeta: Estafeta, sink: Sink
) -> None:
    config = leads_to_crm_config(
        database_url, tmp_path, sink.url, worker={"alert_webhooks_refused_s": 1}
    )
    serve = await estafeta.serve(config)
    async with hub_client(serve) as hub:
        lead = {"type": "lead.created", "data": {"n": 1}}
        for n in range(3):  # signed with another secret than the source's
            raw, headers = signed_request(lead, f"msg_{n}", secret=SINK_SECRET)
            async with hub.http.post(
                f"{serve.base_url}/in/crm-events", data=raw, headers=headers
            ) as refused:
                assert refused.status == 401
        fired = await serve.wait_log("alert_fired", timeout_s=20)
        assert (fired["alert"], fired["source"], fired["refused"]) == (
            "webhooks_refused",
            "crm-events",
            3,
        )
        assert fired["error"] == "invalid_signature"
        health = await hub.get_json("/health/detailed")
        assert health["checks"]["alerts"]["firing"] == ["webhooks_refused"]
        async with hub.http.get(f"{serve.base_url}/metrics") as scraped:
            assert f"{ALERT}1.0\n" in await scraped.text()

        status, _ = await hub.post_signed(lead, "msg_fixed")  # the right secret again
        assert status == 202
        resolved = await serve.wait_log("alert_resolved", timeout_s=20)
        assert (resolved["alert"], resolved["source"]) == ("webhooks_refused", "crm-events")
        health = await hub.get_json("/health/detailed")
        assert health["checks"]["alerts"]["firing"] == []
