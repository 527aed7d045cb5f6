"""Instructions per request or per delivery under callgrind: a repeatable measure of CPU work.

Throughput and even CPU time on a shared virtual machine vary by ±30 % within an hour;
instruction counts do not (±0.5 % between runs of the same code here). Use this to judge a
change of a few per cent to a hot path before running the whole benchmark:

    python bench/instructions.py handler   # the ingest handler, store stubbed: per request
    python bench/instructions.py worker    # a Worker draining PostgreSQL to the sink: per delivery
    python bench/instructions.py client    # the bare delivery client (HttpConnector): per request
    python bench/instructions.py e2e       # `serve`'s path: webhook → commit → hand-over → sink
                                           #   (`--fanout N` destinations, 3 by default)

Each case runs twice under `valgrind --tool=callgrind` (N and 3N items; `--n` sets N) and
the difference of the two totals ÷ 2N is printed, so start-up and imports cancel out. Only
the Python process is counted: not the sink, not PostgreSQL. Under valgrind the process runs
~50× slower, so the worker's leases and completions come in full batches: the figure is the
per-delivery work at its best batching, not a latency. Every case runs with the garbage
collector tuned as estafeta's processes tune it (`server.tune_garbage_collector`).
Needs valgrind (Debian: `valgrind`).
A case takes 1–3 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import itertools
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ceiling import client_sends
from common import (
    APP_SECRET,
    PYTHON,
    canonical_event,
    database_of,
    estafeta_config,
    pg_connect,
    pg_drop,
    pg_fresh,
    running,
    start_sink,
    wamid,
    whatsapp_body,
)

if TYPE_CHECKING:
    from estafeta.config import Config
    from estafeta.store.sqlstore import SqlStore

CASES = ("handler", "worker", "client", "e2e")


# -- the cases, each run inside valgrind --------------------------------------------------------


async def handler_case(n: int, workdir: Path) -> None:
    """`n` signed WhatsApp webhooks through the ingest ASGI app; the commit answers at once."""
    from estafeta.config import load_config
    from estafeta.hub import Hub
    from estafeta.ingress.endpoint import IngestApp
    from estafeta.store import open_store
    from estafeta.store.records import InsertResult, NewEvent

    config = load_config(
        estafeta_config(
            workdir / "handler.toml",
            port=1,
            db_url=f"sqlite:///{workdir / 'handler.db'}",
            sink_url="http://127.0.0.1:9",
            spool_dir=workdir / "spool",
        )
    )
    hub = Hub(config, open_store(config.storage.url))

    async def committed(events: Sequence[NewEvent]) -> list[InsertResult]:
        return [InsertResult(e.id, duplicate=False) for e in events]

    hub._ingest.submit = committed  # type: ignore[method-assign,assignment]
    app = IngestApp(hub)
    answers: list[int] = []

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            answers.append(int(str(message["status"])))

    for scope, body in signed_requests(n):
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive(pending: list[dict[str, object]] = messages) -> dict[str, object]:
            return pending.pop()

        await app(scope, receive, send)  # type: ignore[arg-type]
    if answers.count(200) != n:
        raise RuntimeError(f"expected {n} answers 200, got {sorted(set(answers))}")


@contextlib.asynccontextmanager
async def sink_and_store(
    workdir: Path, name: str, *, fanout: int = 1
) -> AsyncIterator[tuple[Config, SqlStore, str]]:
    """The sink, a fresh PostgreSQL database and a prepared store on it configured with
    `fanout` sink destinations: (configuration, store, database URL); all gone after."""
    from estafeta.config import load_config
    from estafeta.server import prepared_store

    sink, _port, sink_url = start_sink(workdir, cpu=None)
    db_url = pg_fresh("instructions")
    try:
        with running([sink]):
            config = load_config(
                estafeta_config(
                    workdir / f"{name}.toml",
                    port=1,
                    db_url=db_url,
                    sink_url=sink_url,
                    fanout=fanout,
                    spool_dir=workdir / "spool",
                )
            )
            store = await prepared_store(config)
            try:
                yield config, store, db_url
            finally:
                await store.close()
    finally:
        pg_drop(db_url)


async def worker_case(n: int, workdir: Path) -> None:
    """A Worker delivering `n` pending deliveries from a fresh PostgreSQL database to the sink."""
    from estafeta.delivery.worker import Worker

    async with sink_and_store(workdir, "worker") as (config, store, db_url):
        _backlog(db_url, n)
        worker = Worker(store, config)
        stop = asyncio.Event()
        task = asyncio.ensure_future(worker.run(stop))
        while worker.sent < n:
            await asyncio.sleep(0.05)
        stop.set()
        await task


def _backlog(db_url: str, n: int) -> None:
    """`n` events of the canonical size with one pending delivery each to `sink1`."""
    conn = pg_connect(database_of(db_url))
    payload = canonical_event("instructions", 1).decode()
    try:
        with conn.cursor() as cur:
            cur.execute(
                """
                INSERT INTO events (id, tenant_id, source_id, type, idempotency_key,
                                    occurred_at, received_at, payload)
                SELECT 'evt_' || lpad(g::text, 26, '0'), 'bench', 'wa', 'message.received',
                       'wamid.instructions.' || g, 1, 1, %(payload)s
                FROM generate_series(1, %(n)s) AS g
                """,
                {"payload": payload, "n": n},
            )
            cur.execute(
                """
                INSERT INTO deliveries (id, tenant_id, event_id, destination_id, state,
                                        priority, attempts, max_attempts, next_attempt_at,
                                        replays, created_at, updated_at)
                SELECT 'dlv_' || lpad(g::text, 26, '0'), 'bench',
                       'evt_' || lpad(g::text, 26, '0'), 'sink1', 'pending', 1, 0, 8, g, 0, 1, 1
                FROM generate_series(1, %(n)s) AS g
                """,
                {"n": n},
            )
    finally:
        conn.close()


async def e2e_case(n: int, workdir: Path, fanout: int = 3) -> None:
    """`n` signed webhooks, 32 at a time, through the ingest app to a hub on a fresh
    PostgreSQL database whose in-process worker (hand-over wired as `serve` wires it) sends
    each to `fanout` sink destinations: per webhook, everything `serve` does for it but
    HTTP."""
    from estafeta.delivery.breakers import Breakers
    from estafeta.delivery.worker import Worker
    from estafeta.hub import Hub
    from estafeta.ingress.endpoint import IngestApp

    answers: list[int] = []
    async with sink_and_store(workdir, "e2e", fanout=fanout) as (config, store, _db_url):
        hub = Hub(config, store)
        worker = Worker(
            store,
            config,
            clock=hub.clock,
            wake=hub.deliveries_ready,
            handoff=hub.handoff,
            breakers=Breakers(hub.circuit_states, config),
        )
        stop = asyncio.Event()
        running_worker = asyncio.ensure_future(worker.run(stop))
        app = IngestApp(hub)
        requests = signed_requests(n)

        async def post(scope: dict[str, object], body: bytes) -> None:
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict[str, object]:
                return messages.pop()

            async def send(message: dict[str, object]) -> None:
                if message["type"] == "http.response.start":
                    answers.append(int(str(message["status"])))

            await app(scope, receive, send)  # type: ignore[arg-type]

        while together := list(itertools.islice(requests, 32)):
            await asyncio.gather(*(post(scope, body) for scope, body in together))
        while worker.sent < n * fanout:
            await asyncio.sleep(0.05)
        stop.set()
        await running_worker
        await hub.close()
    if answers.count(200) != n:
        raise RuntimeError(f"expected {n} answers 200, got {sorted(set(answers))}")


def signed_requests(n: int) -> Iterator[tuple[dict[str, object], bytes]]:
    """`n` (ASGI scope, body) pairs: distinct WhatsApp Cloud webhooks, each signed, made as
    they are taken. Each body is the template with its own message id (the same length),
    signed by one C call: making the bodies with json.dumps, as common.whatsapp_body does,
    cost ~9 µs per request, a third of what the handler itself does."""
    template = whatsapp_body("instructions", 0)
    first_id = wamid("instructions", 0).encode()
    key = APP_SECRET.encode()
    for i in range(n):
        body = template.replace(first_id, wamid("instructions", i).encode())
        headers = [
            (b"host", b"127.0.0.1:8080"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-hub-signature-256", b"sha256=" + hmac.digest(key, body, "sha256").hex().encode()),
        ]
        scope: dict[str, object] = {
            "type": "http",
            "method": "POST",
            "path": "/in/wa",
            "raw_path": b"/in/wa",
            "query_string": b"",
            "headers": headers,
            "scheme": "http",
        }
        yield scope, body


async def client_case(n: int, workdir: Path) -> None:
    """`n` signed deliveries by HttpConnector.deliver, 64 at a time, to the sink: the
    delivery-client ceiling's own loop (bench/ceiling.py), stopped by count."""
    sink, _port, sink_url = start_sink(workdir, cpu=None)
    with running([sink]):
        result = await client_sends(f"{sink_url}/hooks/client", 64, count=n)
    if result["ok"] != n:
        raise RuntimeError(f"the sink did not take every delivery: {result['outcomes']}")


