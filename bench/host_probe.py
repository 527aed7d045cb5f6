"""How much slower the same Python work runs on this host after its core has idled, and how
long its disk takes to make a write durable.

    python bench/host_probe.py [--rounds N] [--fsync-seconds S]

On the shared virtual machines this benchmark runs on, a core that idles even a millisecond
comes back cold (its caches and branch predictors hold other work by then): measured here,
parsing, signing and re-encoding one webhook body took ~19 µs back to back, ~35 µs after
0.5 ms of idle, ~66 µs after 2 ms, ~200 µs after 10 ms. A server at half load idles between
bursts, so its CPU per event and its latency tail depend on this as much as on its code. The
orchestrator runs this on the server core before and after the phases and the report prints
it beside the figures.

Every durable commit waits for one `fdatasync`, so its slowest ones are the floor of the
ingest latency tail: on 2026-12-01 this disk answered in 0.3 ms at the median and 290 ms at
worst within ten seconds at rest, and PostgreSQL's flushes at half rate took up to 378 ms
with the queue of commits behind them (half-rate p99s of 100–360 ms, where the same code had
measured 7–15 ms hours before). The probe appends and fdatasyncs 8 KiB in a temporary file
for `--fsync-seconds` (the temporary directory is on the disk that holds PostgreSQL's data
here; on a machine where it is a tmpfs the figures mean nothing).

Prints `BENCH_JSON {...}`: the median microseconds of the work warm and after each idle gap,
the slowdowns, and the fdatasync latencies in ms (p50, p99, p99.9, max, how many over 50 ms).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import statistics
import tempfile
import time

from common import emit, whatsapp_body

IDLE_GAPS_S = (0.001, 0.005)


def probe(rounds: int) -> dict[str, float]:
    body = whatsapp_body("probe", 1)
    key = b"k" * 32

    def work() -> int:
        document = json.loads(body)
        hmac.new(key, body, hashlib.sha256).hexdigest()
        return len(json.dumps(document))

    def median_us(idle_s: float, times: int = rounds) -> float:
        took = []
        for _ in range(times):
            if idle_s:
                time.sleep(idle_s)
            began = time.perf_counter()
            work()
            took.append(time.perf_counter() - began)
        return round(statistics.median(took) * 1e6, 1)

    median_us(0.0)  # imports and first calls out of the way
    warm = median_us(0.0, rounds * 4)
    result: dict[str, float] = {"warm_us": warm}
    for gap in IDLE_GAPS_S:
        ms = f"{gap * 1000:g}ms"
        result[f"after_{ms}_idle_us"] = cold = median_us(gap)
        result[f"slowdown_{ms}"] = round(cold / warm, 2)
    return result


def fsync_probe(seconds: float) -> dict[str, float]:
    """fdatasync latencies of 8 KiB appends for `seconds` (ms), in a temporary directory."""
    took: list[float] = []
    with tempfile.TemporaryDirectory(prefix="estafeta-fsync-") as directory:
        fd = os.open(os.path.join(directory, "probe"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            stop = time.monotonic() + seconds
            while time.monotonic() < stop:
                os.write(fd, b"x" * 8192)
                began = time.perf_counter()
                os.fdatasync(fd)
                took.append((time.perf_counter() - began) * 1000)
        finally:
            os.close(fd)
    took.sort()
    n = len(took)
    return {
        "fsync_count": n,
        "fsync_p50_ms": round(took[n // 2], 3),
        "fsync_p99_ms": round(took[int(0.99 * n)], 3),
        "fsync_p999_ms": round(took[int(0.999 * n)], 3),
        "fsync_max_ms": round(took[-1], 1),
        "fsync_over_50ms": sum(1 for t in took if t > 50),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--fsync-seconds", type=float, default=5.0)
    args = parser.parse_args()
    result = probe(args.rounds)
    if args.fsync_seconds > 0:
        result |= fsync_probe(args.fsync_seconds)
    emit(result)


if __name__ == "__main__":
    main()
