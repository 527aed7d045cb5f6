"""The HTTP connector against a real receiver (`estafeta.testing.Sink`) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from standardwebhooks.webhooks import Webhook
from yarl import URL

from estafeta import __version__
from estafeta.config.models import WorkerConfig
from estafeta.connectors.exchange import as_written, without_credentials
from estafeta.connectors.http import HttpConnector, new_client_session, sign_webhook
from estafeta.delivery.decision import describe_failure
from estafeta.delivery.outcome import EXCERPT_LIMIT, Outcome, OutcomeKind
from estafeta.testing.sink import Sink
from tests.conftest import leased_delivery, out_of_descriptors

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR = json.loads(Path("/work/shared/fixtures/standard_webhooks/vector.json").read_text())
PAYLOAD = b'{"id":"evt_1","type":"message.received","data":{"text":"Ol\xc3\xa1!"}}'


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    receiver = Sink()
    await receiver.start()
    yield receiver
    await receiver.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    shared = new_client_session()
    yield shared
    await shared.close()


async def deliver_to(
    url: str,
    session: aiohttp.ClientSession,
    *,
    secret: str | None = None,
    timeout_s: float = 5.0,
    headers: Mapping[str, str] | None = None,
    event_id: str = "evt_1",
    payload: bytes = PAYLOAD,
    clock: Callable[[], float] = time.time,
) -> Outcome:
    connector = HttpConnector(
        url=url, secret=secret, timeout_s=timeout_s, session=session, headers=headers, now_s=clock
    )
    try:
        return await connector.deliver(leased_delivery(payload, event_id=event_id))
    finally:
        await connector.close()


# -- answers ---------------------------------------------------------------------------------


async def test_success(sink: Sink, session: aiohttp.ClientSession) -> None:
    sink.respond(202, body=b"accepted")
    outcome = await deliver_to(f"{sink.url}/hooks/crm", session)
    assert outcome.kind is OutcomeKind.SUCCESS
    assert outcome.status_code == 202
    assert outcome.error_class is None
    assert outcome.retry_after_s is None
    assert outcome.response_excerpt == "accepted"
    assert outcome.duration_ms > 0
    [request] = sink.received
    assert request.path == "/hooks/crm"
    assert request.body == PAYLOAD  # the exact bytes, never re-serialised
    assert sink.delivered_ids == {"evt_1"}


@pytest.mark.parametrize(
    "path_qs",
    [
        # A signed URL (CloudFront, S3, a SAS token) covers its query as written: `%2F` sent
        # as `/` or `%7e` as `~` no longer matches, and the receiver refuses the request.
        "/hooks/in?sig=ab%2Fcd%2B%3D&exp=1700000000&k=%7e%3A%40",
        "/hooks/a%2Fb/%41?x=1&x=2&flag",
    ],
)
async def test_the_path_and_query_are_sent_as_configured(
    sink: Sink, session: aiohttp.ClientSession, path_qs: str
) -> None:
    assert (await deliver_to(f"{sink.url}{path_qs}", session)).kind is OutcomeKind.SUCCESS
    assert [r.path for r in sink.received] == [path_qs]


async def test_a_url_that_is_not_encoded_is_sent_encoded(
    sink: Sink, session: aiohttp.ClientSession
) -> None:
    # Written by hand with a space or an accent: sent percent-encoded, as HTTP requires.
    outcome = await deliver_to(f"{sink.url}/my hooks/café?r=é#top", session)
    assert outcome.kind is OutcomeKind.SUCCESS
    assert [r.path for r in sink.received] == ["/my%20hooks/caf%C3%A9?r=%C3%A9"]


async def test_500_is_retryable_with_its_excerpt(
    sink: Sink, session: aiohttp.ClientSession
) -> None:
    sink.respond(500, body=b"boom: database is down")
    outcome = await deliver_to(sink.url, session)
    assert outcome.kind is OutcomeKind.RETRYABLE
    assert (outcome.status_code, outcome.error_class) == (500, "http_500")
    assert outcome.response_excerpt == "boom: database is down"
    assert sink.delivered_ids == set()  # a 500 is not a delivery


@pytest.mark.parametrize("status", [400, 404, 410, 422])
async def test_other_4xx_are_permanent(
    sink: Sink, session: aiohttp.ClientSession, status: int
) -> None:
    sink.respond(status)
    outcome = await deliver_to(sink.url, session)
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error_class == f"http_{status}"


async def test_429_honours_retry_after_seconds(sink: Sink, session: aiohttp.ClientSession) -> None:
    sink.respond(429, headers={"Retry-After": "7"})
    outcome = await deliver_to(sink.url, session)
    assert outcome.kind is OutcomeKind.RETRYABLE
    assert outcome.error_class == "http_429"
    assert outcome.retry_after_s == 7.0


async def test_retry_after_as_an_http_date(sink: Sink, session: aiohttp.ClientSession) -> None:
    sink.respond(503, headers={"Retry-After": "Tue, 01 Jul 2025 12:02:00 GMT"})
    outcome = await deliver_to(sink.url, session, clock=lambda: 1_751_371_200.0)  # 12:00:00Z
    assert outcome.retry_after_s == 120.0


async def test_redirect_is_a_retryable_failure_not_followed(
    sink: Sink, session: aiohttp.ClientSession
) -> None:
    sink.respond(301, body=b"<html>Moved</html>", headers={"Location": "https://crm.example/in"})
    outcome = await deliver_to(f"{sink.url}/hooks", session)
    assert outcome.kind is OutcomeKind.RETRYABLE
    assert outcome.error_class == "http_301"
    assert [r.path for r in sink.received] == ["/hooks"]
    # Where it points is what the operator needs to mend the URL; the body says nothing.
    assert outcome.response_excerpt == "redirect to https://crm.example/…, not followed"


@pytest.mark.parametrize(
    ("location", "excerpt"),
    [
        # A relative Location is read against the destination's URL.
        ("/v2/hooks?token=abc", "redirect to {origin}/…, not followed"),
        # A hook's path, query and password can be its credential: shown as the outline.
        (
            "https://user:pa55@hooks.example:8443/T0K3N?key=s3cret",
            "redirect to https://hooks.example:8443/…, not followed",
        ),
        (None, "redirect without a Location, not followed"),
        ("http://[::1", "redirect to a Location that is not a URL, not followed"),
    ],
)
async def test_a_redirect_excerpt_says_where_it_points_without_credentials(
    sink: Sink, session: aiohttp.ClientSession, location: str | None, excerpt: str
) -> None:
    sink.respond(308, headers={} if location is None else {"Location": location})
    outcome = await deliver_to(f"{sink.url}/hooks/T0K3N", session)
    assert outcome.error_class == "http_308"
    assert outcome.response_excerpt == excerpt.format(origin=sink.url)
    for secret in ("T0K3N", "s3cret", "pa55", "abc"):
        assert secret not in outcome.response_excerpt


async def test_a_location_that_is_not_utf8_gives_an_excerpt_a_store_can_write(
    session: aiohttp.ClientSession,
) -> None:
    """A byte that is not UTF-8 in a redirect's Location: aiohttp keeps it as a lone
    surrogate, which neither engine can store, so the attempt was never recorded and the
    delivery came back as `lease_expired` until it died. The excerpt is plain UTF-8."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 302 Found\r\nLocation: //h\xc3st.example/x\r\n")
        writer.write(b"Content-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        outcome = await deliver_to(f"http://127.0.0.1:{port}/hooks", session)
    finally:
        server.close()
        await server.wait_closed()
    assert outcome.error_class == "http_302"
    assert outcome.response_excerpt == "redirect to http://h\ufffdst.example/…, not followed"
    outcome.response_excerpt.encode("utf-8")  # what the store does: it must not raise


async def test_large_body_gives_a_bounded_excerpt(
    sink: Sink, session: aiohttp.ClientSession
) -> None:
    sink.respond(500, body=b"x" * 5_000_000)
    outcome = await deliver_to(sink.url, session)
    assert outcome.error_class == "http_500"
    assert outcome.response_excerpt == "x" * 1024  # as docs/http-api.md promises


async def test_excerpt_does_not_cut_a_multibyte_character(
    sink: Sink, session: aiohttp.ClientSession
) -> None:
    sink.respond(500, body=("é" * 3000).encode())
    outcome = await deliver_to(sink.url, session)
    assert outcome.response_excerpt == "é" * EXCERPT_LIMIT


async def test_undecodable_body_is_replaced_not_raised(
    sink: Sink, session: aiohttp.ClientSession
) -> None:
    sink.respond(500, body=b"\xff\xfe ok")
    outcome = await deliver_to(sink.url, session)
    assert outcome.response_excerpt == "\ufffd\ufffd ok"


# -- a busy process ----------------------------------------------------------------------------


@contextlib.contextmanager
def answering_at_once() -> Iterator[tuple[str, threading.Event]]:
    """A destination on its own thread (it answers while this process's loop is blocked):
    `200 ok` to each request as soon as it is whole; the event is set at each answer."""
    listener = socket.create_server(("127.0.0.1", 0))
    answered = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):  # the listener closed: the test is over
            while True:
                conn, _ = listener.accept()
                with conn:
                    got = b""
                    while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < 2:
                        got += conn.recv(65536) or b"?" * 2  # `{}`: the test's body
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    answered.set()
                    conn.recv(1)  # until the client closes (or the listener does)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hooks/crm", answered
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=5)


