"""The lifecycle every local test server shares: the sink and the fake providers.

Each listens on 127.0.0.1 (port 0 picks a free one), tells its URL once started, and stops
waking whatever its handlers are waiting on (`_stopping`), so a slow answer never holds a
test's teardown.
"""

from __future__ import annotations

import asyncio
import ssl
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

from aiohttp import web

# Connections the kernel completes and keeps for the server until its loop accepts them (it
# caps this at net.core.somaxconn, 4096 by default since Linux 5.4). aiohttp's default, 128,
# is less than one worker opens at once (`concurrency`, 256): past it the kernel drops a
# connection's SYN and the client tries again only 1 s later, then 3 s, so while the loop
# was busy (a test's, sending to it) sends of milliseconds timed out and opened circuits.
BACKLOG = 4096


class LocalServer(ABC):
    # The largest request body a handler may read (aiohttp's default: 1 MiB; over it, 413).
    client_max_size = 1024**2

    def __init__(self) -> None:
        self._stopping = asyncio.Event()  # set by `stop`: delayed answers give up at once
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    @abstractmethod
    def add_routes(self, app: web.Application) -> None:
        """Register the server's endpoints."""

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, tls: ssl.SSLContext | None = None
    ) -> None:
        """Listen on `host:port`; port 0 picks a free one (read it back from `url`). With a
        server `tls` context it serves HTTPS (a system with its own certificate)."""
        self._stopping.clear()
        app = web.Application(client_max_size=self.client_max_size)
        self.add_routes(app)
        # A short shutdown: requests still waiting on a delay are woken by `stop` anyway.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, host, port, ssl_context=tls, backlog=BACKLOG).start()
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        self._url = f"{'https' if tls else 'http'}://{bound_host}:{bound_port}"

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT` (`https://` with TLS), once started."""
        if self._url is None:
            name = type(self).__name__
            raise RuntimeError(f"the {name} is not started; await its start() first")
        return self._url

    @property
    def open_connections(self) -> int:
        """The client connections open to it now, idle kept-alive ones included."""
        server = self._runner.server if self._runner is not None else None
        return len(server.connections) if server is not None else 0

    async def stop(self) -> None:
        """Stop listening; answers still waiting on a delay are cut short."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
