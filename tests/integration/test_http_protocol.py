"""How `estafeta serve` writes HTTP responses (estafeta/http_protocol.py), on a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from estafeta.http_protocol import CONTINUE, HeadWithBody
from estafeta.server import uvicorn_server


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


HEAD = b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n"


def test_the_head_goes_out_with_the_body_in_one_write() -> None:
    transport = Transport()
    held = HeadWithBody(transport)
    held.write(HEAD)
    assert transport.writes == []
    held.write(b"{}")
    held.write(b"more")  # a streamed response's later chunks pass straight through
    assert transport.writes == [HEAD + b"{}", b"more"]
    assert not held.is_closing()  # everything else is the transport's own


def test_a_100_continue_is_not_held_and_a_response_never_finished_is_dropped() -> None:
    transport = Transport()
    held = HeadWithBody(transport)
    held.write(CONTINUE)
    held.write(HEAD)
    held.close()
    assert transport.writes == [CONTINUE] and transport.closed


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = b"got " + body
    headers = [(b"content-type", b"text/plain")]
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for part in (b"one,", b"two"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    headers.append((b"content-length", str(len(answer)).encode()))
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture
async def port() -> AsyncIterator[int]:
    server = uvicorn_server(app, "127.0.0.1:0")  # any free port: read it back once bound
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield int(server.servers[0].sockets[0].getsockname()[1])
    server.should_exit = True
    await serving


async def exchange(port: int, raw: bytes, *, until: bytes) -> bytes:
    """Send `raw` on one connection; what came back, up to and including `until`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.readuntil(until), 5)
    finally:
        writer.close()
        await writer.wait_closed()


def request(path: str, body: bytes, *extra: bytes) -> bytes:
    head = [b"POST " + path.encode() + b" HTTP/1.1", b"host: t", b"content-length: %d" % len(body)]
    return b"\r\n".join([*head, *extra, b"", body])


async def test_answers_are_whole_and_in_order_on_a_kept_alive_connection(port: int) -> None:
    pipelined = request("/a", b"first") + request("/b", b"second")
    received = await exchange(port, pipelined, until=b"got second")
    first, second = received.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"202 Accepted") and first.endswith(b"\r\n\r\ngot first")
    assert second.startswith(b"202 Accepted") and second.endswith(b"\r\n\r\ngot second")


async def test_a_client_expecting_100_continue_gets_it_before_sending_its_body(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /a HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n"
    )
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == CONTINUE
    writer.write(b"body")
    answer = await asyncio.wait_for(reader.readuntil(b"got body"), 5)
    assert answer.startswith(b"HTTP/1.1 202 Accepted")
    writer.close()
    await writer.wait_closed()


async def test_a_streamed_answer_arrives_whole(port: int) -> None:
    received = await exchange(port, request("/stream", b""), until=b"0\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200 OK")
    assert b"transfer-encoding: chunked" in received
    assert received.endswith(b"4\r\none,\r\n3\r\ntwo\r\n0\r\n\r\n")
