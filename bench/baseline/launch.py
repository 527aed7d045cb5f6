"""Start and stop the baseline (uvicorn + FastAPI, a Celery worker) and count its queue."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import (
    APP_SECRET,
    BENCH_DIR,
    BIN,
    REDIS_PREFIX,
    REDIS_URL,
    SERVER_CPU,
    Proc,
    free_port,
    running,
    start,
    wait_port,
)

BASELINE_DIR = BENCH_DIR / "baseline"
QUEUE = "estafeta-bench-webhooks"
PATH = "/webhooks/whatsapp"
# Prefork children per Celery worker: I/O-bound tasks, so more than the core count.
CELERY_CONCURRENCY = 8


def _env(destinations: list[str]) -> dict[str, str]:
    return {
        "BENCH_APP_SECRET": APP_SECRET,
        "BENCH_DESTINATIONS": ",".join(destinations),
        "BENCH_REDIS_URL": REDIS_URL,
        "BENCH_REDIS_PREFIX": REDIS_PREFIX,
    }


def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL)


def queue_length() -> int:
    return int(redis_client().llen(REDIS_PREFIX + QUEUE))


def clear_redis() -> int:
    """Delete the baseline's keys (only those under its prefix, in its database)."""
    client = redis_client()
    keys = list(client.scan_iter(match=REDIS_PREFIX + "*", count=1000))
    keys += list(client.scan_iter(match="_kombu.binding.*" + QUEUE + "*", count=1000))
    for start_at in range(0, len(keys), 1000):
        client.delete(*keys[start_at : start_at + 1000])
    return len(keys)


def start_web(destinations: list[str], logdir: Path) -> tuple[Proc, int]:
    port = free_port()
    web = start(
        "baseline-fastapi",
        [
            str(BIN / "uvicorn"),
            "app:app",
            "--app-dir",
            str(BASELINE_DIR),
            "--http",
            "httptools",
            "--loop",
            "uvloop",
            "--no-access-log",
            "--log-level",
            "warning",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cpu=SERVER_CPU,
        logdir=logdir,
        env=_env(destinations),
    )
    wait_port(port, proc=web.popen)
    return web, port


def start_worker(destinations: list[str], logdir: Path) -> Proc:
    return start(
        "baseline-celery",
        [
            str(BIN / "celery"),
            "--workdir",
            str(BASELINE_DIR),
            "-A",
            "tasks",
            "worker",
            "-Q",
            QUEUE,
            "--pool",
            "prefork",
            "--concurrency",
            str(CELERY_CONCURRENCY),
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cpu=SERVER_CPU,
        logdir=logdir,
        env=_env(destinations),
    )


@contextmanager
def baseline_system(
    sink_url: str, fanout: int, workdir: Path, logdir: Path
) -> Iterator[tuple[list[Proc], int, str]]:
    """FastAPI + a Celery worker, both on the server core, delivering to the sink."""
    destinations = [f"{sink_url}/hooks/sink{n}" for n in range(1, fanout + 1)]
    clear_redis()
    web, port = start_web(destinations, logdir)
    worker = start_worker(destinations, logdir)
    try:
        with running([web, worker]):
            yield [web, worker], port, PATH
    finally:
        clear_redis()
