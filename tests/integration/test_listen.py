"""Where `serve` and `worker --metrics-listen` say they listen: every address bound. A name
such as `localhost` may resolve to two addresses (127.0.0.1 and ::1), each bound, and with
port 0 each on a port of its own."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from estafeta.observability.worker_endpoint import start_worker_endpoint
from estafeta.server import uvicorn_server
from estafeta.supervise import Tasks

TWO_ADDRESSES = "twice.test"  # resolved, here, as localhost often is: 127.0.0.1 and ::1


@pytest.fixture
async def resolved_twice(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """TWO_ADDRESSES resolves to 127.0.0.1 and ::1 in this test's event loop."""
    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo

    async def getaddrinfo(host: Any, port: Any, **kwargs: Any) -> Any:
        if host != TWO_ADDRESSES:
            return await resolve(host, port, **kwargs)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    yield


async def answers(address: str, path: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://{address}{path}") as response:
        return response.status


def two_ports(addresses: list[str]) -> None:
    """`addresses` are 127.0.0.1 and [::1], each on a port chosen for it."""
    hosts = [address.rpartition(":")[0] for address in addresses]
    ports = [int(address.rpartition(":")[2]) for address in addresses]
    assert sorted(hosts) == ["127.0.0.1", "[::1]"], addresses
    assert all(port > 0 for port in ports), addresses


@pytest.fixture
async def endpoint(resolved_twice: None) -> AsyncIterator[MutableMapping[str, Any]]:
    with capture_logs() as logs:
        runner = await start_worker_endpoint(f"{TWO_ADDRESSES}:0", Tasks())
    try:
        [listening] = [entry for entry in logs if entry["event"] == "metrics_listening"]
        yield listening
    finally:
        await runner.cleanup()


async def test_a_workers_endpoint_on_a_name_of_two_addresses_logs_both(
    endpoint: MutableMapping[str, Any],
) -> None:
    # Before: `metrics_listening` named the first address only; the other one's port, chosen
    # by the system, could be found by no one.
    two_ports(endpoint["addresses"])
    assert endpoint["listen"] == endpoint["addresses"][0]  # as before, for what reads it
    for address in endpoint["addresses"]:
        assert await answers(address, "/health") == 200


async def test_serve_on_a_name_of_two_addresses_says_both(resolved_twice: None) -> None:
    # Before: `serving` named the first address only.
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    started: list[list[str]] = []
    server = uvicorn_server(app, f"{TWO_ADDRESSES}:0", on_started=started.append)
    server.config.lifespan = "off"  # the app above has none
    running = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)
        [addresses] = started
        two_ports(addresses)
        assert server.address == addresses[0]
        for address in addresses:
            assert await answers(address, "/") == 204
    finally:
        server.should_exit = True
        await running
