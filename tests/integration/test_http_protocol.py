"""How `estafeta serve` writes HTTP responses (estafeta/http_protocol.py), on a real server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from estafeta.api.app import create_app
from estafeta.config import Config
from estafeta.http_protocol import CONTINUE, MAX_PIPELINED, HeadWithBody
from estafeta.hub import Hub
from estafeta.observability.metrics import REGISTRY
from estafeta.store.sqlstore import SqlStore
from estafeta.testing.sink import Sink
from tests.conftest import port_of, served, serving


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


BIG = b"x" * 8_388_608


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
    if scope["path"] == "/slow":  # the server's own time: no client's deadline runs
        await asyncio.sleep(1.5)
    if scope["path"] == "/big":  # more than the kernel holds for a client not reading
        answer = BIG
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
    async with served(app) as bound:
        yield bound


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


async def test_a_head_request_is_answered(port: int) -> None:
    raw = b"HEAD /a HTTP/1.1\r\nhost: t\r\n\r\n"
    received = await exchange(port, raw, until=b"\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 202 Accepted")
    assert b"content-length: 4" in received  # "got " is what a GET would carry


async def test_a_head_request_then_a_get_on_one_connection(port: int) -> None:
    raw = b"HEAD /a HTTP/1.1\r\nhost: t\r\n\r\n" + request("/b", b"x")
    received = await exchange(port, raw, until=b"got x")
    assert received.count(b"HTTP/1.1 202") == 2


# -- the real application, served as `estafeta serve` serves it -------------------------------


@pytest.fixture
async def hub_port(store: SqlStore, config: Config) -> AsyncIterator[int]:
    async with served(create_app(Hub(config, store))) as bound:
        yield bound


async def test_head_of_the_health_check_is_answered(hub_port: int) -> None:
    """Load balancers and uptime monitors probe with HEAD: no HEAD got an answer (the head
    was held for a body uvicorn never writes for HEAD), so they saw the hub as down."""
    raw = b"HEAD /health HTTP/1.1\r\nhost: t\r\n\r\n" + b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n"
    received = await exchange(hub_port, raw, until=b'"status":"ok"')
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert rest.startswith(b"HTTP/1.1 200 OK")  # no body after the HEAD's head


async def test_head_of_an_api_path_is_its_gets_head_without_a_body(hub_port: int) -> None:
    # Answered as the GET (here its 401), with the GET's Content-Length and no body: the
    # next answer on the connection starts right after the head.
    raw = (
        b"HEAD /api/v1/dlq HTTP/1.1\r\nhost: t\r\n\r\n" + b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n"
    )
    received = await exchange(hub_port, raw, until=b'"status":"ok"')
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 Unauthorized")
    assert (
        b"content-length: %d"
        % len(b'{"error":"missing_credentials","detail":"send Authorization: Bearer <api key>"}')
        in head.lower()
    )
    assert rest.startswith(b"HTTP/1.1 200 OK")


async def test_an_ingest_answer_carries_its_content_length(hub_port: int) -> None:
    raw = (
        b"POST /in/nosuch HTTP/1.1\r\nhost: t\r\n"
        b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    )
    received = await exchange(hub_port, raw, until=b"}")
    head = received.partition(b"\r\n\r\n")[0]
    assert received.startswith(b"HTTP/1.1 404")
    assert b"transfer-encoding" not in head.lower()
    assert (
        b"content-length: %d"
        % len(b'{"error":"unknown_source","detail":"no source named \'nosuch\'"}')
        in head
    )


async def test_an_http_1_0_client_gets_no_chunked_framing(hub_port: int) -> None:
    # RFC 9112 §6.1: a server MUST NOT send Transfer-Encoding to an HTTP/1.0 request.
    raw = (
        b"POST /in/nosuch HTTP/1.0\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", hub_port)
    writer.write(raw)
    received = await asyncio.wait_for(reader.read(), 5)  # HTTP/1.0: closed after the answer
    writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert body.startswith(b'{"error":"unknown_source"')


async def raw_http_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with a body sent in two parts, the second looking like a response head
    (a body that quotes raw HTTP: a captured request, a log line, a test fixture)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    parts = [b"quoted:", b"HTTP/1.1 200 OK\r\nx: y\r\n\r\n"]
    headers = [(b"content-length", str(sum(map(len, parts))).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": parts[0], "more_body": True})
    await send({"type": "http.response.body", "body": parts[1]})


async def test_a_body_part_that_looks_like_a_head_is_not_held() -> None:
    async with served(raw_http_app) as port:
        received = await exchange(port, b"GET / HTTP/1.1\r\nhost: t\r\n\r\n", until=b"x: y\r\n\r\n")
    assert received.endswith(b"\r\n\r\nquoted:HTTP/1.1 200 OK\r\nx: y\r\n\r\n")


# -- the test destination (estafeta/testing/sink.py) -------------------------------------------


async def test_the_sink_takes_an_event_as_large_as_the_hub_delivers() -> None:
    # The hub accepts bodies up to server.max_body_bytes (1 MiB by default, no upper bound)
    # and delivers each event wrapped in its envelope (id, tenant, source, timestamps: ~200
    # bytes more). aiohttp refuses bodies over 1 MiB unless told otherwise.
    body = b'{"id":"evt_1","data":{"s":"' + b"x" * 1_048_576 + b'"}}'
    async with Sink() as sink, httpx.AsyncClient() as client:
        answer = await client.post(f"{sink.url}/hook", content=body, headers={"webhook-id": "e1"})
        assert answer.status_code == 200
        assert sink.delivered_ids == {"e1"} and sink.received[0].body == body


# -- framing on the real application: half-closes and refused `100 Continue`s ------------------

WEBHOOK = b'{"type":"crm.note","data":{"n":1}}'


def webhook(body: bytes = WEBHOOK, *extra: bytes) -> bytes:
    head = [
        b"POST /in/keyed HTTP/1.1",
        b"host: t",
        b"authorization: Bearer source-key-1",
        b"content-type: application/json",
        b"content-length: %d" % len(body),
    ]
    return b"\r\n".join([*head, *extra, b"", body])


@contextlib.asynccontextmanager
async def connected(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_to_the_end(reader: asyncio.StreamReader) -> bytes:
    """All the server sends until it closes the connection (bounded: 5 s)."""
    return await asyncio.wait_for(reader.read(), 5)


async def test_a_client_that_half_closes_after_its_request_gets_its_answer(
    hub_port: int, store: SqlStore
) -> None:
    """Closing the writing side after the request is how some clients say "that was all"
    (`nc -N`, scripts, a few HTTP/1.0 libraries). The event was stored and no answer sent, so
    the sender, seeing none, sent the event again: stored twice."""
    async with connected(hub_port) as (reader, writer):
        writer.write(webhook() + b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        writer.write_eof()
        received = await read_to_the_end(reader)  # answered in order, then closed
    first, second = received.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"202 Accepted")
    event_id = first.partition(b'"id":"')[2].partition(b'"')[0].decode()
    assert await store.get_event(event_id, None) is not None
    assert second.startswith(b"200 OK") and second.endswith(b'"status":"ok","version":"0.1.0"}')
    assert b"connection: close" in second


async def test_a_request_cut_short_by_a_half_close_is_not_answered(
    hub_port: int, store: SqlStore
) -> None:
    async with connected(hub_port) as (reader, writer):
        writer.write(webhook()[:-5])  # the body misses its last bytes
        writer.write_eof()
        assert await read_to_the_end(reader) == b""


async def test_a_refused_100_continue_closes_the_connection(hub_port: int) -> None:
    """Refused before its body was asked for, the client may send the body or not: reusing
    the connection, its next request was read as the first one's body, and never answered."""
    head = webhook(b"x" * 2_000_000, b"expect: 100-continue").partition(b"\r\n\r\n")[0]
    async with connected(hub_port) as (reader, writer):
        writer.write(head + b"\r\n\r\n")
        received = await read_to_the_end(reader)
    assert received.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in received
    assert b"connection: close" in received.partition(b"\r\n\r\n")[0]