async def test_an_answer_read_late_by_a_busy_process_is_not_a_timeout() -> None:
    """The destination answered at once, but the process was busy past the timeout before
    it read the answer (a large body parsed, a GC pause, a machine short of CPU): the
    timeout fired in the turn the answer was read, and the delivery counted as timed out
    (`no answer within 0.5 s`): retried, so the destination got it twice, and a mark in its
    circuit, for every send in flight at such a moment."""
    with answering_at_once() as (url, answered):

        def busy() -> None:
            # In a timer of its own, run once the request is written: the loop blocks
            # until the destination answered and well past the timeout, and reads the
            # answer in the turn the timeout falls due.
            assert answered.wait(5), "the destination did not answer"
            time.sleep(0.5 + 0.3)

        async def written_soon(*_: object) -> None:
            asyncio.get_running_loop().call_later(0, busy)

        tracing = aiohttp.TraceConfig()
        tracing.on_request_headers_sent.append(written_soon)
        async with aiohttp.ClientSession(trace_configs=[tracing]) as busy_session:
            outcome = await deliver_to(url, busy_session, payload=b"{}", timeout_s=0.5)
    assert (outcome.kind, outcome.status_code) == (OutcomeKind.SUCCESS, 200), outcome


# -- failures without an answer --------------------------------------------------------------


