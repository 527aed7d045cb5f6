"""Redis for integration tests: the shared server under a prefix of the test's own, or a
`redis-server` of the test's own that it may kill (never the machine's shared one).

Without the shared Redis the tests that need it are skipped locally and fail under CI=true.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

SHARED_REDIS_URL = os.environ.get("ESTAFETA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class RedisServer:
    """A `redis-server` child process of this test, on a port that stays the same."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(self._directory)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        with redis.Redis(port=self.port, socket_connect_timeout=0.5) as probe:
            while True:
                try:
                    probe.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self._process.poll() is not None:
                        raise
                    time.sleep(0.02)  # bounded: waiting for the server to listen

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)


class LateRedis:
    """A proxy in front of a Redis that, once armed, holds back the server's answer to the
    next request containing `command` by `delay_s`: Redis runs it at once and answers late,
    as it does while stalled (a fork for a snapshot, a slow disk under appendfsync).

    While `refusing`, it closes every new connection at once (Redis is gone: calls fail
    fast); while `silent`, it drops every request (Redis hangs: calls wait for their
    timeout); with `slow_s`, every answer is held back that long (a Redis far away or
    overloaded, answering within the client's timeout)."""

    def __init__(self, upstream_url: str, *, command: bytes = b"", delay_s: float = 0.0) -> None:
        self._upstream = urlsplit(upstream_url)
        self._command = command
        self._delay_s = delay_s
        self.armed = False
        self.refusing = False
        self.silent = False
        self.slow_s = 0.0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> LateRedis:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}{self._upstream.path or '/0'}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        if self.refusing:
            self._tasks.discard(task)
            writer.close()
            return
        host, port = self._upstream.hostname or "127.0.0.1", self._upstream.port or 6379
        up_reader, up_writer = await asyncio.open_connection(host, port)
        late = asyncio.Event()  # the next answer from upstream is to be held back

        async def requests() -> None:
            while data := await reader.read(65536):
                if self.silent:
                    continue  # never reaches Redis: never answered
                if self.armed and self._command in data:
                    self.armed = False
                    late.set()
                up_writer.write(data)
            up_writer.close()  # the client hung up: so does Redis, which ends `answers`

        async def answers() -> None:
            while data := await up_reader.read(65536):
                if late.is_set():
                    late.clear()
                    await asyncio.sleep(self._delay_s)
                if self.slow_s:
                    await asyncio.sleep(self.slow_s)
                writer.write(data)

        try:
            await asyncio.gather(requests(), answers())
        except (OSError, asyncio.CancelledError):
            pass  # a connection ended, or the proxy closed: nothing more to pass on
        finally:
            self._tasks.discard(task)
            for w in (writer, up_writer):
                with contextlib.suppress(OSError):
                    w.close()


def fill_past_maxmemory(admin: redis.Redis) -> None:
    """Make a Redis full (`maxmemory` under `noeviction`: it refuses every write with OOM)
    well past its limit, so that estafeta's own keys expiring frees too little."""
    admin.mset({f"filler:{n}": b"x" * 1000 for n in range(2000)})
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) // 2)
    try:
        admin.set("filler:one-more", b"x")
    except redis.exceptions.OutOfMemoryError:
        return
    raise AssertionError("Redis took a write past its maxmemory")
