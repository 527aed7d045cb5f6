"""uvicorn's httptools protocol, writing each response's head together with its body, and
giving clients deadlines.

uvicorn writes a response's status line and headers as soon as the app starts the response,
and its body when the app sends it: two `write` system calls per request, each a trip through
the kernel's TCP path (on loopback, into the reader's too). In the ingest profile `write`
was ~10 % of the server's CPU; holding the head until the body comes measured +14–20 % on the
bare-HTTP ceiling (wrk, 64 connections, one core).

uvicorn takes the protocol class as its `http` setting (`uvicorn_server` in server.py; the
benchmark's bare-HTTP ceiling is served with it too). Only the way bytes reach the transport
changes: what is written, and in what order, is uvicorn's. A `100 Continue` goes out at once
(the client waits for it before sending the body). A streamed response's head goes out with
its first chunk, so an endpoint that must show its headers before it has anything to send
should send an empty chunk first. A HEAD request's cycle is not wrapped: uvicorn writes no
body for it, so a held head would never go out. Only the first write of a cycle other than a
`100 Continue` is the head: a later write is body, whatever its bytes look like. Should a
future uvicorn no longer keep its request cycle where this looks for it, responses go out as
uvicorn writes them.

Three framing decisions are this class's too (uvicorn's own differ):

* A client that shuts its writing side after its request (a half-close) still gets its
  answer: uvicorn closed the connection on the end of input, so an event was stored while
  its sender saw no answer and sent it again. Requests already whole are answered, in order,
  then the connection closes; a request cut short by the end of input is not answered.
* An answer given to a request that expects `100 Continue` before the `100` went out (a 413
  on its declared length, a 404, a 401 …) closes the connection: the client has not sent the
  body and may never send it, so neither side can tell where the next request would begin.
* A request that offers an upgrade to anything but a WebSocket (`Upgrade: h2c`, which Java's
  HttpClient sends with every request to an http:// URL) is answered as the HTTP/1.1 request
  it also is, body included (RFC 9110 §7.8): httptools skips such a request's body, so the
  app read an empty one and the bytes after the head were lost (`_ignore_upgrade`).

And clients get deadlines. Every open connection counts against `limit_concurrency`
(`server.max_concurrent_requests`), and uvicorn gave none a limit until its first answer: a
few thousand connections that send nothing, or a head a byte at a time, or a body that stops
coming, or a client that never reads its answer (uvicorn's close waits for it to be read)
answered every sender 503 for as long as they stayed.

* A connection that begins no request within uvicorn's keep-alive timeout (5 s) is closed,
  when new as when kept alive; blank lines begin no request.
* A request must arrive whole within `client_timeout_s` of its first byte, or is answered
  `408 request_timeout` and the connection closed. The time the server takes to get to it
  (a pipelined request behind others) does not count against the client.
* A head (request line and headers) over `MAX_HEAD_BYTES` is answered `431
  headers_too_large` and the connection closed: httptools would keep it in memory whole.
* At most `MAX_PIPELINED` requests wait behind the one being answered: uvicorn queued every
  request of a read (`_leave_unanswered`).
* The transport tells whenever the kernel does not take all that is written (its high-water
  mark is 0); a client that then takes none of it for `client_timeout_s` is disconnected.
  What the client takes is read from the kernel's send queue too: the kernel holds megabytes
  and refills from the transport only in large steps, so the transport's share alone stays
  unmoved for long while a slow client reads steadily.

One timer per connection at most per deadline: the request's is armed when a request begins
and none is running, and looks at when the request being read began when it fires, so a
busy connection arms one every `client_timeout_s`, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import struct
import termios
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
MAX_HEAD_BYTES = 65_536  # a request line and headers larger than this are refused: 431
MAX_PIPELINED = 16  # requests waiting behind the one being answered, on one connection
# The scope key of a refusal this protocol answered while the app read the body: the app sees
# only a disconnect, and counts and logs the refusal as the sender was answered (read_body).
CUT_OFF = "estafeta.cut_off"

Send = Callable[[Any], Awaitable[None]]


class HeadWithBody:
    """A transport for one request cycle that holds the response head until the next write."""

    __slots__ = ("_head", "_headed", "_transport")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._headed = False  # the head has been seen: everything after it is body

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
        elif (
            not self._headed
            and data != CONTINUE
            and data.startswith(b"HTTP/")
            and data.endswith(b"\r\n\r\n")
        ):
            self._headed = True
            self._head = data
        else:
            self._transport.write(data)

    def close(self) -> None:
        """A response that was started and never finished: nothing more will come."""
        self._head = None
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Unanswered:
    """The cycle of requests read past MAX_PIPELINED, which get no answer: uvicorn keeps no
    body for an answered request's cycle, and starts no other behind it."""

    __slots__ = ("message_event",)
    response_complete = True
    response_started = True
    more_body = False

    def __init__(self) -> None:
        self.message_event = asyncio.Event()  # set by uvicorn when the connection is lost


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    client_timeout_s: float = 30  # see `with_deadline`

    @classmethod
    def with_deadline(cls, client_timeout_s: float) -> type[OneWriteHttpToolsProtocol]:
        """This protocol giving clients `client_timeout_s` (`server.client_timeout_s`)."""
        return type(cls.__name__, (cls,), {"client_timeout_s": client_timeout_s})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # When the request being read began (loop time), until it is whole.
        self._request_began: float | None = None
        self._request_timer: asyncio.TimerHandle | None = None
        # Bytes of the head being read, counted from the read after the one it began in.
        self._head_bytes: int | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._write_left = 0  # bytes waiting for the client when last looked at
        self._unanswered = False  # past MAX_PIPELINED: the requests read are not answered
        # The head of a request whose upgrade offer is ignored, until it is read again.
        self._upgrade_ignored: tuple[bytes, str, bytes, list[tuple[bytes, bytes]]] | None = None

    # -- the clients' deadlines (see the module's docstring) --------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A new connection waits for its first request as a kept-alive one does.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )
        # Told whenever the kernel takes not all that is written: the client is not reading.
        transport.set_write_buffer_limits(high=0)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._end_deadlines()

    def handle_websocket_upgrade(self) -> None:
        self._end_deadlines()  # the WebSocket protocol owns the connection from here
        super().handle_websocket_upgrade()

    def _end_deadlines(self) -> None:
        for timer in (self.timeout_keep_alive_task, self._request_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self.timeout_keep_alive_task = self._request_timer = self._write_timer = None
        self._request_began = None

    # The four methods below run for every request: the base class's are called by name, not
    # through super(), which costs a frame's worth of work each (measured under callgrind).

    def data_received(self, data: bytes) -> None:
        # uvicorn ends the idle wait on any byte; here only a request's beginning ends it
        # (blank lines, which begin none, would hold the connection forever).
        idle = self.timeout_keep_alive_task
        began = self._request_began
        if idle is not None:
            self.timeout_keep_alive_task = None
            self._parse(data)
            if self._request_began is None and self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = idle  # no request being read: still idle
            else:
                idle.cancel()
        else:
            self._parse(data)
        if began is not None and began is self._request_began and self._head_bytes is not None:
            # Read while the same head was unfinished before and after: all of it head.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                detail = f"the request's head is over {MAX_HEAD_BYTES} bytes"
                self._refuse(431, "headers_too_large", detail)

    def _parse(self, data: bytes) -> None:
        """uvicorn's `data_received`, but for an upgrade it does not take (see
        `_ignore_upgrade`)."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade as exc:
            if self._upgrade_ignored is not None:
                self._ignore_upgrade(data[exc.args[0] :])
            elif self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _ignore_upgrade(self, rest: bytes) -> None:
        """Read a request that offered an upgrade to anything but a WebSocket (`Upgrade:
        h2c`: Java's HttpClient on every request to an http:// URL, `curl --http2`) as the
        HTTP/1.1 request it also is (RFC 9110 §7.8: a server may ignore the offer). httptools
        skips the body of any request that offers one, so the app read an empty body (a
        webhook refused as `invalid_json`) and the bytes after the head were lost. Its head,
        `Connection` without `upgrade` (the app sees the other headers as sent), is parsed
        again by a new parser, followed by what came after it."""
        method, version, url, headers = self._upgrade_ignored or (b"", "", b"", [])
        self._upgrade_ignored = None
        lines = [method + b" " + url + b" HTTP/" + version.encode("ascii")]
        for name, value in headers:
            if name == b"connection":  # without its `upgrade` token, no parser upgrades
                tokens = [t.strip() for t in value.split(b",")]
                value = b", ".join(t for t in tokens if t.lower() != b"upgrade")
                if not value:
                    continue
            lines.append(name + b": " + value)
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn's
        self._parse(b"\r\n".join(lines) + b"\r\n\r\n" + rest)

    def on_message_begin(self) -> None:
        HttpToolsProtocol.on_message_begin(self)
        self._request_began = self.loop.time()
        self._head_bytes = 0
        if self._request_timer is None:  # else it is running: it looks at the time began
            self._request_timer = self.loop.call_later(self.client_timeout_s, self._request_late)

    def on_message_complete(self) -> None:
        if self._upgrade_ignored is not None:
            return  # its body was skipped: the request is read again (`_ignore_upgrade`)
        self._request_began = None
        HttpToolsProtocol.on_message_complete(self)

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        if self._request_began is None and not self._answering():
            super().timeout_keep_alive_handler()

    def _leave_unanswered(self) -> None:
        """A request past MAX_PIPELINED waiting ones: uvicorn queued every request of a read,
        each with its scope, headers and cycle (250 KB of small requests behind one slow
        answer held 28 MB). It, and every later one, is read and left unanswered: the last
        request queued closes the connection with its answer, and the client sends the
        rest again on a new one, as RFC 9112 §9.3.2 asks of a client that pipelines."""
        if not self._unanswered:
            self._unanswered = True
            self.pipeline[0][0].keep_alive = False  # the one queued last
            # Read as if answered, so that uvicorn keeps no body and starts nothing.
            self.cycle = _Unanswered()  # type: ignore[assignment]

    def shutdown(self) -> None:
        # Past MAX_PIPELINED the cycle is `_Unanswered`, which uvicorn would take for an
        # answered one and close at once: the answer being made and those queued were lost.
        if not self._unanswered:  # else the last request kept already closes it
            super().shutdown()

    def _answering(self) -> bool:
        """Whether the server owes an answer to a request it has whole (its turn, not the
        client's)."""
        cycle = self.cycle
        return (
            bool(self.pipeline)
            or self._unanswered
            or (cycle is not None and not cycle.response_complete and not cycle.more_body)
        )

    def _request_late(self) -> None:
        self._request_timer = None
        began = self._request_began
        if began is None or self.transport.is_closing():
            return
        left = began + self.client_timeout_s - self.loop.time()
        if left > 0:
            self._request_timer = self.loop.call_later(left, self._request_late)
        elif self._answering() or self.flow.read_paused:
            # Not read because the server has not got to it yet: the client's time runs
            # again once it has.
            self._request_timer = self.loop.call_later(self.client_timeout_s, self._request_late)
        else:
            detail = f"the request did not arrive whole within {self.client_timeout_s:g} s"
            self._refuse(408, "request_timeout", detail)

    def _refuse(self, status: int, error: str, detail: str) -> None:
        """Answer the request being read, in estafeta's error format, and close."""
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self._answering() or (
            cycle is not None and cycle.response_started and not cycle.response_complete
        ):
            # An earlier request's answer is due, or half written: no other may go first.
            self.transport.close()
            return
        if cycle is not None and not cycle.response_complete:
            # The app waits for the body: it is told the client went away, and why.
            cycle.scope[CUT_OFF] = (status, error, detail)  # type: ignore[literal-required]
            cycle.disconnected = True
            cycle.message_event.set()
        body = orjson.dumps({"error": error, "detail": detail})
        self.transport.write(
            b"%sconnection: close\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (STATUS_LINE[status], len(body), body)
        )
        self.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_left = self._untaken()
            self._write_timer = self.loop.call_later(self.client_timeout_s, self._write_late)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_late(self) -> None:
        """The client took none of what waits for it for client_timeout_s: let it go."""
        self._write_timer = None
        left = self._untaken()
        if left and left >= self._write_left:
            self.transport.abort()  # close() would wait for the client to read it all
        elif left:  # it reads, slowly
            self._write_left = left
            self._write_timer = self.loop.call_later(self.client_timeout_s, self._write_late)

    def _untaken(self) -> int:
        """Bytes written that the client has not taken: the transport's, and the kernel's
        send queue (unsent or unacknowledged; SIOCOUTQ on Linux). The kernel holds megabytes
        and takes more from the transport only once a third of them is gone: a client reading
        steadily, slower than that, would leave the transport's bytes unmoved for long."""
        left = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):  # not Linux, or already closed
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                left += struct.unpack("i", queued)[0]
        return left

    # -- one write per response, half-closes, refused `100 Continue`s --------------------

    # asyncio.Protocol lets it return True (keep writing); uvicorn types it `None`.
    def eof_received(self) -> bool | None:  # type: ignore[override]
        cycle = getattr(self, "cycle", None)
        if self._unanswered:
            return True  # the requests kept are answered, then the connection closes
        if (
            cycle is None
            or getattr(cycle, "response_complete", True)
            or getattr(cycle, "more_body", True)
        ):
            return None  # nothing whole left to answer: closed, as uvicorn does
        # The last request read is whole: answered (after any pipelined before it), then
        # the connection closes; until then asyncio keeps it open for writing.
        cycle.keep_alive = False
        return True

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        if len(self.pipeline) >= MAX_PIPELINED or self._unanswered:
            self._leave_unanswered()
            return
        parser = self.parser
        if parser.should_upgrade() and not self._should_upgrade():
            method = parser.get_method()
            if method != b"CONNECT":  # CONNECT's "upgrade" is its tunnel: not ignored
                # Nothing starts for it now: it is read again without the offer.
                self._upgrade_ignored = (method, parser.get_http_version(), self.url, self.headers)
                return
        before = getattr(self, "cycle", None)
        HttpToolsProtocol.on_headers_complete(self)
        cycle = getattr(self, "cycle", None)
        if (
            cycle is not None
            and cycle is not before
            and hasattr(cycle, "transport")
            # uvicorn writes no body for HEAD: its head must go out as written.
            and getattr(cycle, "scope", {}).get("method") != "HEAD"
        ):
            cycle.transport = HeadWithBody(self.transport)
        if (
            cycle is not None
            and cycle is not before
            and getattr(cycle, "waiting_for_100_continue", False)  # only those: a hot path
            and hasattr(cycle, "send")
        ):
            cycle.send = _closing_unsent_body(cycle, cycle.send)


def _closing_unsent_body(cycle: Any, send: Send) -> Send:
    """`send` that closes the connection after an answer given before a `100 Continue` the
    client waits for: the body it was about to send is no longer wanted, and whether it comes
    (to be read as the body) or not (the next request instead) cannot be told."""

    async def closing(message: Any) -> None:
        if (
            message["type"] == "http.response.start"
            and getattr(cycle, "waiting_for_100_continue", False)
            and getattr(cycle, "more_body", False)
        ):
            cycle.keep_alive = False
        await send(message)

    return closing