async def test_an_accepted_100_continue_keeps_the_connection(hub_port: int) -> None:
    head, _, body = webhook(WEBHOOK, b"expect: 100-continue").partition(b"\r\n\r\n")
    async with connected(hub_port) as (reader, writer):
        writer.write(head + b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == CONTINUE
        writer.write(body + b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        received = await asyncio.wait_for(reader.readuntil(b'"version":"0.1.0"}'), 5)
    assert received.startswith(b"HTTP/1.1 202 Accepted")
    assert received.count(b"HTTP/1.1 ") == 2 and b"connection: close" not in received


async def test_a_body_refused_unread_is_not_taken_for_the_next_request(hub_port: int) -> None:
    """A 401 and a 404 are answered before their bodies are read; each body, a request in
    disguise, is skipped by its length, not answered (no request smuggling)."""
    hidden = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
    unsigned = webhook(hidden).replace(b"authorization: Bearer source-key-1\r\n", b"")
    unknown = unsigned.replace(b"/in/keyed", b"/in/nosuch")
    async with connected(hub_port) as (reader, writer):
        writer.write(unsigned + unknown + b"GET /nothing HTTP/1.1\r\nhost: t\r\n\r\n")
        received = await asyncio.wait_for(reader.readuntil(b'"no such path"}'), 5)
    statuses = [part[:3] for part in received.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [b"401", b"404", b"404"]
    assert b'"status":"ok"' not in received


# -- clients that would hold the server's connections (each counts against -----------------
# -- server.max_concurrent_requests from its opening) or its memory ---------------------------


async def until(condition: Callable[[], bool], within_s: float) -> None:
    async with asyncio.timeout(within_s):
        while not condition():
            await asyncio.sleep(0.02)


async def test_connections_that_begin_no_request_are_closed_and_let_senders_in() -> None:
    """16 connections that never sent a byte (one only blank lines, which begin no request)
    made every sender's request a 503, for as long as they stayed open: forever."""
    async with serving(app, max_concurrent_requests=16, idle_timeout_s=1) as server:
        port = port_of(server)
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(16)]

        async def blank_lines(writer: asyncio.StreamWriter) -> None:
            while not writer.is_closing():
                writer.write(b"\r\n")
                await asyncio.sleep(0.2)

        blanks = asyncio.create_task(blank_lines(idle[0][1]))
        try:
            ends = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in idle)), 5)
            assert ends == [b""] * 16
            answer = await exchange(port, request("/a", b"x"), until=b"got x")
            assert answer.startswith(b"HTTP/1.1 202 ")
        finally:
            blanks.cancel()
            for _, writer in idle:
                writer.close()


