"""A small HTTP/1.1 load generator on uvloop with raw sockets (no HTTP client library in the
way), for what wrk cannot do:

* **open loop at a constant rate** (wrk2-style; wrk has no `-R`): request *i* is due at
  t0 + i/rate whatever happened to the previous ones; a due request waits for a free
  keep-alive connection if none is idle, and its latency is measured from when it was *due*,
  so a stalled server is charged for the requests it held back (no coordinated omission);
* **a send time in the body**: with `--stamp` the `[sent:<ns>]` mark of each WhatsApp body is
  set to `time.time_ns()` just before the request is written, and the body is signed then
  (`X-Hub-Signature-256`), so a sink can compute arrival − sent.

Closed loop (no `--rate`) sends as fast as `--connections` connections allow, like wrk.

    python bench/loadgen.py --port P --path /in/wa --run TAG --count N \
        [--rate R] --seconds S [--connections C] [--stamp]

prints one `BENCH_JSON {...}` line: counts by status, errors, the achieved rate and latency
percentiles in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import time
from collections.abc import Callable
from typing import Any

import uvloop
from common import HOST, emit, percentiles, signature, stamp, whatsapp_body

TICK_S = 0.001  # the open loop's shortest sleep: the event loop's timer resolution


class _Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request outstanding."""

    def __init__(self, on_response: Callable[[_Conn, int], None], on_lost: Callable[[_Conn], None]):
        self._on_response = on_response
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.due = 0.0  # when the outstanding request was due (open loop) or written
        self.written = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, due: float, written: float) -> None:
        assert self.transport is not None
        self.busy = True
        self.due = due
        self.written = written
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.busy:
            status = self._parse()
            if status is None:
                return
            self.busy = False
            self._on_response(self, status)

    def _parse(self) -> int | None:
        """The status of a complete response at the head of the buffer (consumed), else None."""
        buf = self.buf
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        status = int(buf[9:12])
        head = bytes(buf[:head_end]).lower()
        at = head.find(b"\r\ncontent-length:")
        pos = head_end + 4
        if at >= 0:
            line_end = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : line_end if line_end >= 0 else len(head)])
            if len(buf) < pos + length:
                return None
            del buf[: pos + length]
            return status
        if b"transfer-encoding: chunked" in head:
            while True:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
                pos = line_end + 2
                if size == 0:
                    if len(buf) < pos + 2:
                        return None
                    del buf[: pos + 2]
                    return status
                pos += size + 2
                if len(buf) < pos:
                    return None
        del buf[:pos]  # no body (204, 304)
        return status

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(self)


