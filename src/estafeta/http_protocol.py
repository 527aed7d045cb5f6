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

Four framing decisions are this class's too (uvicorn's own differ):

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
* A request that is not valid HTTP is answered `400 invalid_request` in estafeta's format,
  with the parser's reason (uvicorn answered a plain `Invalid HTTP request received.`). It,
  and any refusal of this class (408, 431), waits for the answers due to the requests read
  before it, then closes the connection: uvicorn wrote its 400 at once and closed, so a
  webhook pipelined before it was stored and never answered. A body in a transfer coding
  other than chunked (`gzip, chunked`: httptools takes off the chunked framing only, and the
  app read the gzip bytes) is answered `501 unsupported_transfer_coding` the same way.

And clients get deadlines. Every open connection counts against `limit_concurrency`
(`server.max_concurrent_requests`), and uvicorn gave none a limit until its first answer: a
few thousand connections that send nothing, or a head a byte at a time, or a body that stops
coming, or a client that never reads its answer (uvicorn's close waits for it to be read)
answered every sender 503 for as long as they stayed.

* A connection that begins no request within uvicorn's keep-alive timeout (5 s) is closed,
  when new as when kept alive; blank lines begin no request.
* A request must arrive whole within `client_timeout_s` of its first byte, or is answered
  `408 request_timeout` and the connection closed. The time the server takes to get to it
  (a pipelined request behind others) does not count against the client. One answered
  before its body came (a 404, a 413 on its declared length) gets no second answer: the
  connection is closed.
* A head (request line and headers) over `MAX_HEAD_BYTES` is answered `431
  headers_too_large` and the connection closed: httptools would keep it in memory whole.
  It is measured when it ends, and counted while it goes on in reads after the one it began
  in (that first read, at most 250 KB, is all an unfinished head can hold uncounted). The
  trailer fields after a chunked body are counted the same: httptools keeps them too.
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


class _HeadTooLarge(Exception):
    """Raised from the parser's callback to stop reading a head found over MAX_HEAD_BYTES."""


class _UnknownCoding(Exception):
    """Raised from the parser's callback to stop reading a body sent in a transfer coding
    other than chunked (`gzip, chunked`): httptools takes off the chunked framing only."""


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
        self._read_bytes = 0  # the size of the read being parsed
        # A refusal owed once the answers due to earlier requests are out; nothing more is read.
        self._last_answer: bytes | None = None
        # The head of a request whose upgrade offer is ignored, until it is read again.
        self._upgrade_ignored: tuple[bytes, str, bytes, list[tuple[bytes, bytes]]] | None = None
        # When that request began, kept for its second reading (`on_message_begin`).
        self._reread_began: float | None = None

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

    # data_received, the parser's callbacks below (on_message_begin, on_message_complete,
    # on_headers_complete, on_body) and on_response_complete run for every request (on_body
    # for every one with a body): the base class's are called by name, not through super(),
    # which costs a frame's worth of work each (measured under callgrind). data_received
    # parses itself, without uvicorn's two frames (its own and `_unset_keepalive_…`).

    def data_received(self, data: bytes) -> None:
        if self._last_answer is not None:
            return  # the connection ends with a refusal: nothing after it is read
        # uvicorn ends the idle wait on any byte; here only a request's beginning ends it
        # (blank lines, which begin none, would hold the connection forever).
        idle = self.timeout_keep_alive_task
        began = self._request_began
        self._read_bytes = size = len(data)
        head_bytes = self._head_bytes
        if head_bytes is not None:  # a head unfinished: this read is its, up to its end
            self._head_bytes = head_bytes + size
        if idle is not None:
            self.timeout_keep_alive_task = None
        # uvicorn's parse, its errors answered here: in estafeta's format, saying why, and
        # after the answers due to the requests before (uvicorn wrote its 400 at once and
        # closed: a webhook already stored was never answered).
        while True:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                if self._upgrade_ignored is not None:
                    # Read again, without the offer, by a new parser: its head and what came
                    # after it (`_ignore_upgrade`), through this same loop and its errors.
                    data = self._ignore_upgrade(data[exc.args[0] :])
                    continue
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
            except httptools.HttpParserError as exc:
                if idle is not None:
                    idle.cancel()
                self._not_http(exc)
                return
            break
        if idle is not None:
            if self._request_began is None and self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = idle  # no request being read: still idle
            else:
                idle.cancel()
        if (
            head_bytes is not None
            and began is self._request_began
            and self._head_bytes is not None
            and self._head_bytes > MAX_HEAD_BYTES
        ):
            # Unfinished before and after this read, the same head (or trailer section):
            # held in memory whole.
            # A trailer section when this request's head is done: its cycle is made.
            # (Past MAX_PIPELINED the cycle is `_Unanswered`, which has no scope.)
            self._refuse_head(trailers=getattr(self.cycle, "scope", None) is self.scope)

    def _not_http(self, exc: httptools.HttpParserError) -> None:
        """The parser refused what was sent (or a callback stopped it)."""
        cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
        if isinstance(cause, _HeadTooLarge):
            self._refuse_head()
            return
        if isinstance(cause, _UnknownCoding):  # RFC 9112 §6.1: a coding not understood
            detail = f"the request's transfer coding {cause} is not supported: only chunked is"
            self._refuse(501, "unsupported_transfer_coding", detail)
            return
        # llhttp's reason (`Invalid method encountered`, `Duplicate Content-Length` …). Not
        # the URL parser's, which quotes the URL (a `?token=` in the log); a callback's own
        # error other than the parser's is a bug, not the client's to read.
        if cause is not exc and isinstance(cause, httptools.HttpParserInvalidURLError):
            reason = "the URL cannot be parsed"
        elif isinstance(cause, httptools.HttpParserError):
            reason = str(cause)
        else:
            reason = "unreadable"
        self.logger.warning("Invalid HTTP request received: %s", reason)  # uvicorn's line
        self._refuse(400, "invalid_request", f"the request is not valid HTTP: {reason}")

    def _refuse_head(self, *, trailers: bool = False) -> None:
        what = "trailer fields are" if trailers else "head is"
        detail = f"the request's {what} over {MAX_HEAD_BYTES} bytes"
        self._refuse(431, "headers_too_large", detail)

    # A chunked body's chunk header opens what may be its trailer section (after the last,
    # empty chunk): counted as a head until data comes (on_body) or it ends. httptools keeps
    # trailer fields as it keeps a head's, and uvicorn appends them to the request's headers.
    # Called for chunked bodies only.

    def on_chunk_header(self) -> None:
        self._head_bytes = 0
        # Only a chunked body has chunks: its codings are looked at here, not on every head.
        # llhttp refuses (400) a request whose last coding is not chunked.
        for name, value in self.headers:
            if name == b"transfer-encoding":
                for coding in value.split(b","):
                    coding = coding.strip().lower()
                    if coding and coding != b"chunked":  # a list may hold empty elements
                        raise _UnknownCoding(coding.decode("latin-1"))

    def on_chunk_complete(self) -> None:
        self._head_bytes = None

    def on_body(self, body: bytes) -> None:
        self._head_bytes = None  # a chunk's data: no trailer section
        HttpToolsProtocol.on_body(self, body)

    def _ignore_upgrade(self, rest: bytes) -> bytes:
        """Read a request that offered an upgrade to anything but a WebSocket (`Upgrade:
        h2c`: Java's HttpClient on every request to an http:// URL, `curl --http2`) as the
        HTTP/1.1 request it also is (RFC 9110 §7.8: a server may ignore the offer). httptools
        skips the body of any request that offers one, so the app read an empty body (a
        webhook refused as `invalid_json`) and the bytes after the head were lost. Returns its
        head, `Connection` without `upgrade` (the app sees the other headers as sent), and
        what came after it, for a new parser to read."""
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
        # Its head was measured (or found small) as it came: only the heads after it in
        # `rest` are left for the "one big read" measure (`on_headers_complete`).
        self._read_bytes = len(rest)
        # Its deadline runs from its first byte, not from this second reading.
        self._reread_began = self._request_began
        return b"\r\n".join(lines) + b"\r\n\r\n" + rest

    def on_message_begin(self) -> None:
        HttpToolsProtocol.on_message_begin(self)
        began = self._reread_began
        if began is None:
            self._request_began = self.loop.time()
        else:  # a request read again without its upgrade offer (`_ignore_upgrade`)
            self._request_began = began
            self._reread_began = None
        self._head_bytes = 0
        if self._request_timer is None:  # else it is running: it looks at the time began
            self._request_timer = self.loop.call_later(self.client_timeout_s, self._request_late)

    def on_message_complete(self) -> None:
        if self._upgrade_ignored is not None:
            return  # its body was skipped: the request is read again (`_ignore_upgrade`)
        self._request_began = None
        HttpToolsProtocol.on_message_complete(self)

    def on_response_complete(self) -> None:
        last = self._last_answer
        if last is None or self.pipeline:
            HttpToolsProtocol.on_response_complete(self)
            return
        # The answers due are out: the refusal owed after them ends the connection.
        self.server_state.total_requests += 1
        if not self.transport.is_closing():
            self.transport.write(last)
            self.transport.close()

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
        """Answer the request being read, in estafeta's error format, and close: after the
        answers due to the requests before it, if any."""
        if self.transport.is_closing() or self._last_answer is not None:
            return
        body = orjson.dumps({"error": error, "detail": detail})
        answer = (
            b"%sconnection: close\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (STATUS_LINE[status], len(body), body)
        )
        cycle = self.cycle
        if self._answering():
            # Earlier requests are owed their answers (a webhook among them may be stored
            # already): they go out first, in order, then this one (on_response_complete).
            pipeline = self.pipeline
            if cycle is not None and cycle.more_body and pipeline and pipeline[0][0] is cycle:
                pipeline.popleft()  # the request refused, queued with its body unread
            self._last_answer = answer
            self.flow.pause_reading()
            return
        if cycle is not None and cycle.response_started and cycle.more_body:
            # An answer half written, or given before the body came whole (a 404, a 413 …):
            # one answer per request, the connection closes without another.
            self.transport.close()
            return
        if cycle is not None and not cycle.response_complete:
            # The app waits for the body: it is told the client went away, and why.
            cycle.scope[CUT_OFF] = (status, error, detail)  # type: ignore[literal-required]
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.write(answer)
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
        if self._unanswered or self._last_answer is not None:
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
        head_bytes = self._head_bytes
        self._head_bytes = None
        # A head that came in reads of their own, or in one read larger than the limit, is
        # measured (only those: the hot path): one read or two of it were never counted.
        if (head_bytes or self._read_bytes > MAX_HEAD_BYTES) and self._head_size() > MAX_HEAD_BYTES:
            raise _HeadTooLarge  # stops the parser: answered 431 (`_not_http`)
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

    def _head_size(self) -> int:
        """The head just read, in bytes: its request line and headers as sent, but for the
        spaces around header values."""
        method = self.parser.get_method()
        line = len(method) + len(self.url) + len(b"  HTTP/1.1\r\n")
        return line + sum(len(name) + len(value) + 4 for name, value in self.headers) + 2


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