async def test_a_head_sent_a_byte_at_a_time_is_cut_off_with_408() -> None:
    async with served(app, client_timeout_s=1) as port, connected(port) as (reader, writer):

        async def trickle() -> None:
            for byte in b"POST /a HTTP/1.1\r\nhost: t\r\nx-slow: " + b"y" * 200:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)

        sending = asyncio.create_task(trickle())
        try:
            received = await read_to_the_end(reader)
        finally:
            sending.cancel()
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"connection: close\r\n" in received
    assert received.endswith(
        b'"error":"request_timeout","detail":"the request did not arrive whole within 1 s"}'
    )


async def test_a_body_that_stops_coming_is_cut_off_with_408() -> None:
    async with served(app, client_timeout_s=1) as port, connected(port) as (reader, writer):
        writer.write(request("/a", b"x" * 100)[:-90])
        received = await read_to_the_end(reader)
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


async def test_the_deadline_is_the_clients_alone() -> None:
    """An answer that takes the server longer than client_timeout_s is not cut off, nor is
    a request that arrives in pieces in time, nor the next one on the connection."""
    async with served(app, client_timeout_s=1) as port, connected(port) as (reader, writer):
        writer.write(request("/slow", b"first"))
        answer = await asyncio.wait_for(reader.readuntil(b"got first"), 5)
        assert answer.startswith(b"HTTP/1.1 202 ")
        raw = request("/a", b"second")
        for part in (raw[:10], raw[10:30], raw[30:]):
            writer.write(part)
            await asyncio.sleep(0.3)
        answer = await asyncio.wait_for(reader.readuntil(b"got second"), 5)
        assert answer.startswith(b"HTTP/1.1 202 ")