async def test_slow_destination_times_out(sink: Sink, session: aiohttp.ClientSession) -> None:
    # The sink would answer after 60 s (its stop at teardown answers at once): far from the
    # 0.2 s timeout, so a loaded host's slow turn cannot be mistaken for the sink's answer.
    sink.respond(200, delay_s=60.0)
    outcome = await deliver_to(sink.url, session, timeout_s=0.2)
    assert outcome.kind is OutcomeKind.RETRYABLE
    assert outcome.error_class == "timeout"
    assert outcome.status_code is None
    assert 150 <= outcome.duration_ms < 10_000  # bounded by our timeout, not by the sink
    # Which limit ran out, not aiohttp's bare `TimeoutError` (last_error `timeout: TimeoutError`).
    assert outcome.response_excerpt == "no answer within 0.2 s"


async def test_idle_connections_to_many_destinations_stay_within_the_pool_size() -> None:
    """A burst to one destination, then one to another: the first's idle kept-alive sockets
    were kept (and, reused in turn by steady traffic, never timed out), so a process held up
    to `worker.concurrency` sockets per destination, past the open-files limit it was sized
    for. Open sockets, idle or not, stay within the pool's size."""
    pool = 4
    session = new_client_session(connections=pool)
    sinks = [Sink(), Sink()]
    try:
        for sink in sinks:
            await sink.start()
            sink.respond(delay_s=0.2)  # the burst's sends overlap: one connection each
        for sink in sinks:
            outcomes = await asyncio.gather(
                *(deliver_to(sink.url, session, event_id=f"evt_{n}") for n in range(pool))
            )
            assert all(o.kind is OutcomeKind.SUCCESS for o in outcomes)
            assert sink.open_connections == pool  # the burst's own, kept alive

        def open_sockets() -> int:
            return sum(sink.open_connections for sink in sinks)

        deadline = time.monotonic() + 2
        while open_sockets() > pool and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert open_sockets() <= pool
    finally:
        await session.close()
        for sink in sinks:
            await sink.stop()


async def test_connection_refused(session: aiohttp.ClientSession) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and now has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome = await deliver_to(f"http://127.0.0.1:{port}/hooks", session)
    assert outcome.kind is OutcomeKind.RETRYABLE
    assert outcome.error_class in {"connection_refused", "connection_error"}
    assert outcome.status_code is None
    assert outcome.response_excerpt  # the reason, for the operator


async def test_a_send_with_no_descriptor_to_connect_with_is_named_for_this_process(
    sink: Sink, session: aiohttp.ClientSession
) -> None:
    """Out of descriptors (a flood of client connections took them all), a send cannot even
    open its connection: retried, and named for what it is. As `connection_error` it sent
    the operator to a destination that was never reached (the DLQ guide reads that class
    as "the destination was down")."""
    with out_of_descriptors():
        outcome = await deliver_to(f"{sink.url}/hooks", session)
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "local_resources")
    assert "Too many open files" in outcome.response_excerpt
    assert sink.received == []
    assert (await deliver_to(f"{sink.url}/hooks", session)).succeeded  # once they are free


@pytest.mark.parametrize("url", ["not a url", "ftp://127.0.0.1/hooks", "http://"])
async def test_malformed_url_is_permanent(session: aiohttp.ClientSession, url: str) -> None:
    outcome = await deliver_to(url, session)
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error_class == "invalid_destination"


