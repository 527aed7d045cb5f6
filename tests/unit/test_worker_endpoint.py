"""The worker's own endpoint (`worker.metrics_listen`): /metrics of this process, /health
of its supervised tasks, and clear refusals of anything else."""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from estafeta.errors import ServeError
from estafeta.observability.metrics import ATTEMPTS, QUEUE_DEPTH, series
from estafeta.observability.worker_endpoint import start_worker_endpoint
from estafeta.supervise import Tasks
from tests.slow_render import render_waiting_for_the_loop


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[str, Tasks]]:
    tasks = Tasks()
    with capture_logs() as logs:
        runner = await start_worker_endpoint("127.0.0.1:0", tasks)
    [listening] = [entry for entry in logs if entry["event"] == "metrics_listening"]
    port = int(listening["listen"].rsplit(":", 1)[1])
    assert port == runner.addresses[0][1] and port != 0
    try:
        yield f"http://127.0.0.1:{port}", tasks
    finally:
        await runner.cleanup()


async def test_metrics_are_this_processes_counters_without_the_hub_wide_gauges(
    endpoint: tuple[str, Tasks],
) -> None:
    url, _ = endpoint
    series(ATTEMPTS, "endpoint-test", "success").inc(3)
    QUEUE_DEPTH.labels("pending").set(7)  # as a `serve` of this process would have set it
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=")
            text = await response.text()
    finally:
        QUEUE_DEPTH.clear()
    assert (
        'estafeta_delivery_attempts_total{destination="endpoint-test",outcome="success"} 3.0'
        in text
    )
    assert "# TYPE estafeta_deliveries gauge" not in text and "estafeta_deliveries{" not in text
    assert "estafeta_circuit_state" not in text and "estafeta_spool_bytes" not in text


async def test_a_scrape_renders_while_the_event_loop_keeps_turning(
    endpoint: tuple[str, Tasks],
) -> None:
    # Before: the text was rendered on the event loop, which stalled the worker's deliveries
    # for as long as a large registry took to render, at every scrape.
    url, _ = endpoint
    async with (
        render_waiting_for_the_loop() as slow,
        aiohttp.ClientSession() as http,
        http.get(f"{url}/metrics") as response,
    ):
        assert response.status == 200
    assert slow.saw_the_loop_turn == [True]


def worker_metrics_documented() -> set[str]:
    """The metrics docs/operations.md says a worker's /metrics holds."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text("utf-8")
    [listed] = re.findall(
        r"A worker's `/metrics` holds only what that process\s+counted \(([^)]*)\)", text
    )
    return set(re.findall(r"`(estafeta_\w+)`", listed))


async def test_metrics_are_only_the_families_a_worker_counts(
    endpoint: tuple[str, Tasks],
) -> None:
    # Before: the ingest and API families (events accepted, webhooks refused, API errors,
    # spool quarantined) were there too, empty, or at 0 for a spool a worker does not have:
    # a worker listed among the targets of `estafeta_spool_quarantined_total`.
    url, _ = endpoint
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    shown = {name for name in families if not name.endswith("_created")}
    assert shown == worker_metrics_documented(), text
    assert len(shown) == 6


async def test_health_names_a_crashed_task_until_it_runs_again(
    endpoint: tuple[str, Tasks],
) -> None:
    url, tasks = endpoint
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/health") as ok:
            assert ok.status == 200
            assert (await ok.json())["status"] == "ok"
        tasks.down["worker"] = "RuntimeError"
        async with http.get(f"{url}/health") as down:
            assert down.status == 503
            assert await down.json() == {
                "status": "down",
                "crashed": [{"task": "worker", "error": "RuntimeError"}],
            }
        del tasks.down["worker"]
        async with http.get(f"{url}/health") as again:
            assert again.status == 200


async def test_other_paths_and_methods_are_refused_as_the_api_refuses_them(
    endpoint: tuple[str, Tasks],
) -> None:
    url, _ = endpoint
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/api/v1/events") as unknown:
            assert unknown.status == 404
            assert (await unknown.json())["error"] == "not_found"
        async with http.post(f"{url}/metrics", data=b"x") as posted:
            assert posted.status == 405
            assert posted.headers["Allow"] == "GET"
            assert (await posted.json())["error"] == "method_not_allowed"


async def test_an_address_in_use_is_one_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ServeError, match=rf"cannot serve worker.metrics_listen '127.0.0.1:{port}'"
        ):
            await start_worker_endpoint(f"127.0.0.1:{port}", Tasks())