# -- the measurement ---------------------------------------------------------------------------


def instructions(case: str, n: int, workdir: Path, fanout: int) -> int:
    """Instructions the Python process ran for the case with `n` items (valgrind's total)."""
    out = workdir / f"callgrind-{case}-{n}.out"
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            PYTHON,
            __file__,
            "--run",
            case,
            "--n",
            str(n),
            "--workdir",
            str(workdir),
            "--fanout",
            str(fanout),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Collected\s*:\s*([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{case} under valgrind failed:\n{done.stderr[-3000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("case", nargs="?", choices=CASES)
    parser.add_argument("--n", type=int, default=1000, help="items in the smaller run")
    parser.add_argument("--run", choices=CASES, help=argparse.SUPPRESS)  # inside valgrind
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--fanout", type=int, default=3, help="e2e: destinations per webhook")
    args = parser.parse_args()
    if args.run:
        import uvloop

        from estafeta.server import tune_garbage_collector

        # The collector settings of estafeta's own processes (`estafeta serve` and `worker`):
        # with Python's defaults the worker spent ~45 µs more per delivery collecting garbage.
        tune_garbage_collector()
        cases = {
            "handler": handler_case,
            "worker": worker_case,
            "client": client_case,
            "e2e": functools.partial(e2e_case, fanout=args.fanout),
        }
        uvloop.run(cases[args.run](args.n, args.workdir))
        return
    if args.case is None:
        parser.error("name a case: " + ", ".join(CASES))
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed: apt-get install -y valgrind")
    workdir = Path(tempfile.mkdtemp(prefix="estafeta-instructions-"))
    try:
        began = time.monotonic()
        small = instructions(args.case, args.n, workdir, args.fanout)
        large = instructions(args.case, 3 * args.n, workdir, args.fanout)
        per_item = (large - small) / (2 * args.n)
        per_webhook = f"webhook ({args.fanout} deliver{'y' if args.fanout == 1 else 'ies'})"
        unit = {"worker": "delivery", "e2e": per_webhook}.get(args.case, "request")
        print(
            f"{args.case}: {per_item:,.0f} instructions per {unit} "
            f"({small:,} for {args.n}, {large:,} for {3 * args.n}; "
            f"{time.monotonic() - began:.0f} s)"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