async def test_a_head_over_64_kib_is_refused_with_431() -> None:
    """The head was read whole however large, and held in memory: a 64 MB header took the
    server's memory 128 MB up, and its loop 25 s of copying."""
    loop = asyncio.get_running_loop()
    async with served(app) as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setblocking(False)
            received = b""
            with contextlib.suppress(ConnectionError):
                await loop.sock_sendall(sock, b"GET /a HTTP/1.1\r\nhost: t\r\nx-big: ")
                for _ in range(256):  # 4 MiB of one header, if the server reads it all
                    await asyncio.wait_for(loop.sock_sendall(sock, b"y" * 16384), 5)
            with contextlib.suppress(ConnectionError):
                while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 5):
                    received += chunk
    assert received.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert received.endswith(
        b'"error":"headers_too_large","detail":"the request\'s head is over 65536 bytes"}'
    )


@pytest.mark.parametrize(
    "parts",
    [
        [b"GET /a HTTP/1.1\r\nhost: t\r\nx-big: " + b"y" * 70_000 + b"\r\n\r\n"],
        [b"GET /a?" + b"q" * 70_000 + b" HTTP/1.1\r\nhost: t\r\n\r\n"],
        [b"GET /a HTTP/1.1\r\nhost: t\r\nx-big: " + b"y" * 60_000, b"y" * 40_000 + b"\r\n\r\n"],
    ],
    ids=["a-header-in-one-read", "a-url-in-one-read", "a-header-in-two-reads"],
)
async def test_a_head_over_64_kib_sent_whole_is_refused_with_431(parts: list[bytes]) -> None:
    """Only a head still unfinished past 64 KiB of later reads was refused: one that came whole
    in a read or two (the same request on a faster link) was answered, a URL over 65,535 bytes
    with uvicorn's plain `Invalid HTTP request received.`"""
    async with served(app) as port, connected(port) as (reader, writer):
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.1)  # a read each
        received = await read_to_the_end(reader)
    assert received.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert received.endswith(
        b'"error":"headers_too_large","detail":"the request\'s head is over 65536 bytes"}'
    )


async def test_trailer_fields_over_64_kib_are_refused_with_431(port: int) -> None:
    """Fields after a chunked body (trailers) were kept, however many, until the request
    ended: a client could grow the server's memory by megabytes a second for as long as
    client_timeout_s, past the limit its head has."""
    chunked = request("/a", b"").replace(b"content-length: 0", b"transfer-encoding: chunked")
    async with connected(port) as (reader, writer):
        writer.write(chunked + b"2\r\nok\r\n0\r\n")
        await asyncio.sleep(0.1)  # a read of its own
        writer.write((b"x-t: " + b"y" * 1_000 + b"\r\n") * 100)  # 100 KB, unfinished
        received = await read_to_the_end(reader)
    assert received.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), received
    assert received.endswith(
        b'"error":"headers_too_large","detail":"the request\'s trailer fields are over 65536'
        b' bytes"}'
    )


