"""Phase 2, ingest: signed WhatsApp Cloud webhooks into `estafeta serve --no-workers`.

For each engine (PostgreSQL, SQLite), on a fresh database:

1. wrk at full speed for a fixed time (closed loop, 64 connections, pre-signed distinct
   messages); accepted events/s are counted in the database afterwards (`events` rows, i.e.
   durably committed), not from HTTP answers alone;
2. the open-loop generator (`loadgen.py`) at 50 % of that rate for the same time: p99 latency
   measured from when each request was due (wrk2-style).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from common import (
    BENCH_DIR,
    LOAD_CPU,
    PYTHON,
    SERVER_CPU,
    CpuMeter,
    estafeta_cmd,
    estafeta_config,
    free_port,
    per_event,
    pg_drop,
    pg_fresh,
    pg_scalar,
    post_signed,
    run_json,
    running,
    sample_rss,
    sqlite_scalar,
    start,
    wait_port,
    whatsapp_body,
)
from wrk import wrk


def open_loop(
    port: int,
    *,
    run: str,
    rate: float,
    seconds: float,
    path: str = "/in/wa",
    stamp: bool = False,
    connections: int = 64,
) -> dict[str, Any]:
    """`loadgen.py` at a constant `rate` for `seconds`, pinned to the load core."""
    count = int(rate * seconds * 1.05) + 100
    cmd = [
        PYTHON,
        str(BENCH_DIR / "loadgen.py"),
        "--port",
        str(port),
        "--path",
        path,
        "--run",
        run,
        "--count",
        str(count),
        "--rate",
        f"{rate:.1f}",
        "--seconds",
        str(seconds),
        "--connections",
        str(connections),
    ]
    if stamp:
        cmd.append("--stamp")
    return run_json(cmd, cpu=LOAD_CPU, timeout_s=seconds + 120)


def ingest(
    engine: str, requests_file: Path, *, seconds: float, workdir: Path, logdir: Path
) -> dict[str, Any]:
    """Full speed then half rate against one engine; see the module docstring."""
    if engine == "postgresql":
        db_url = pg_fresh("ingest")
        db_file = None
    else:
        db_file = workdir / "ingest.db"
        for stale in workdir.glob("ingest.db*"):
            stale.unlink()
        db_url = f"sqlite:///{db_file}"

    def events() -> int:
        query = "SELECT count(*) FROM events"
        if db_file is not None:
            return int(sqlite_scalar(db_file, query))
        return int(pg_scalar(db_url, query))

    port = free_port()
    config = estafeta_config(
        workdir / f"ingest-{engine}.toml",
        port=port,
        db_url=db_url,
        sink_url="http://127.0.0.1:9",  # never called: no workers in this phase
        spool_dir=workdir / f"spool-{engine}",
    )
    server = start(
        f"estafeta-serve-ingest-{engine}",
        estafeta_cmd("serve", "--config", str(config), "--no-workers"),
        cpu=SERVER_CPU,
        logdir=logdir,
    )
    result: dict[str, Any] = {"engine": engine, "server": "estafeta serve --no-workers"}
    try:
        with running([server]):
            wait_port(port, timeout_s=60, proc=server.popen)
            warm = post_signed(port, "/in/wa", whatsapp_body("warm", 0))
            if warm != 200:
                raise RuntimeError(f"a signed webhook was answered {warm}, not 200")
            before = events()
            meter = CpuMeter({"server": server.pid})
            full = wrk(port, "/in/wa", requests_file, seconds=seconds)
            full["cpu_cores"] = meter.cores()
            time.sleep(0.5)  # requests in flight when wrk stopped finish committing
            committed = events() - before
            full["committed"] = committed
            full["committed_per_s"] = committed / full["duration_s"]
            full["server_rss_mb"] = sample_rss(server.pid) / 2**20
            full["server_cpu_us_per_event"] = per_event(
                full["cpu_cores"], "server", full["committed_per_s"]
            )
            result["full"] = full

            rate = max(1.0, full["committed_per_s"] / 2)
            before = events()
            meter = CpuMeter({"server": server.pid})
            half = open_loop(port, run=f"half-{engine}", rate=rate, seconds=seconds)
            half["cpu_cores"] = meter.cores()
            time.sleep(0.5)
            half["committed"] = events() - before
            half["server_cpu_us_per_event"] = per_event(half["cpu_cores"], "server", half["rps"])
            result["half"] = half
        result["server_exit"] = server.popen.returncode
    finally:
        if db_file is None:
            pg_drop(db_url)
    return result


def baseline_ingest(requests_file: Path, *, seconds: float, logdir: Path) -> dict[str, Any]:
    """The FastAPI + Celery producer alone (no worker consumes): accepted = tasks in Redis."""
    from baseline.launch import PATH, clear_redis, queue_length, start_web

    clear_redis()
    web, port = start_web(["http://127.0.0.1:9/hooks/sink1"], logdir)
    result: dict[str, Any] = {"engine": "redis (celery broker)", "server": "uvicorn + FastAPI"}
    try:
        with running([web]):
            warm = post_signed(port, PATH, whatsapp_body("warm", 0))
            if warm != 200:
                raise RuntimeError(f"a signed webhook was answered {warm}, not 200")
            before = queue_length()
            meter = CpuMeter({"server": web.pid})
            full = wrk(port, PATH, requests_file, seconds=seconds)
            full["cpu_cores"] = meter.cores()
            time.sleep(0.5)
            full["committed"] = queue_length() - before
            full["committed_per_s"] = full["committed"] / full["duration_s"]
            full["server_cpu_us_per_event"] = per_event(
                full["cpu_cores"], "server", full["committed_per_s"]
            )
            result["full"] = full

            rate = max(1.0, full["committed_per_s"] / 2)
            before = queue_length()
            meter = CpuMeter({"server": web.pid})
            half = open_loop(port, run="half-baseline", rate=rate, seconds=seconds, path=PATH)
            half["cpu_cores"] = meter.cores()
            time.sleep(0.5)
            half["committed"] = queue_length() - before
            half["server_cpu_us_per_event"] = per_event(half["cpu_cores"], "server", half["rps"])
            result["half"] = half
    finally:
        clear_redis()
    return result