async def test_an_answer_that_is_not_http_is_an_invalid_response(
    session: aiohttp.ClientSession,
) -> None:
    async def invalid_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(invalid_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"http://hub:pa55word@127.0.0.1:{port}/hooks/catch/9f8e7d?token=t0ken"
        outcome = await deliver_to(url, session)
    finally:
        server.close()
    # What was wrong; not aiohttp's whole text, which makes up a status 400 and names the URL
    # (a no-code tool's hook path is its credential, a query may hold a token).
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "invalid_response")
    assert outcome.response_excerpt.startswith("Invalid character in Content-Length")
    for secret in ("9f8e7d", "t0ken", "pa55word", "400"):
        assert secret not in outcome.response_excerpt


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nContent-Le", b"HTTP/1.1 500 Oops\r\nX-A: b"],
)
async def test_a_close_in_the_middle_of_the_answers_head_says_so(
    session: aiohttp.ClientSession, head: bytes
) -> None:
    # aiohttp's text for it was the repr of the head it had begun to parse,
    # `<RawResponseMessage(version=…, code=200, reason='OK', headers=…`: the delivery's
    # last error read as if the destination had answered 200.
    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(head)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut_short, "127.0.0.1", 0)
    try:
        outcome = await deliver_to(
            f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/h", session
        )
    finally:
        server.close()
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "connection_error")
    assert outcome.status_code is None
    assert outcome.response_excerpt == "Server disconnected in the middle of the answer's head"
    assert describe_failure(outcome) == (
        "connection_error: Server disconnected in the middle of the answer's head"
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("ftp://hub:pa55word@127.0.0.1/drop/9f8e7d?token=t0ken", "ftp://127.0.0.1/…"),
        ("http://hub:pa55word@127.0.0.1:99999/hooks/9f8e7d", "http://127.0.0.1:99999/…"),
    ],
)
async def test_an_error_that_names_the_url_shows_only_its_origin(
    session: aiohttp.ClientSession, url: str, shown: str
) -> None:
    outcome = await deliver_to(url, session)
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.PERMANENT, "invalid_destination")
    assert outcome.response_excerpt == shown


def test_a_connect_timeout_names_only_the_origin() -> None:
    # aiohttp's text for a connect timeout (`f"Connection timeout to host {req.url}"`, the
    # URL as yarl writes it, without user and password), which loopback cannot produce.
    # A Z-API send URL carries its instance token in the path (contracts §3.1).
    url = "https://api.z-api.io/instances/3C0FFEE/token/F00DBABE5EC12E7/send-text"
    detail = without_credentials(f"Connection timeout to host {URL(url)}", url)
    assert detail == "Connection timeout to host https://api.z-api.io/…"
    url = "https://hub:pa55word@hook.eu1.make.com/9f8e7d?x=1"
    detail = without_credentials(f"Connection timeout to host {URL(url).with_user(None)}", url)
    assert detail == "Connection timeout to host https://hook.eu1.make.com/…"


@pytest.mark.parametrize(
    "url",
    [
        "https://hub:pa55word@hook.example/9f8e7d?token=t0ken#top",
        "https://hub:pa55word@hook.example/hooks/../9f8e7d?sig=a%2Fb",  # sent as written
    ],
)
def test_an_error_naming_the_url_it_sent_to_names_only_the_origin(url: str) -> None:
    # aiohttp names the URL of the request it sent: without user, password and fragment
    # (`f"Can not write request body for {req.url}"`, a stale pooled connection).
    sent = URL(as_written(url)).with_user(None).with_fragment(None)
    detail = without_credentials(f"Can not write request body for {sent}", url)
    assert detail == "Can not write request body for https://hook.example/…"


async def _answer_each_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, answer: bool, seen: list[str]
) -> None:
    """Take one request, answer 200 (or nothing) and close the connection without having
    said `Connection: close`, as some servers do once a request is done."""
    head = await reader.readuntil(b"\r\n\r\n")
    fields = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if line)
    fields = {name.lower(): value for name, value in fields.items()}
    await reader.readexactly(int(fields["content-length"]))
    seen.append(fields["webhook-id"])
    if answer:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def closing_after_each(*, answer: bool, seen: list[str]) -> AsyncIterator[str]:
    """The URL of a destination that closes the connection after each request, answered
    (`answer`) or not, without saying so; `seen` gets each request's webhook-id."""
    server = await asyncio.start_server(
        lambda r, w: _answer_each_request(r, w, answer=answer, seen=seen), "127.0.0.1", 0
    )
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks"
    finally:
        server.close()


async def test_a_pooled_connection_the_destination_closed_is_not_a_failure(
    session: aiohttp.ClientSession,
) -> None:
    # The connection goes back to the pool as the destination closes it; the next send
    # found it closing and failed without reaching the destination: every other delivery
    # failed, and the circuit counted each. Sent again on a new connection, it arrives once.
    seen: list[str] = []
    async with closing_after_each(answer=True, seen=seen) as url:
        outcomes = [await deliver_to(url, session, event_id=f"evt_{n}") for n in range(1, 5)]
    assert [(o.kind, o.error_class) for o in outcomes] == [(OutcomeKind.SUCCESS, None)] * 4
    assert seen == ["evt_1", "evt_2", "evt_3", "evt_4"]


