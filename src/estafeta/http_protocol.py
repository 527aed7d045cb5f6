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
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


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
