"""What the delivery ledger costs per event, in process, with and without it, in one run.

The ledger's work is on the delivery side of a request: the records' tags and the accepted counts
when `Delivery.accept` writes them, and what becomes of them when the senders deliver them. This
times that whole path for `bench_delivery`'s batches (50 events, the 30 % split with a mirror):
each request is parsed and prepared, then accepted by a `Delivery` whose spool is on tmpfs
(/dev/shm, so the fsyncs cost nothing and do not blur the difference), and every round waits until
count-only receivers (another process, on the load core) have everything. Two deliveries take turns,
one without a ledger and one with it, on the proxy core; the CPU of this process per event is
reported for each (median and best of the rounds) and the difference.

`python -m loadtest.bench_ledger [--rounds 7] [--batches 600] [--json FILE]`. For an exact figure
that a busy machine does not move, count instructions of a real `serve` under callgrind instead
(docs/configuration.md, Delivery ledger: Cost).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from loadtest.bench_delivery import WRITE_KEY, prepare_load
from loadtest.floor import on_proxy_core
from loadtest.payloads import BATCH
from proxy.delivery import Delivery
from proxy.engine import EventContext, RuleSet
from proxy.ingress.prepare import CallShape, prepare
from proxy.metrics import Metrics
from proxy.observe.ledger_files import LedgerKeeper

CONCURRENCY = 32  # requests accepted at once, so group commits are shared as under load


async def one_round(delivery: Delivery, rules: RuleSet, bodies: list[bytes]) -> float:
    """CPU seconds to prepare, accept and deliver every body once."""
    source = rules.sources["web"]
    limit = asyncio.Semaphore(CONCURRENCY)

    async def accept(body: bytes) -> None:
        async with limit:
            submission = prepare(rules, orjson.loads(body), CallShape(True), source, EventContext("web"), "10.0.0.1",
                                 presented_key=WRITE_KEY).submission
            outcome = await delivery.accept(submission)
            assert outcome.ok, outcome

    gc.collect()
    started = time.process_time()
    await asyncio.gather(*(accept(body) for body in bodies))
    while delivery.pending:
        await asyncio.sleep(0.001)
    return time.process_time() - started


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    receivers, _, rules, bodies, _ = prepare_load(args.batches)
    scratch = Path(tempfile.mkdtemp(prefix="splitter-ledger-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        events = len(bodies) * BATCH
        deliveries = {
            "without": Delivery(Metrics(), spool_dir=scratch / "without" / "spool", dead_letter_dir=scratch / "without" / "dead"),
            "with": Delivery(Metrics(), spool_dir=scratch / "with" / "spool", dead_letter_dir=scratch / "with" / "dead",
                             ledger=LedgerKeeper(scratch / "with" / "state", None)),
        }
        for delivery in deliveries.values():
            delivery.start(rules)
        spent: dict[str, list[float]] = {name: [] for name in deliveries}
        with on_proxy_core():
            for delivery in deliveries.values():  # warm-up
                await one_round(delivery, rules, bodies[:50])
            for _ in range(args.rounds):
                for name, delivery in deliveries.items():
                    spent[name].append(1e6 * await one_round(delivery, rules, bodies) / events)
        for delivery in deliveries.values():
            await delivery.close(5)
    finally:
        receivers.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    results: dict[str, Any] = {name: {"median_us_per_event": round(statistics.median(v), 3), "best_us_per_event": round(min(v), 3)}
                               for name, v in spent.items()}
    results["ledger_us_per_event"] = {
        "median": round(results["with"]["median_us_per_event"] - results["without"]["median_us_per_event"], 3),
        "best": round(results["with"]["best_us_per_event"] - results["without"]["best_us_per_event"], 3),
    }
    print(f"delivery ledger: prepare + accept + deliver, {events} events x {args.rounds} rounds each, CPU µs per event")
    for name in deliveries:
        print(f"  {name + ' the ledger':<20} median {results[name]['median_us_per_event']:6.2f}   best {results[name]['best_us_per_event']:6.2f}")
    print(f"  the ledger's cost    median {results['ledger_us_per_event']['median']:+6.2f}   best {results['ledger_us_per_event']['best']:+6.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