async def test_a_chunk_over_64_kib_is_not_taken_for_trailer_fields(port: int) -> None:
    chunked = request("/a", b"").replace(b"content-length: 0", b"transfer-encoding: chunked")
    data = b"z" * 1_048_576
    async with connected(port) as (reader, writer):
        writer.write(chunked + b"100000\r\n")  # one chunk of 1 MiB, its header read alone
        for part in range(0, len(data), 262_144):
            await asyncio.sleep(0.05)
            writer.write(data[part : part + 262_144])
        writer.write(b"\r\n0\r\nx-t: 1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        body = await asyncio.wait_for(reader.readexactly(4 + len(data)), 5)
    assert head.startswith(b"HTTP/1.1 202 ") and body == b"got " + data


async def test_a_request_that_is_not_http_is_told_why(port: int) -> None:
    async with connected(port) as (reader, writer):
        writer.write(request("/a", b"x", b"content-length: 2"))  # two lengths: which one?
        received = await read_to_the_end(reader)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close" in head and b"content-type: application/json" in head
    assert body == (
        b'{"error":"invalid_request",'
        b'"detail":"the request is not valid HTTP: Duplicate Content-Length"}'
    )


async def test_a_url_that_cannot_be_parsed_is_not_quoted_in_the_log(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    async with connected(port) as (reader, writer):
        writer.write(b"CONNECT secret-token:443 HTTP/1.1\r\nhost: t\r\n\r\n")
        received = await read_to_the_end(reader)
    assert received.endswith(b'"the request is not valid HTTP: the URL cannot be parsed"}')
    assert "secret-token" not in caplog.text
    assert "Invalid HTTP request received: the URL cannot be parsed" in caplog.text


NOT_HTTP = b"GET /a HTTP/1.1\r\nhost: t\r\nx-a: b\x01c\r\n\r\n"  # a control character
# A chunked body whose chunk size is no number.
BAD_CHUNK = b"POST /a HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n"
# A head that goes on past 64 KiB, in reads of its own.
HEAD_TOO_LARGE = [b"GET /a HTTP/1.1\r\nhost: t\r\nx-big: ", b"y" * 100_000]


@pytest.mark.parametrize(
    ("after", "refusal"),
    [([NOT_HTTP], b"400 "), ([BAD_CHUNK], b"400 "), (HEAD_TOO_LARGE, b"431 ")],
    ids=["not-http", "a-body-not-http", "a-head-too-large"],
)
async def test_a_request_refused_behind_one_being_answered_waits_for_its_answer(
    port: int, after: list[bytes], refusal: bytes
) -> None:
    """The refusal was written at once and the connection closed: the answer to the request
    before it, already in hand (a webhook stored), never went out."""
    async with connected(port) as (reader, writer):
        writer.write(request("/slow", b"first"))
        for part in after:
            await asyncio.sleep(0.2)  # the first being answered; a read each
            writer.write(part)
        received = await read_to_the_end(reader)
    answers = received.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 2, received
    assert answers[0].startswith(b"202 ") and answers[0].endswith(b"got first")
    assert answers[1].startswith(refusal) and b"connection: close" in answers[1]


async def test_an_api_body_that_is_not_http_is_counted_as_answered(hub_port: int) -> None:
    """The sender is answered by the server (400, the parser's reason); the API counted a 401
    instead, having looked for the key of a request it never answered."""
    counted = {"status": "400", "error": "invalid_request"}
    before = REGISTRY.get_sample_value("estafeta_api_errors_total", counted) or 0
    raw = (
        b"POST /api/v1/events HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n"
    )
    async with connected(hub_port) as (reader, writer):
        writer.write(raw)
        await asyncio.sleep(0.2)  # the API waits for the rest of the body
        writer.write(b"zz\r\n")
        received = await read_to_the_end(reader)
    assert received.startswith(b"HTTP/1.1 400 ")
    assert received.endswith(b'"the request is not valid HTTP: Invalid character in chunk size"}')
    await until(
        lambda: REGISTRY.get_sample_value("estafeta_api_errors_total", counted) == before + 1, 5
    )


async def test_a_webhook_pipelined_before_a_request_that_is_not_http_is_answered(
    hub_port: int, store: SqlStore
) -> None:
    """Stored, and answered only with the next request's `400 Invalid HTTP request
    received.`: its sender took the 400 for its own and sent it again, or gave it up."""
    async with connected(hub_port) as (reader, writer):
        writer.write(webhook() + b"GARBAGE\r\n\r\n")
        received = await read_to_the_end(reader)
    first, second = received.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"202 Accepted")
    event_id = first.partition(b'"id":"')[2].partition(b'"')[0].decode()
    assert await store.get_event(event_id, None) is not None
    assert second.startswith(b"400 Bad Request")
    assert second.endswith(b'"the request is not valid HTTP: Invalid method encountered"}')


async def test_a_client_that_never_reads_its_answer_is_let_go() -> None:
    """A client that asks and never reads held its connection, and the answer waiting for
    it, forever: uvicorn's close waits for the answer to be read."""
    loop = asyncio.get_running_loop()
    async with serving(app, client_timeout_s=1, idle_timeout_s=1) as server:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port_of(server)))
            await loop.sock_sendall(sock, b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n")
            await until(lambda: server.server_state.total_requests == 1, 5)
            await until(lambda: not server.server_state.connections, 5)


@pytest.mark.parametrize(
    ("chunk", "pause_s"),
    [
        (1_048_576, 0.2),  # 1 MiB every 0.2 s: 1.6 s in all
        # 128 KiB every 0.1 s, 6.4 s in all: the kernel holds megabytes of an answer and takes
        # more from the server only once a third of them is read, so the server's share stayed
        # unmoved for over a second, and the client was let go after 0.5 s mid-answer (with
        # 30 s: any client under 45 KB/s).
        (131_072, 0.1),
    ],
    ids=["reading-fast-enough-for-the-kernel", "reading-slower-than-the-kernel-refills"],
)
async def test_a_client_that_reads_its_answer_slowly_gets_it_whole(
    chunk: int, pause_s: float
) -> None:
    async with (
        served(app, client_timeout_s=0.5) as port,
        connected(port) as (reader, writer),
    ):
        writer.write(b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 202 ")
        body = b""
        while len(body) < len(BIG):
            body += await asyncio.wait_for(reader.readexactly(min(chunk, len(BIG) - len(body))), 5)
            await asyncio.sleep(pause_s)
    assert body == BIG


async def test_a_webhook_whose_body_stops_coming_is_answered_408(
    store: SqlStore, config: Config
) -> None:
    async with (
        served(create_app(Hub(config, store)), client_timeout_s=1) as port,
        connected(port) as (reader, writer),
    ):
        counted = {"source": "keyed", "error": "request_timeout"}
        before = REGISTRY.get_sample_value("estafeta_ingest_refused_total", counted) or 0
        writer.write(webhook()[:-5])
        received = await read_to_the_end(reader)
        assert received.startswith(b"HTTP/1.1 408 ")
        assert b'"error":"request_timeout"' in received

        # Counted and logged as the sender was answered, not as a client gone away (400):
        # the app learns of it as the connection closes.
        def refused() -> float | None:
            return REGISTRY.get_sample_value("estafeta_ingest_refused_total", counted)

        await until(lambda: refused() == before + 1, 5)


async def test_a_request_answered_before_its_body_came_gets_no_second_answer(
    store: SqlStore, config: Config
) -> None:
    """Answered at once (an unknown source, a declared length over the limit …), its body
    kept being read, and when it did not come whole in time a 408 followed: two answers to
    one request, the second read by the client as the next one's."""
    async with (
        served(create_app(Hub(config, store)), client_timeout_s=1) as port,
        connected(port) as (reader, writer),
    ):
        unknown = webhook(b"x" * 500).replace(b"/in/keyed", b"/in/nosuch")
        writer.write(unknown[:-490])  # the body stops coming
        received = await read_to_the_end(reader)
    assert received.count(b"HTTP/1.1 ") == 1, received
    assert received.startswith(b"HTTP/1.1 404 ")


async def test_pipelined_requests_past_16_waiting_are_left_unanswered() -> None:
    """Every request of a read was parsed and queued: 250 KB of small pipelined requests
    behind one slow answer held 11,000 waiting requests, 28 MB, per connection."""
    pipelined = request("/slow", b"first") + b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n" * 1000
    async with served(app) as port, connected(port) as (reader, writer):
        writer.write(pipelined)
        received = await asyncio.wait_for(reader.read(), 10)
    answers = received.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 1 + MAX_PIPELINED
    assert answers[0].endswith(b"got first") and b"connection: close" in answers[-1]


async def test_a_graceful_stop_answers_the_requests_kept_of_a_long_pipeline() -> None:
    """Past 16 waiting requests uvicorn took the connection for one between requests and
    closed it at once on a stop: no answer, not even the one being made (a webhook stored
    and not acknowledged, so sent again)."""
    pipelined = request("/slow", b"first") + b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n" * 100
    async with serving(app) as server, connected(port_of(server)) as (reader, writer):
        writer.write(pipelined)
        await until(lambda: bool(server.server_state.tasks), 5)  # /slow is being answered
        server.should_exit = True
        received = await asyncio.wait_for(reader.read(), 10)
    answers = received.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 1 + MAX_PIPELINED
    assert answers[0].endswith(b"got first") and b"connection: close" in answers[-1]


class Lines(logging.Handler):
    """The lines uvicorn's own logger lets through, as they would be printed."""

    def __init__(self) -> None:
        super().__init__()
        self.printed: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.printed.append(record.getMessage())


@contextlib.contextmanager
def uvicorn_lines() -> Iterator[list[str]]:
    lines = Lines()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(lines)
    try:
        yield lines.printed
    finally:
        logger.removeHandler(lines)


async def test_requests_refused_before_the_app_log_a_line_a_minute_not_one_each() -> None:
    """uvicorn logs a line for every request it refuses itself: each past
    max_concurrent_requests (503), each that is no HTTP (400: a TLS handshake on the plain
    port, a scanner). A flood of them, exactly when the process is overwhelmed, wrote as many
    plain-text lines, as `store_unavailable` once did before it was throttled."""
    refused = 30
    async with serving(app, max_concurrent_requests=16) as server:
        with uvicorn_lines() as printed:  # once the server has configured uvicorn's logging
            port = port_of(server)
            for _ in range(refused):
                answer = await exchange(port, b"\x16\x03\x01\x00\xa5\x01\r\n\r\n", until=b"\r\n")
                assert answer.startswith(b"HTTP/1.1 400 ")
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(16)]
            try:
                for _ in range(refused):
                    answer = await exchange(port, request("/a", b"x"), until=b"\r\n")
                    assert answer.startswith(b"HTTP/1.1 503 ")
            finally:
                for _, writer in held:
                    writer.close()
    not_http = [line for line in printed if line.startswith("Invalid HTTP request received: ")]
    assert not_http == ["Invalid HTTP request received: Invalid method encountered"]
    assert printed.count("Exceeded concurrency limit.") == 1


# -- a request that offers to upgrade the connection (Upgrade: h2c) --------------------------

H2C = (b"connection: Upgrade, HTTP2-Settings", b"upgrade: h2c", b"http2-settings: AAMAAABkAAQAAP__")


async def test_a_body_offered_an_h2c_upgrade_reaches_the_app() -> None:
    """Java's HttpClient (HTTP/2 by default) offers `Upgrade: h2c` on every request to an
    http:// URL, as `curl --http2` does. httptools then skipped the body: the app read an
    empty one (a webhook refused as `invalid_json`), and the bytes after it were lost. A
    server that does not upgrade answers as HTTP/1.1 (RFC 9110 §7.8)."""
    chunked = (
        b"POST /chunked HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n"
        + b"\r\n".join(H2C)
        + b"\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
    )
    async with served(app) as port, connected(port) as (reader, writer):
        writer.write(request("/a", b"first", *H2C) + request("/a", b"second", *H2C))
        answers = await asyncio.wait_for(reader.readuntil(b"got second"), 5)
        assert answers.count(b"HTTP/1.1 202 ") == 2 and b"got first" in answers
        assert b"101" not in answers.split(b"\r\n", 1)[0]
        writer.write(chunked)
        answer = await asyncio.wait_for(reader.readuntil(b"got abcd"), 5)
        assert answer.startswith(b"HTTP/1.1 202 ")


async def test_a_webhook_offered_an_h2c_upgrade_is_stored(hub_port: int) -> None:
    async with connected(hub_port) as (reader, writer):
        writer.write(webhook(WEBHOOK, *H2C))
        answer = await asyncio.wait_for(reader.readuntil(b"}"), 5)
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    assert b'"duplicate":false' in answer


async def test_an_h2c_offer_between_a_request_and_one_not_http_is_answered_in_order() -> None:
    """A request read again without its h2c offer goes through the same parse as any: the
    request after it that is not HTTP is refused after the answers due, not at once (which
    lost the two 202s, the webhooks stored)."""
    async with served(app) as port, connected(port) as (reader, writer):
        # One write: the refusal is found while the h2c request's body is read again.
        writer.write(request("/slow", b"first") + request("/a", b"second", *H2C) + NOT_HTTP)
        received = await read_to_the_end(reader)
    answers = received.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 3, received
    assert answers[0].startswith(b"202 ") and answers[0].endswith(b"got first")
    assert answers[1].startswith(b"202 ") and answers[1].endswith(b"got second")
    assert answers[2].startswith(b"400 ") and answers[2].endswith(
        b'"the request is not valid HTTP: Invalid header value char"}'
    )


async def test_an_h2c_head_near_64_kib_in_two_reads_is_read_again_and_answered(
    port: int,
) -> None:
    """The head read again is not counted a second time (nor refused 431) when it came in
    two reads and its body is over 64 KiB."""
    body = b"b" * 100_000
    whole = request("/a", body, *H2C, b"x-big: " + b"y" * 60_000)
    head_end = whole.index(b"\r\n\r\n") + 4
    async with connected(port) as (reader, writer):
        writer.write(whole[:30_000])
        await writer.drain()
        await asyncio.sleep(0.1)  # a read of its own
        writer.write(whole[30_000:])  # the rest of the head and the whole body
        answer = await asyncio.wait_for(reader.readuntil(b"got " + body), 5)
    assert head_end > 60_000 and answer.startswith(b"HTTP/1.1 202 "), answer[:200]


async def test_an_h2c_request_has_its_deadline_from_its_first_byte() -> None:
    """The request read again without its offer keeps the time it began: its deadline does
    not start over at its head's end (which gave it up to twice `client_timeout_s`)."""
    whole = request("/a", b"x" * 100, *H2C)
    head_end = whole.index(b"\r\n\r\n") + 4
    async with served(app, client_timeout_s=1) as port, connected(port) as (reader, writer):
        writer.write(whole[:20])
        await asyncio.sleep(0.7)
        writer.write(whole[20 : head_end + 10])  # the head whole at 0.7 s, its body begun
        await asyncio.sleep(0.7)
        if not writer.is_closing():
            writer.write(whole[head_end + 10 :])  # whole at 1.4 s: late
        received = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), received


