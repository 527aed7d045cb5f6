"""A destination that throttles with `429 Retry-After: 2`: each throttled delivery is tried
again no sooner than 2 s after it was answered, everything is delivered, and 429s do not
open the circuit (a destination asking us to slow down is not a failing destination)."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import pytest

from estafeta.testing.sink import Received, Sink
from tests.acceptance.conftest import (
    TENANT,
    Estafeta,
    HubClient,
    client_session,
    free_port,
    http_destination,
    hub_config,
    summary,
    wait_until,
    write_config,
)
from tests.chaos.conftest import Load, all_delivered, deliveries_by_state, lead, logged
from tests.conftest import SINK_SECRET

EVENTS = 60
THROTTLED = 30  # the first requests answered 429
RETRY_AFTER_S = 2


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(60)
async def test_retry_after_is_honoured_per_delivery_and_everything_arrives(
    chaos_database: str, tmp_path: Path, estafeta: Estafeta
) -> None:
    started = time.monotonic()
    sink = Sink(secret=SINK_SECRET)
    await sink.start()
    sink.fail_first(THROTTLED, 429, headers={"Retry-After": str(RETRY_AFTER_S)})
    try:
        port = free_port()
        config = write_config(
            tmp_path / "estafeta.toml",
            hub_config(
                chaos_database,
                tmp_path,
                port=port,
                # The fast circuit (5 failures) would open at once if a 429 counted.
                destinations=[http_destination("crm", f"{sink.url}/crm", max_attempts=5)],
                routes=[{"tenant": TENANT, "events": ["lead.*"], "destinations": ["crm"]}],
            ),
        )
        serve = await estafeta.serve(config, port)
        assert serve.base_url is not None
        async with client_session() as http:
            load = Load(HubClient(serve.base_url, http))
            await load.burst([lead(n) for n in range(EVENTS)], concurrency=20)
            assert load.refused() == {}
            acknowledged = load.acknowledged()
            assert len(acknowledged) == EVENTS
            missing = await all_delivered(sink, acknowledged, timeout_s=20)
            assert not missing, f"{len(missing)} acknowledged events never delivered"

            async def settled() -> bool:
                return await deliveries_by_state(chaos_database) == {"succeeded": EVENTS}

            await wait_until(settled, timeout_s=10, what="every delivery succeeded")

        by_id: defaultdict[str, list[Received]] = defaultdict(list)
        for r in sink.received:
            by_id[r.webhook_id or ""].append(r)
        throttled = {i: rs for i, rs in by_id.items() if rs[0].status == 429}
        assert len(throttled) == THROTTLED
        for event_id, tries in throttled.items():
            assert [r.status for r in tries] == [429, 200], (event_id, tries)
            waited = tries[1].at - tries[0].at
            assert waited >= RETRY_AFTER_S, f"{event_id} was tried again after {waited:.3f} s"
        assert all(len(rs) == 1 for i, rs in by_id.items() if i not in throttled)
        assert logged(serve, "circuit_open") == []
        summary(
            "chaos destination_throttling",
            sent=load.sent,
            acknowledged=len(acknowledged),
            delivered=len(sink.delivered_ids),
            duplicates=sink.duplicates,
            lost=len(missing),
            started=started,
        )
    finally:
        await sink.stop()