async def test_a_destination_that_drops_every_request_gets_it_once_per_attempt(
    session: aiohttp.ClientSession,
) -> None:
    # A request the destination took and dropped is not sent again at once (only one that
    # never left is): it may have been processed, and a destination that drops every
    # request would get each twice.
    seen: list[str] = []
    async with closing_after_each(answer=False, seen=seen) as url:
        outcome = await deliver_to(url, session)
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "connection_error")
    assert seen == ["evt_1"]


async def _read_request(reader: asyncio.StreamReader) -> str:
    """Read one request whole; its webhook-id."""
    head = await reader.readuntil(b"\r\n\r\n")
    fields = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if line)
    fields = {name.lower(): value for name, value in fields.items()}
    await reader.readexactly(int(fields["content-length"]))
    return fields["webhook-id"]


class AnsweringTwice:
    """A destination that answers its first request `first`, then, when told (`unasked`),
    sends on that kept-alive connection an answer nobody asked for; every later request is
    answered 503. `seen` holds each request's webhook-id."""

    def __init__(self, first: bytes, unasked: bytes) -> None:
        self.first, self.unasked = first, unasked
        self.seen: list[str] = []
        self._go, self._sent = asyncio.Event(), asyncio.Event()

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                self.seen.append(await _read_request(reader))
                if len(self.seen) > 1:
                    writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
                    await writer.drain()
                    continue
                writer.write(self.first)
                await writer.drain()
                await self._go.wait()
                writer.write(self.unasked)
                await writer.drain()
                self._sent.set()
        writer.close()

    async def send_unasked(self) -> None:
        """Have the unasked answer sent, and reach the hub (loopback: it is in the hub's
        socket once written, and read at the event loop's next turns)."""
        self._go.set()
        await asyncio.wait_for(self._sent.wait(), 5)
        await asyncio.sleep(0.05)


FORGED_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"


