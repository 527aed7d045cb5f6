"""The benchmark's receiver: estafeta's own test sink (`estafeta.testing.sink.Sink`) with a
lean handler that, instead of keeping every request, counts arrivals and distinct
(path, webhook-id) pairs and computes arrival − sent from the `[sent:<ns>]` mark that the load
generator put in the message text (both clocks are this machine's `time.time_ns()`).

    python bench/sink.py --port P        # GET /_bench/stats, POST /_bench/reset

Every other path answers 200 to any method, as a healthy webhook receiver does.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from array import array

import orjson
import uvloop
from aiohttp import web

from estafeta.testing.sink import Sink

SENT_RE_START = b"[sent:"


class BenchSink(Sink):
    """See the module docstring; `Sink.start`/`stop`/`url` are inherited."""

    def __init__(self) -> None:
        super().__init__(secret=None)
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

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/_bench/"):
            return self._control(request)
        body = await request.read()
        now = time.time_ns()
        self.count += 1
        if not self.first_ns:
            self.first_ns = now
        self.last_ns = now
        second = now // 1_000_000_000
        self.per_second[second] = self.per_second.get(second, 0) + 1
        path = request.path
        self.by_path[path] = self.by_path.get(path, 0) + 1
        webhook_id = request.headers.get("webhook-id")
        if webhook_id is not None:
            key = (path, webhook_id)
            if key in self.seen:
                self.dups += 1
            else:
                self.seen.add(key)
        at = body.find(SENT_RE_START)
        if at >= 0:
            sent = int(body[at + 6 : at + 25])
            if sent:
                self.latencies_ms.append((now - sent) / 1e6)
        return web.Response(status=200)

    def _control(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/_bench/reset":
            self.reset()
            return web.json_response({"reset": True})
        lat = sorted(self.latencies_ms)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return lat[max(0, min(len(lat) - 1, round(p / 100 * len(lat) + 0.5) - 1))]

        stats = {
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
        return web.Response(body=orjson.dumps(stats), content_type="application/json")


async def _serve(port: int) -> None:
    sink = BenchSink()
    await sink.start("127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(orjson.dumps({"url": sink.url}).decode(), flush=True)
    await stop.wait()
    await sink.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    uvloop.run(_serve(args.port))


if __name__ == "__main__":
    main()
