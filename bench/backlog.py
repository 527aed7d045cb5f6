"""Phase 4, backlog: the lease and the worker with 10,000 and with 1,000,000 pending deliveries.

A fresh PostgreSQL database migrated by `estafeta migrate`; pending deliveries (each with its
event and a 0.7 KB canonical payload) are inserted in bulk with `generate_series`. At each
size (10,000 first, then grown to 1,000,000):

* **lease latency**: `SqlStore.lease` of 100 timed in a process of its own on the server
  core (5 warm-up leases, then 40 measured); the leased rows are put back to `pending`;
* **drain**: `estafeta worker` on the server core delivering to the sink: deliveries/s
  (from the first arrival), and the worker's peak RSS (psutil, sampled every 0.1 s).

    python bench/backlog.py lease --url postgresql://… [--n 40] [--warmup 5]

is the lease half as a process (it prints `BENCH_JSON {...}`).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from common import (
    BENCH_DIR,
    PYTHON,
    SERVER_CPU,
    CpuMeter,
    canonical_event,
    database_of,
    emit,
    estafeta_cmd,
    estafeta_config,
    free_port,
    percentiles,
    pg_connect,
    pg_drop,
    pg_fresh,
    run_json,
    running,
    sample_rss,
    sink_reset,
    sink_stats,
    start,
    start_sink,
)

_DESTINATION = "sink1"


def insert_pending(database_url: str, first: int, last: int) -> float:
    """Events first..last, one pending delivery each, due now; seconds it took."""
    template = canonical_event("backlog", 0).decode()
    template = template.replace("evt_01JD" + "0" * 22, "@EVT@")
    now = int(time.time() * 1000)
    conn = pg_connect(database_of(database_url))
    began = time.monotonic()
    try:
        with conn.cursor() as cur:
            cur.execute("SET synchronous_commit = off")
            cur.execute(
                """
                INSERT INTO events (id, tenant_id, source_id, type, idempotency_key,
                                    occurred_at, received_at, payload)
                SELECT 'evt_' || lpad(g::text, 26, '0'), 'bench', 'wa', 'message.received',
                       'wamid.backlog.' || g, %(now)s - 60000, %(now)s - 60000,
                       replace(%(template)s, '@EVT@', 'evt_' || lpad(g::text, 26, '0'))
                FROM generate_series(%(first)s, %(last)s) AS g
                """,
                {"now": now, "template": template, "first": first, "last": last},
            )
            cur.execute(
                """
                INSERT INTO deliveries (id, tenant_id, event_id, destination_id, state,
                                        priority, attempts, max_attempts, next_attempt_at,
                                        replays, created_at, updated_at)
                SELECT 'dlv_' || lpad(g::text, 26, '0'), 'bench',
                       'evt_' || lpad(g::text, 26, '0'), %(destination)s, 'pending', 1, 0, 8,
                       %(now)s - 60000 + g / 1000, 0, %(now)s - 60000, %(now)s - 60000
                FROM generate_series(%(first)s, %(last)s) AS g
                """,
                {"now": now, "first": first, "last": last, "destination": _DESTINATION},
            )
            cur.execute("VACUUM ANALYZE events")
            cur.execute("VACUUM ANALYZE deliveries")
    finally:
        conn.close()
    return time.monotonic() - began


def pending(database_url: str) -> dict[str, int]:
    conn = pg_connect(database_of(database_url))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT state, count(*) FROM deliveries GROUP BY state")
            return {state: int(n) for state, n in cur.fetchall()}
    finally:
        conn.close()


def put_back(database_url: str) -> None:
    """Leased rows back to pending (the lease measurement must not shrink the backlog)."""
    conn = pg_connect(database_of(database_url))
    try:
        with conn.cursor() as cur:
            cur.execute(
                "UPDATE deliveries SET state = 'pending', lease_token = NULL,"
                " lease_expires_at = NULL, leased_by = NULL WHERE state = 'in_flight'"
            )
            cur.execute("VACUUM ANALYZE deliveries")
    finally:
        conn.close()


def lease_latency(database_url: str, *, n: int = 40, warmup: int = 5) -> dict[str, Any]:
    result = run_json(
        [
            PYTHON,
            str(BENCH_DIR / "backlog.py"),
            "lease",
            "--url",
            database_url,
            "--n",
            str(n),
            "--warmup",
            str(warmup),
        ],
        cpu=SERVER_CPU,
        timeout_s=300,
    )
    put_back(database_url)
    return result


def drain(
    config: Path,
    sink_port: int,
    *,
    logdir: Path,
    name: str,
    until: int | None,
    seconds: float,
) -> dict[str, Any]:
    """Run `estafeta worker` until `until` deliveries arrived or `seconds` after the first."""
    sink_reset(sink_port)
    worker = start(
        f"estafeta-worker-{name}",
        estafeta_cmd("worker", "--config", str(config)),
        cpu=SERVER_CPU,
        logdir=logdir,
    )
    peak = 0
    samples = 0
    began = time.monotonic()
    first_at: float | None = None
    meter: CpuMeter | None = None
    stats: dict[str, Any] = {}
    with running([worker]):
        while True:
            rss = sample_rss(worker.pid)
            peak = max(peak, rss)
            samples += 1
            now = time.monotonic()
            if samples % 5 == 0 or first_at is None:
                stats = sink_stats(sink_port)
                if first_at is None and stats["count"]:
                    first_at = now
                    meter = CpuMeter({"worker": worker.pid})
                if until is not None and stats["unique"] >= until:
                    break
            if first_at is not None and now - first_at >= seconds:
                break
            if now - began > seconds + 120 or worker.popen.poll() is not None:
                break
            time.sleep(0.1)
        stats = sink_stats(sink_port)
        cores = meter.cores() if meter else {}
        ended_ns = stats["last_ns"] if until is not None else time.time_ns()
    elapsed = max(1e-9, (ended_ns - stats["first_ns"]) / 1e9) if stats["first_ns"] else 0.0
    return {
        "delivered": stats["unique"],
        "elapsed_s": elapsed,
        "deliveries_per_s": stats["unique"] / elapsed if elapsed else 0.0,
        "peak_rss_mb": peak / 2**20,
        "rss_samples": samples,
        "startup_s": (first_at - began) if first_at is not None else None,
        "cpu_cores": cores,
        "worker_exit": worker.popen.returncode,
    }


def backlog(
    *, small: int, large: int, seconds: float, workdir: Path, logdir: Path
) -> dict[str, Any]:
    """See the module docstring."""
    database_url = pg_fresh("backlog")
    sink, sink_port, sink_url = start_sink(logdir)
    result: dict[str, Any] = {"small": small, "large": large}
    try:
        with running([sink]):
            config = estafeta_config(
                workdir / "backlog.toml",
                port=free_port(),
                db_url=database_url,
                sink_url=sink_url,
                spool_dir=workdir / "spool-backlog",
            )
            migrate = start(
                "estafeta-migrate",
                estafeta_cmd("migrate", "--config", str(config)),
                cpu=SERVER_CPU,
                logdir=logdir,
            )
            if migrate.popen.wait(120) != 0:
                raise RuntimeError(f"estafeta migrate failed:\n{migrate.tail()}")

            result["insert_small_s"] = insert_pending(database_url, 1, small)
            result["states_small"] = pending(database_url)
            result["lease_small"] = lease_latency(database_url)
            result["drain_small"] = drain(
                config, sink_port, logdir=logdir, name="small", until=small, seconds=120
            )

            # The small backlog was delivered: add `large` pending ones (ids after it).
            result["insert_large_s"] = insert_pending(database_url, small + 1, small + large)
            result["states_large"] = pending(database_url)
            result["lease_large"] = lease_latency(database_url)
            result["drain_large"] = drain(
                config, sink_port, logdir=logdir, name="large", until=None, seconds=seconds
            )
    finally:
        pg_drop(database_url)
    return result


# -- the lease process -------------------------------------------------------------------------


async def _lease(url: str, n: int, warmup: int) -> dict[str, Any]:
    from estafeta.store import open_store

    store = open_store(url)
    timings: list[float] = []
    leased = 0
    try:
        for i in range(warmup + n):
            started = time.perf_counter()
            batch = await store.lease(
                now_ms=int(time.time() * 1000),
                rooms={_DESTINATION: 100},
                lease_ms=60_000,
                worker_id="bench",
            )
            took = (time.perf_counter() - started) * 1000
            if i >= warmup:
                timings.append(took)
                leased += len(batch)
    finally:
        await store.close()
    return {
        "n": n,
        "batch": 100,
        "leased_per_call": leased / n if n else 0,
        "mean_ms": sum(timings) / len(timings),
        **{f"{k}_ms": v for k, v in percentiles(timings, (50, 90, 99)).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lease = sub.add_parser("lease")
    lease.add_argument("--url", required=True)
    lease.add_argument("--n", type=int, default=40)
    lease.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    emit(asyncio.run(_lease(args.url, args.n, args.warmup)))


if __name__ == "__main__":
    main()