@pytest.mark.parametrize(
    ("first", "unasked"),
    [
        (b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\noops", FORGED_200),
        # What reads as a body after a 204 (which has none) or past the Content-Length
        # is no part of that answer either: here, a forged second one.
        (b"HTTP/1.1 204 No Content\r\n\r\n", FORGED_200),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", FORGED_200),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"garbage\r\n\r\n"),
    ],
    ids=["after-a-500", "after-a-204", "after-a-200", "garbage"],
)
async def test_an_answer_nobody_asked_for_is_not_taken_for_the_next_delivery(
    session: aiohttp.ClientSession, first: bytes, unasked: bytes
) -> None:
    # Left in the pooled connection, the unasked answer was read as the next delivery's:
    # recorded as delivered (200 "forged") while the destination never answered it, or
    # failed for a 503 it never sent.
    destination = AnsweringTwice(first, unasked)
    server = await asyncio.start_server(destination.answer, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks"
    try:
        await deliver_to(url, session, event_id="evt_1")
        await destination.send_unasked()
        outcome = await deliver_to(url, session, event_id="evt_2")
    finally:
        server.close()
    assert (outcome.kind, outcome.status_code, outcome.response_excerpt) == (
        OutcomeKind.RETRYABLE,
        503,
        "busy",
    )
    assert destination.seen == ["evt_1", "evt_2"]


OK_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CLOSE, SILENCE = "close", "silence"


@pytest.mark.parametrize(
    ("script", "recorded", "reused"),
    [
        # A 2xx whose body breaks off: the status says the destination took it.
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok", CLOSE], ("success", 200), False),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok", SILENCE], ("success", 200), False),
        ([b"HTTP/1.1 100 Continue\r\n\r\n", OK_200], ("success", 200), True),
        (
            [b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n", OK_200],
            ("success", 200),
            True,
        ),
        # A server working on it may say so (102) every few seconds, as long as it takes.
        ([b"HTTP/1.1 102 Processing\r\n\r\n" * 60, OK_200], ("success", 200), True),
        ([b"HTTP/1.0 200 OK\r\n\r\nread until", b" the close", CLOSE], ("success", 200), False),
        (
            [b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\nno" + FORGED_200],
            ("retryable", 500),
            False,
        ),
        (
            [b"HTTP/1.1 204 No Content\r\nContent-Length: 6\r\n\r\nforged"],
            ("retryable", "invalid_response"),
            False,
        ),
        ([b"HTTP/1.1 200 OK\r\nX-Never: ends\r\n", SILENCE], ("retryable", "timeout"), False),
        (
            [b"HTTP/1.1 200 OK\r\nX-Long: " + b"y" * 20_000 + b"\r\n\r\n"],
            ("retryable", "invalid_response"),
            False,
        ),
        (
            [b"HTTP/1.1 200 OK\r\n" + b"X-Many: y\r\n" * 500 + b"\r\n"],
            ("retryable", "invalid_response"),
            False,
        ),
    ],
    ids=[
        "short-close",
        "short-silence",
        "100",
        "103",
        "102s",
        "http-1.0",
        "surplus",
        "204-body",
        "endless-head",
        "long-header",
        "many-headers",
    ],
)
async def test_a_misframed_answer_is_its_own_deliverys_and_its_connection_is_not_reused(
    session: aiohttp.ClientSession,
    script: list[bytes | str],
    recorded: tuple[str, int | str],
    reused: bool,
) -> None:
    seen: list[str] = []
    connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                seen.append(await _read_request(reader))
                if len(seen) > 1:
                    writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
                    await writer.drain()
                    continue
                for step in script:
                    if step == CLOSE:
                        writer.close()
                        return
                    if step == SILENCE:
                        await reader.read()  # until the hub gives up and closes
                        break
                    writer.write(step)  # type: ignore[arg-type]
                    await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks"
    try:
        first = await deliver_to(url, session, event_id="evt_1", timeout_s=0.5)
        second = await deliver_to(url, session, event_id="evt_2")
    finally:
        server.close()
    assert (first.kind.value, first.status_code or first.error_class) == recorded
    assert (second.kind, second.status_code, second.response_excerpt) == (
        OutcomeKind.RETRYABLE,
        503,
        "busy",
    )
    assert seen == ["evt_1", "evt_2"]
    assert connections == (1 if reused else 2)


async def test_endless_interim_answers_end_the_attempt_at_once(
    session: aiohttp.ClientSession,
) -> None:
    # aiohttp skips 1xx answers for as long as they come: a destination sending nothing
    # else kept the worker parsing them, one CPU at full speed, until the attempt's
    # timeout; a few such deliveries starved every other send and the store's answers.
    async def early_hints_for_ever(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError):
            await _read_request(reader)
            hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" * 100
            while True:
                writer.write(hints)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(early_hints_for_ever, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks"
    try:
        outcome = await deliver_to(url, session, timeout_s=10)
    finally:
        server.close()
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "invalid_response")
    assert outcome.response_excerpt == "more than 100 interim (1xx) answers to one request"
    assert outcome.duration_ms < 5_000  # not the 10 s timeout


# -- headers and signatures ------------------------------------------------------------------


async def test_headers_sent(sink: Sink, session: aiohttp.ClientSession) -> None:
    before = int(time.time())
    extra = {"Authorization": "Bearer crm-key", "Webhook-Id": "forged", "X-Tenant": "sol"}
    await deliver_to(sink.url, session, headers=extra)
    headers = sink.received[0].headers
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == f"estafeta/{__version__}"
    assert headers["webhook-id"] == "evt_1"  # extra headers cannot replace our own
    assert before <= int(headers["webhook-timestamp"]) <= int(time.time())
    assert headers["authorization"] == "Bearer crm-key"
    assert headers["x-tenant"] == "sol"
    assert "webhook-signature" not in headers  # no secret, no signature


async def test_a_cookie_one_destination_sets_is_never_sent_on(
    sink: Sink, session: aiohttp.ClientSession
) -> None:
    # One session serves every tenant's destinations: a cookie kept from one answer would go
    # with the next delivery to that host, whichever tenant it belongs to. By host name, not
    # IP, as a cookie jar keeps cookies only for names.
    url = sink.url.replace("127.0.0.1", "localhost")
    sink.respond(200, headers={"Set-Cookie": "session=tenant-a-secret; Path=/"})
    assert (await deliver_to(url, session)).kind is OutcomeKind.SUCCESS
    sink.respond(200)
    assert (await deliver_to(url, session, event_id="evt_2")).kind is OutcomeKind.SUCCESS
    assert [r.webhook_id for r in sink.received] == ["evt_1", "evt_2"]
    assert "cookie" not in sink.received[1].headers


async def test_signature_verified_by_the_receiver(session: aiohttp.ClientSession) -> None:
    sink = Sink(secret=SECRET)
    await sink.start()
    try:
        good = await deliver_to(sink.url, session, secret=SECRET)
        wrong = await deliver_to(
            sink.url,
            session,
            secret="whsec_" + "A" * 43 + "=",
            event_id="evt_2",
        )
        unsigned = await deliver_to(sink.url, session, event_id="evt_3")
    finally:
        await sink.stop()
    assert good.kind is OutcomeKind.SUCCESS
    assert (wrong.error_class, unsigned.error_class) == ("http_401", "http_401")
    assert wrong.kind is OutcomeKind.PERMANENT
    assert sink.delivered_ids == {"evt_1"}
    assert [(b.received.webhook_id, b.reason) for b in sink.bad_signatures] == [
        ("evt_2", "No matching signature found"),
        ("evt_3", "Missing required headers"),
    ]


async def test_a_retry_is_the_same_message_signed_afresh(session: aiohttp.ClientSession) -> None:
    # The receiver dedupes by `webhook-id`, so it must not change; a timestamp kept from the
    # first attempt would fall outside the receiver's 5-minute window on a late retry.
    sink = Sink(secret=SECRET)
    sink.fail_first(1, 503)
    await sink.start()
    now = time.time()
    try:
        first = await deliver_to(sink.url, session, secret=SECRET, clock=lambda: now - 120)
        retry = await deliver_to(sink.url, session, secret=SECRET, clock=lambda: now)
    finally:
        await sink.stop()
    assert (first.status_code, retry.kind) == (503, OutcomeKind.SUCCESS)
    assert sink.bad_signatures == []
    [one, two] = [r.headers for r in sink.received]
    assert one["webhook-id"] == two["webhook-id"] == "evt_1"
    assert (one["webhook-timestamp"], two["webhook-timestamp"]) == (
        str(int(now - 120)),
        str(int(now)),
    )
    assert one["webhook-signature"] != two["webhook-signature"]


@pytest.mark.parametrize(
    "framing",
    [
        {"Content-Length": "3"},  # the receiver read 3 bytes: every signature refused
        {"Content-Length": "100000"},  # the receiver waited for the rest: a timeout
        {"Transfer-Encoding": "chunked"},  # beside aiohttp's Content-Length: a 400
        {"Content-Encoding": "gzip"},  # the receiver could not inflate a plain body
    ],
)
async def test_headers_describing_the_body_cannot_change_the_body_that_was_signed(
    session: aiohttp.ClientSession, framing: dict[str, str]
) -> None:
    # A header estafeta does not list as its own still framed or labelled the body it signs:
    # the receiver got other bytes than the signed ones, or none it could read.
    sink = Sink(secret=SECRET)
    await sink.start()
    try:
        outcome = await deliver_to(sink.url, session, secret=SECRET, headers=framing)
    finally:
        await sink.stop()
    assert outcome.kind is OutcomeKind.SUCCESS
    assert sink.bad_signatures == []
    assert [r.body for r in sink.received] == [PAYLOAD]


async def test_signature_matches_the_fixture_vector(
    sink: Sink, session: aiohttp.ClientSession
) -> None:
    await deliver_to(
        sink.url,
        session,
        secret=VECTOR["secret"],
        event_id=VECTOR["msg_id"],
        payload=VECTOR["body"].encode(),
        clock=lambda: VECTOR["timestamp"],
    )
    request = sink.received[0]
    assert {name: request.headers[name] for name in VECTOR["headers"]} == VECTOR["headers"]
    assert request.body == VECTOR["body"].encode()


def test_sign_webhook_matches_both_vectors() -> None:
    assert (
        sign_webhook(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            b'{"test": 2432232314}',
        )
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )
    assert (
        sign_webhook(
            VECTOR["secret"], VECTOR["msg_id"], VECTOR["timestamp"], VECTOR["body"].encode()
        )
        == VECTOR["expected_signature"]
    )


@pytest.mark.parametrize(
    "secret",
    ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_AQ"],
)
@pytest.mark.parametrize(
    "body",
    [b"", b'{"a":1}', '{"text":"ol\u00e1 \u2603 \U0001f600 \\u0000"}'.encode(), b"x" * 70_000],
)
def test_sign_webhook_agrees_with_the_reference_library(secret: str, body: bytes) -> None:
    # Signed on the body's bytes rather than by the library: a receiver verifying with
    # `standardwebhooks` must still agree, for any secret it takes and any UTF-8 body.
    moment = datetime.fromtimestamp(1_700_000_123, tz=UTC)
    expected = Webhook(secret).sign("evt_01JD3M", moment, body.decode())
    assert sign_webhook(secret, "evt_01JD3M", 1_700_000_123, body) == expected


# -- the sink's own semantics ----------------------------------------------------------------


async def test_fail_first_then_default_and_duplicate_counting(
    sink: Sink, session: aiohttp.ClientSession
) -> None:
    sink.fail_first(2, 503, headers={"Retry-After": "1"})
    outcomes = [await deliver_to(sink.url, session) for _ in range(3)]
    assert [o.status_code for o in outcomes] == [503, 503, 200]
    assert outcomes[0].retry_after_s == 1.0
    assert sink.duplicates == 0  # failed answers are not deliveries
    await deliver_to(sink.url, session)  # a redelivery of the same event
    await deliver_to(sink.url, session, event_id="evt_2")
    assert [r.status for r in sink.received] == [503, 503, 200, 200, 200]
    assert sink.duplicates == 1
    assert sink.unique_ids == sink.delivered_ids == {"evt_1", "evt_2"}


async def test_wait_for_wakes_on_a_request(sink: Sink, session: aiohttp.ClientSession) -> None:
    waiting = asyncio.create_task(sink.wait_for(lambda s: "evt_1" in s.delivered_ids, 30.0))
    started = time.monotonic()
    await deliver_to(sink.url, session)
    assert await waiting
    assert time.monotonic() - started < 5.0  # woken by the request, not by its timeout
    assert await sink.wait_for(lambda s: len(s.received) == 1, 0.0)  # already true


async def test_wait_for_returns_false_on_timeout(sink: Sink) -> None:
    started = time.monotonic()
    assert not await sink.wait_for(lambda s: len(s.received) > 0, 0.1)
    assert time.monotonic() - started >= 0.1


def _connected(clients: list[socket.socket], within_s: float) -> int:
    """How many of `clients` (connecting, non-blocking) are connected within `within_s`,
    waited for without giving the event loop a turn."""
    connected = 0
    with selectors.DefaultSelector() as selector:
        for client in clients:
            selector.register(client, selectors.EVENT_WRITE, client)
        deadline = time.monotonic() + within_s
        while connected < len(clients) and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                selector.unregister(key.fileobj)
                if key.data.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected += 1
    return connected


async def test_the_sink_keeps_a_burst_of_connections_while_its_loop_is_busy(sink: Sink) -> None:
    """Two workers at the default concurrency open up to 512 connections at once, while the
    sink's loop (the test's own) is busy sending them. Past the listen backlog (aiohttp's
    default is 128) the kernel dropped a connection's SYN and the client tried again only
    1 s later, then 3 s: sends of milliseconds timed out at a test destination's 2 s, and
    five in a row opened its circuit for 30 s, the whole of a test's wait."""
    burst = 2 * WorkerConfig().concurrency
    somaxconn = Path("/proc/sys/net/core/somaxconn")
    if not somaxconn.exists() or int(somaxconn.read_text()) < burst:
        pytest.skip(f"the kernel caps every listen backlog below {burst} (net.core.somaxconn)")
    address = (URL(sink.url).host, URL(sink.url).port)
    clients: list[socket.socket] = []
    try:
        for _ in range(burst):
            client = socket.socket()
            clients.append(client)
            client.setblocking(False)
            client.connect_ex(address)
        # No await until all are in: the sink accepts none meanwhile, as when its loop is
        # busy. A SYN dropped is tried again at 1 s, 3 s, 7 s: never within the wait.
        connected = _connected(clients, within_s=5.0)
        assert connected == burst, f"{burst - connected} of {burst} connections dropped"
    finally:
        for client in clients:
            client.close()


async def test_stop_answers_a_delayed_request_at_once(session: aiohttp.ClientSession) -> None:
    sink = Sink()
    await sink.start()
    sink.respond(200, delay_s=60.0)
    sending = asyncio.create_task(deliver_to(sink.url, session, timeout_s=30.0))
    assert await sink.wait_for(lambda s: len(s.received) == 1, 5.0)
    started = time.monotonic()
    await sink.stop()
    outcome = await sending
    assert time.monotonic() - started < 5.0
    assert outcome.kind is OutcomeKind.RETRYABLE
    assert sink.delivered_ids == set()


async def test_sink_runs_as_a_process(session: aiohttp.ClientSession) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "estafeta.testing.sink",
        "--fail-first",
        "1",
        "--status",
        "503",
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        ready = json.loads(await asyncio.wait_for(process.stdout.readline(), 10.0))
        first = await deliver_to(ready["url"], session)
        second = await deliver_to(ready["url"], session)
    finally:
        process.send_signal(signal.SIGTERM)
        remaining, _ = await asyncio.wait_for(process.communicate(), 10.0)
    assert (first.status_code, second.status_code) == (503, 200)
    assert process.returncode == 0
    assert json.loads(remaining) == {
        "received": 2,
        "delivered": 1,
        "duplicates": 0,
        "bad_signatures": 0,
    }


async def test_sink_process_says_why_it_cannot_start() -> None:
    # add-a-destination.md has the reader start it on port 9000, where an earlier receiver
    # may still listen; a typed secret may not be base64. One line each, exit 2.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (["--port", str(port)], f"error: cannot listen on 127.0.0.1:{port}: "),
            (["--secret", "whsec_a"], "error: --secret: not a Standard Webhooks secret "),
        ]
        for arguments, expected in cases:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "estafeta.testing.sink",
                *arguments,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            stdout, stderr = await asyncio.wait_for(process.communicate(), 10.0)
            assert (process.returncode, stdout) == (2, b"")
            assert stderr.decode().startswith(expected)
            assert "Traceback" not in stderr.decode()


@pytest.mark.parametrize(
    ("secret", "timeout_s"), [("whsec_", 5.0), ("whsec_a", 5.0), (SECRET, 0.0)]
)
async def test_connector_rejects_a_configuration_that_cannot_work(
    session: aiohttp.ClientSession, secret: str, timeout_s: float
) -> None:
    with pytest.raises(ValueError):
        HttpConnector(url="http://127.0.0.1/", secret=secret, timeout_s=timeout_s, session=session)