class LoadGen:
    """See the module docstring."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bodies = [whatsapp_body(args.run, args.offset + i) for i in range(args.count)]
        self.head = (
            f"POST {args.path} HTTP/1.1\r\nHost: {HOST}:{args.port}\r\n"
            "Content-Type: application/json\r\n"
        ).encode()
        self.next_index = 0
        self.wraps = 0
        self.idle: collections.deque[_Conn] = collections.deque()
        self.waiting: collections.deque[float] = collections.deque()  # due times (open loop)
        self.conns: list[_Conn] = []
        self.latencies: list[float] = []  # ms, from due (open) or written (closed)
        self.service: list[float] = []  # ms, from written
        self.statuses: collections.Counter[int] = collections.Counter()
        self.lost = 0
        self.sent = 0
        self.issuing = True
        self.outstanding = 0
        self.drained = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def _request(self) -> bytes:
        i = self.next_index
        self.next_index += 1
        if self.next_index >= len(self.bodies):
            self.next_index = 0
            self.wraps += 1
        body = self.bodies[i]
        if self.args.stamp:
            body = stamp(body, time.time_ns())
        return b"%sX-Hub-Signature-256: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            self.head,
            signature(body).encode(),
            len(body),
            body,
        )

    def _write(self, conn: _Conn, due: float) -> None:
        self.sent += 1
        self.outstanding += 1
        conn.send(self._request(), due, time.perf_counter())

    def _on_response(self, conn: _Conn, status: int) -> None:
        now = time.perf_counter()
        self.outstanding -= 1
        self.statuses[status] += 1
        self.latencies.append((now - conn.due) * 1000)
        self.service.append((now - conn.written) * 1000)
        self._next(conn)

    def _next(self, conn: _Conn) -> None:
        if self.args.rate is None:
            if self.issuing:
                now = time.perf_counter()
                self._write(conn, now)
                return
        elif self.waiting:
            self._write(conn, self.waiting.popleft())
            return
        self.idle.append(conn)
        if not self.issuing and self.outstanding == 0:
            self.drained.set()

    def _on_lost(self, conn: _Conn) -> None:
        if conn.busy:
            self.lost += 1
            self.outstanding -= 1
            conn.busy = False
        if conn in self.idle:
            self.idle.remove(conn)
        if not self.issuing and self.outstanding == 0:
            self.drained.set()

    async def run(self) -> dict[str, Any]:
        args = self.args
        for _ in range(args.connections):
            _, conn = await self.loop.create_connection(
                lambda: _Conn(self._on_response, self._on_lost), HOST, args.port
            )
            self.conns.append(conn)
            self.idle.append(conn)
        started = time.perf_counter()
        self.cpu_started = time.process_time()
        self.started_ns = time.time_ns()
        if args.rate is None:
            while self.idle:
                self._write(self.idle.popleft(), time.perf_counter())
            await asyncio.sleep(args.seconds)
        else:
            await self._paced(started)
        self.issuing = False
        stopped = time.perf_counter()
        if self.outstanding:
            self.drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), args.timeout)
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.close()
        return self._result(stopped - started)

    async def _paced(self, t0: float) -> None:
        rate = float(self.args.rate)
        end = t0 + self.args.seconds
        i = 0
        self.late_max_ms = 0.0
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            due_until = int((now - t0) * rate) + 1
            while i < due_until:
                due = t0 + i / rate
                self.late_max_ms = max(self.late_max_ms, (now - due) * 1000)
                if self.idle:
                    self._write(self.idle.popleft(), due)
                else:
                    self.waiting.append(due)
                i += 1
            # uvloop's timers count whole milliseconds and round a shorter delay down to 0:
            # sleeping until the next due time (0.2 ms at 5,000/s) spun the loop and took
            # the load core whole. Waking every millisecond at most sends what fell due
            # in a burst, each request still timed from its own due time.
            await asyncio.sleep(max(TICK_S, t0 + i / rate - time.perf_counter()))
        self.unsent = len(self.waiting)
        self.waiting.clear()

    def _result(self, elapsed: float) -> dict[str, Any]:
        ok = sum(n for status, n in self.statuses.items() if 200 <= status < 300)
        args = self.args
        mode = "closed loop" if args.rate is None else f"open loop at {args.rate:g}/s"
        return {
            "tool": f"bench/loadgen.py ({mode}, {args.connections} connections"
            + (", send time stamped and signed per request)" if args.stamp else ")"),
            "mode": "closed" if args.rate is None else "open",
            "target_rate": args.rate,
            "connections": args.connections,
            "duration_s": elapsed,
            "started_unix_ns": self.started_ns,
            "own_cores": round((time.process_time() - self.cpu_started) / elapsed, 3)
            if elapsed
            else None,
            "sent": self.sent,
            "ok": ok,
            "rps": ok / elapsed if elapsed else 0.0,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "lost": self.lost,
            "unsent_at_end": getattr(self, "unsent", 0),
            "scheduler_late_max_ms": getattr(self, "late_max_ms", 0.0),
            "wraps": self.wraps,
            "latency_ms": percentiles(self.latencies, (50, 90, 99, 99.9, 100)),
            "service_ms": percentiles(self.service, (50, 99, 99.9)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/in/wa")
    parser.add_argument("--run", required=True, help="tag that makes the message ids distinct")
    parser.add_argument("--offset", type=int, default=0, help="first message index")
    parser.add_argument("--count", type=int, required=True, help="distinct bodies to cycle")
    parser.add_argument("--rate", type=float, default=None, help="requests/s (open loop)")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--stamp", action="store_true", help="send time in each body, re-signed")
    args = parser.parse_args()

    async def go() -> dict[str, Any]:
        gen = LoadGen(args)
        # A collection of the pre-built bodies would stall the loop for milliseconds and be
        # charged to the server as latency: nothing here forms cycles worth collecting.
        gc.collect()
        gc.freeze()
        gc.disable()
        return await gen.run()

    emit(uvloop.run(go()))


if __name__ == "__main__":
    main()
