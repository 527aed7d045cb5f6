"""Phase 1, the ceilings, measured in the same run as everything else.

* **bare HTTP**: wrk against `trivial_app.py` served exactly as estafeta is (uvicorn +
  httptools + uvloop, one process on the server core), with the same pre-signed 0.7 KB
  WhatsApp bodies; the answer is a small JSON 202 and nothing else happens.
* **Starlette route**: the same, served by a one-route Starlette app; the issue's reference
  ceiling, shown beside the raw one for context (the targets are judged on the raw one).
* **delivery client**: estafeta's own `HttpConnector` (the pooled aiohttp session, Standard
  Webhooks signing, the response excerpt) POSTing canonical events to the sink alone, with
  the worker's default concurrency (64), on the server core; the sink runs on the load core.

    python bench/ceiling.py client --url URL --seconds S [--concurrency N]

is the delivery-client half as a process (it prints `BENCH_JSON {...}`).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from common import (
    BENCH_DIR,
    BIN,
    OUT_SECRET,
    PYTHON,
    SERVER_CPU,
    CpuMeter,
    canonical_event,
    emit,
    free_port,
    per_event,
    percentiles,
    run_json,
    running,
    sink_reset,
    sink_stats,
    start,
    start_sink,
    wait_port,
)
from wrk import wrk

APPS = {
    "asgi": ("trivial_app:app", "trivial ASGI app"),
    "starlette": ("trivial_app:starlette_app", "trivial Starlette route"),
}


# A ceiling is the most the machine does: each is measured this many times and the best run
# kept (all runs are recorded). On a shared host one run can lose part of its core to a
# neighbour; a low ceiling would flatter every ratio divided by it, a high one cannot.
CEILING_RUNS = 3


def best_of(runs: list[dict[str, Any]], *key: str) -> dict[str, Any]:
    """The run with the highest value at `key` (a path into each run's dict), carrying every
    run's value as `runs`."""

    def rate(run: dict[str, Any]) -> float:
        value: Any = run
        for part in key:
            value = value.get(part) if isinstance(value, dict) else None
        return float(value or 0.0)

    return {**max(runs, key=rate), "runs": [rate(run) for run in runs]}


def bare_http(
    requests_file: Path, *, seconds: float, logdir: Path, app: str = "asgi"
) -> dict[str, Any]:
    """wrk against a trivial app (see trivial_app.py): the raw ASGI one is the most any ASGI
    ingest can do on one core here; the Starlette one is the issue's reference ceiling. The
    best of CEILING_RUNS runs on one server."""
    target, described = APPS[app]
    port = free_port()
    server = start(
        f"trivial-uvicorn-{app}",
        [
            str(BIN / "uvicorn"),
            target,
            "--app-dir",
            str(BENCH_DIR),
            "--http",
            "estafeta.http_protocol:OneWriteHttpToolsProtocol",  # as estafeta serves
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
    )
    runs = []
    with running([server]):
        wait_port(port, proc=server.popen)
        for _ in range(CEILING_RUNS):
            meter = CpuMeter({"server": server.pid})
            run = wrk(port, "/in/wa", requests_file, seconds=seconds)
            run["cpu_cores"] = meter.cores()
            run["server_cpu_us_per_request"] = per_event(run["cpu_cores"], "server", run["rps"])
            runs.append(run)
    result = best_of(runs, "rps")
    result["server"] = f"uvicorn + httptools + uvloop, 1 process, {described}"
    return result


def delivery_client(*, seconds: float, logdir: Path, concurrency: int = 64) -> dict[str, Any]:
    """estafeta's HTTP connector against the sink alone: the best of CEILING_RUNS runs."""
    sink, sink_port, sink_url = start_sink(logdir)
    runs = []
    with running([sink]):
        for _ in range(CEILING_RUNS):
            runs.append(_client_run(sink_port, sink_url, seconds, concurrency))
    return best_of(runs, "rps")


def _client_run(sink_port: int, sink_url: str, seconds: float, concurrency: int) -> dict[str, Any]:
    """One run of the client process (pinned to the server core) against the sink."""
    sink_reset(sink_port)
    result = run_json(
        [
            PYTHON,
            str(BENCH_DIR / "ceiling.py"),
            "client",
            "--url",
            f"{sink_url}/hooks/ceiling",
            "--seconds",
            str(seconds),
            "--concurrency",
            str(concurrency),
        ],
        cpu=SERVER_CPU,
        timeout_s=seconds + 60,
    )
    result["sink_received"] = sink_stats(sink_port)["count"]
    return result


# -- the client process ------------------------------------------------------------------------


async def client_sends(
    url: str, concurrency: int, *, seconds: float | None = None, count: int | None = None
) -> dict[str, Any]:
    """`concurrency` loops of HttpConnector.deliver to `url`, for `seconds` or until `count`
    deliveries were sent (bench/instructions.py counts the instructions of a fixed number)."""
    from estafeta.connectors.http import HttpConnector, new_client_session
    from estafeta.delivery.model import LeasedDelivery

    # A canonical event as the hub stores it: the same size as the end-to-end phase's.
    payload = canonical_event("ceil", 1)
    session = new_client_session()
    connector = HttpConnector(url=url, secret=OUT_SECRET, timeout_s=10, session=session)
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    stop_at = time.perf_counter() + (seconds if seconds is not None else float("inf"))
    last = count if count is not None else float("inf")
    counter = 0

    async def loop() -> None:
        nonlocal counter
        while counter < last and time.perf_counter() < stop_at:
            counter += 1
            delivery = LeasedDelivery(
                id=f"dlv_{counter:026d}",
                tenant_id="bench",
                event_id=f"evt_{counter:026d}",
                destination_id="ceiling",
                attempts=0,
                max_attempts=8,
                priority=1,
                ordering_key=None,
                lease_token="t",  # noqa: S106 - not a secret
                lease_expires_at=0,
                payload=payload,
            )
            started = time.perf_counter()
            outcome = await connector.deliver(delivery)
            latencies.append((time.perf_counter() - started) * 1000)
            outcomes[outcome.kind.value] = outcomes.get(outcome.kind.value, 0) + 1

    began = time.perf_counter()
    cpu_began = time.process_time()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu_began
    await session.close()
    ok = outcomes.get("success", 0)
    return {
        "tool": f"estafeta HttpConnector.deliver, {concurrency} concurrent, signed, on uvloop",
        "concurrency": concurrency,
        "duration_s": elapsed,
        "ok": ok,
        "rps": ok / elapsed,
        "own_cores": round(cpu / elapsed, 3),
        "client_cpu_us_per_request": round(cpu * 1e6 / ok, 1) if ok else None,
        "outcomes": outcomes,
        "latency_ms": percentiles(latencies, (50, 99, 99.9)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    client = sub.add_parser("client")
    client.add_argument("--url", required=True)
    client.add_argument("--seconds", type=float, default=10)
    client.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    import uvloop

    emit(uvloop.run(client_sends(args.url, args.concurrency, seconds=args.seconds)))


if __name__ == "__main__":
    main()
