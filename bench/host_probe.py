"""How much slower the same Python work runs on this host after its core has idled.

    python bench/host_probe.py [--rounds N]

On the shared virtual machines this benchmark runs on, a core that idles even a millisecond
comes back cold (its caches and branch predictors hold other work by then): measured here,
parsing, signing and re-encoding one webhook body took ~19 µs back to back, ~35 µs after
0.5 ms of idle, ~66 µs after 2 ms, ~200 µs after 10 ms. A server at half load idles between
bursts, so its CPU per event and its latency tail depend on this as much as on its code. The
orchestrator runs this on the server core before and after the phases and the report prints
it beside the figures. Prints `BENCH_JSON {...}`: the median microseconds of the work warm and
after each idle gap, and the slowdowns.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=600)
    emit(probe(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
