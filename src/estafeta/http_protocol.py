"""uvicorn's httptools protocol, writing each response's head together with its body.

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

Two framing decisions are this class's too (uvicorn's own differ):

* A client that shuts its writing side after its request (a half-close) still gets its
  answer: uvicorn closed the connection on the end of input, so an event was stored while
  its sender saw no answer and sent it again. Requests already whole are answered, in order,
  then the connection closes; a request cut short by the end of input is not answered.
* An answer given to a request that expects `100 Continue` before the `100` went out (a 413
  on its declared length, a 404, a 401 …) closes the connection: the client has not sent the
  body and may never send it, so neither side can tell where the next request would begin.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

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


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    # asyncio.Protocol lets it return True (keep writing); uvicorn types it `None`.
    def eof_received(self) -> bool | None:  # type: ignore[override]
        cycle = getattr(self, "cycle", None)
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
        before = getattr(self, "cycle", None)
        super().on_headers_complete()
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