# -- transfer codings --------------------------------------------------------------------


async def test_a_transfer_coding_other_than_chunked_is_answered_501(port: int) -> None:
    """httptools takes off the chunked framing only: the app read the gzip bytes as the body
    (a webhook refused `400` "not UTF-8"). RFC 9112 §6.1: 501 for a coding not understood."""
    codings = (b"gzip, chunked", b"gzip\r\ntransfer-encoding: chunked")
    for coding in codings:
        raw = (
            b"POST /a HTTP/1.1\r\nhost: t\r\ntransfer-encoding: "
            + coding
            + b"\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
        )
        async with connected(port) as (reader, writer):
            writer.write(raw)
            received = await read_to_the_end(reader)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 501 Not Implemented\r\n"), received
        assert b"connection: close" in head and b"content-type: application/json" in head
        assert body == (
            b'{"error":"unsupported_transfer_coding",'
            b'"detail":"the request\'s transfer coding gzip is not supported: only chunked is"}'
        )


async def test_a_chunked_body_named_in_any_case_is_read(port: int) -> None:
    raw = b"POST /a HTTP/1.1\r\nhost: t\r\ntransfer-encoding: Chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
    answer = await exchange(port, raw, until=b"got abcd")
    assert answer.startswith(b"HTTP/1.1 202 ")


async def test_a_webhook_in_a_transfer_coding_other_than_chunked_is_counted_as_answered(
    hub_port: int,
) -> None:
    """A compressing client's webhook was refused `400 invalid_text`, "not UTF-8 JSON": its
    sender looked for a fault in its JSON. It is answered 501 and counted as such."""
    counted = {"source": "keyed", "error": "unsupported_transfer_coding"}
    before = REGISTRY.get_sample_value("estafeta_ingest_refused_total", counted) or 0
    raw = (
        b"POST /in/keyed HTTP/1.1\r\nhost: t\r\nauthorization: Bearer source-key-1\r\n"
        b"content-type: application/json\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
        b"4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n"
    )
    async with connected(hub_port) as (reader, writer):
        writer.write(raw)
        received = await read_to_the_end(reader)
    assert received.startswith(b"HTTP/1.1 501 Not Implemented\r\n"), received
    await until(
        lambda: REGISTRY.get_sample_value("estafeta_ingest_refused_total", counted) == before + 1,
        5,
    )
