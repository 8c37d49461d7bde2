"""The idle tax: the same request's work costs more CPU on a core that idles between requests.

Why splitter's latency targets, set "at 50 % of its own saturated rate", keep its core 70-85 % busy
on a VM instead of half: a batch took about 1.5 ms of CPU at saturation and 2.4 ms at half that rate.
This measures the effect apart from splitter's server, on the floor's own work (`loadtest.floor`'s
`prepare()`: parse, validate, route, encode, file; no I/O) on batch bodies like `make bench`'s, in
one thread pinned to the proxy core (where `taskset`-style pinning is available), CPU from that
thread's clock. First back to back, then with the thread asleep for a gap between calls, as
splitter's event loop waits in epoll between requests when the load leaves it room. The code and the
data are the same for every gap; what else the machine runs meanwhile is not (on a shared VM that is
part of what idling costs). Each round runs every gap, in an order rotated from round to round, and
each figure is the median of the rounds.

Run: `python -m loadtest.idle_tax [--calls N] [--rounds R] [--json PATH]` (about 25 s at the
defaults; `loadtest.bench` runs it with fewer calls).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest.bench_delivery import RULES, WRITE_KEY
from loadtest.floor import on_proxy_core, preparer
from loadtest.payloads import BATCH, batch_bodies, batch_payload
from proxy.engine import load_rules

GAPS_MS = (0.0, 0.5, 2.0, 10.0)
BODIES = 50
ENV = {"SEGMENT_URL": "http://127.0.0.1:9", "RUDDERSTACK_DATA_PLANE_URL": "http://127.0.0.1:9", "SPLITTER_WRITE_KEY": WRITE_KEY}


def batch_work() -> Callable[[int], None]:
    """One batch request's synchronous work, as the ingest handler does it, for body `i` (of `BODIES`, cycled)."""
    rules = load_rules(str(RULES), ENV)
    bodies = batch_bodies(rules, BODIES)
    prepare = preparer(rules, batch_payload(bodies))

    def work(i: int) -> None:
        prepare(bodies[i % len(bodies)])

    return work


def cpu_per_call(work: Callable[[int], None], calls: int, gap_s: float) -> float:
    """µs of this thread's CPU per call, with the thread asleep `gap_s` between calls (untimed)."""
    spent = 0.0
    for i in range(calls):
        started = time.thread_time()
        work(i)
        spent += time.thread_time() - started
        if gap_s:
            time.sleep(gap_s)
    return spent / calls * 1e6


def measure(calls: int, rounds: int, gaps_ms: tuple[float, ...] = GAPS_MS) -> dict[str, Any]:
    work = batch_work()
    samples: dict[float, list[float]] = {gap: [] for gap in gaps_ms}
    with on_proxy_core():  # a thread woken from its sleep stays on the proxy core
        cpu_per_call(work, calls, 0.0)  # warm-up: the routing memory, the allocator's arenas
        for round_ in range(rounds):
            for gap in gaps_ms[round_ % len(gaps_ms):] + gaps_ms[:round_ % len(gaps_ms)]:  # each gap first in turn
                samples[gap].append(cpu_per_call(work, calls, gap / 1000))
    medians = {gap: statistics.median(values) for gap, values in samples.items()}
    base = medians[gaps_ms[0]]
    return {
        "work": f"prepare() of a batch of {BATCH} events ({BODIES} bodies cycled)", "calls": calls, "rounds": rounds,
        "cpu_us_per_call": {f"{gap:g}": round(value, 1) for gap, value in medians.items()},
        "ratio_to_back_to_back": {f"{gap:g}": round(value / base, 2) for gap, value in medians.items()},
    }


def summary(result: dict[str, Any]) -> str:
    cells = [f"{value:,.0f} µs " + ("back to back" if gap == "0" else f"with {gap} ms idle between ({result['ratio_to_back_to_back'][gap]}×)")
             for gap, value in result["cpu_us_per_call"].items()]
    return f"idle tax (loadtest.idle_tax; CPU of one batch's prepare(), median of {result['rounds']} rounds): " + ", ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per gap and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every gap (odd: the median is one of them)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    result = measure(args.calls, args.rounds)
    print(summary(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
