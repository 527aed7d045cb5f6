"""The benchmark's receiver: a lean HTTP/1.1 server that answers 200 to every webhook, counts
arrivals and distinct (path, webhook-id) pairs, and computes arrival − sent from the
`[sent:<ns>]` mark that the load generator put in the message text (both clocks are this
machine's `time.time_ns()`).

    python bench/sink.py --port P        # GET /_bench/stats, POST /_bench/reset

It stands for the destinations, which in a deployment run on other machines: on this one it
shares two cores with the hub, PostgreSQL and the load tool, so it should take as little of
them as it can. It is therefore an asyncio protocol on httptools (the parser uvicorn uses)
rather than a web framework: aiohttp's server, which it was until 2026-12-02, spent ~95 µs of
CPU per request in the end-to-end phase, this ~25 µs (bench/README.md). Every system measured
meets the same sink. Keep-alive as HTTP/1.1 has it, bodies by length or chunked (httptools
decodes both); a request it cannot parse is answered 400 and its connection closed.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from array import array
from typing import Any, cast

import httptools
import orjson
import uvloop

SENT_MARK = b"[sent:"
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
OK_CLOSE = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class Tally:
    """What arrived: counts, distinct deliveries, and arrival − sent per request."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.seen: set[tuple[str, str]] = set()
        self.dups = 0
        self.latencies_ms = array("d")
        self.first_ns = 0
        self.last_ns = 0
        self.per_second: dict[int, int] = {}
        self.by_path: dict[str, int] = {}

    def arrived(self, path: str, webhook_id: str | None, body: bytes) -> None:
        now = time.time_ns()
        self.count += 1
        if not self.first_ns:
            self.first_ns = now
        self.last_ns = now
        second = now // 1_000_000_000
        self.per_second[second] = self.per_second.get(second, 0) + 1
        self.by_path[path] = self.by_path.get(path, 0) + 1
        if webhook_id is not None:
            key = (path, webhook_id)
            if key in self.seen:
                self.dups += 1
            else:
                self.seen.add(key)
        at = body.find(SENT_MARK)
        if at >= 0:
            sent = int(body[at + 6 : at + 25])
            if sent:
                self.latencies_ms.append((now - sent) / 1e6)

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return lat[max(0, min(len(lat) - 1, round(p / 100 * len(lat) + 0.5) - 1))]

        return {
            "count": self.count,
            "unique": len(self.seen) if self.seen else self.count - self.dups,
            "duplicates": self.dups,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "by_path": self.by_path,
            "per_second": sorted(self.per_second.items()),
            "latency_n": len(lat),
            "latency_ms": {
                "p50": pct(50),
                "p90": pct(90),
                "p99": pct(99),
                "p99.9": pct(99.9),
                "max": lat[-1] if lat else None,
            },
        }


class SinkProtocol(asyncio.Protocol):
    """One connection: requests parsed as they come, each answered once it is complete."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._webhook_id: str | None = None
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP server's (uvloop's own class)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(BAD_REQUEST)
                self.transport.close()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._webhook_id = None
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"webhook-id":
            self._webhook_id = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        path = httptools.parse_url(self._url).path.decode("latin-1")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        keep_alive = self.parser.should_keep_alive()
        if path.startswith("/_bench/"):
            transport.write(self._control(path, keep_alive))
        else:
            self.tally.arrived(path, self._webhook_id, body)
            transport.write(OK if keep_alive else OK_CLOSE)
        if not keep_alive:
            transport.close()

    def _control(self, path: str, keep_alive: bool) -> bytes:
        if path == "/_bench/reset":
            self.tally.reset()
            content = orjson.dumps({"reset": True})
        else:
            content = orjson.dumps(self.tally.stats())
        head = (
            f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            f"content-length: {len(content)}\r\n"
            + ("" if keep_alive else "connection: close\r\n")
            + "\r\n"
        )
        return head.encode() + content


async def _serve(port: int) -> None:
    tally = Tally()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SinkProtocol(tally), "127.0.0.1", port, backlog=1024, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(orjson.dumps({"url": f"http://127.0.0.1:{bound}"}).decode(), flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    uvloop.run(_serve(args.port))


if __name__ == "__main__":
    main()
