"""Redis for integration tests: the shared server under a prefix of the test's own, or a
`redis-server` of the test's own that it may kill (never the machine's shared one).

Without the shared Redis the tests that need it are skipped locally and fail under CI=true.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

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
