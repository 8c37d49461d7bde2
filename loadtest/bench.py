"""Side by side, in one run: direct to the receiver, a plain aiohttp forwarder, and splitter.

Same bodies (batches of 50 events, ~34 KB, varied users), same count-only receivers, same wrk
load; the proxy under test pinned to core 1, wrk and receivers on core 0 where `taskset` allows.
For each: requests/s and events/s at saturation, CPU seconds of the proxy process per event (from
/proc), and a delivery check. Bounded: `--seconds` per scenario. Run: `python -m loadtest.bench`.
(nginx baselines, single calls and open-loop latency are still to come: see the performance issue.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtest.bench_delivery import BATCH, CONNECTIONS, RULES, delivered_exactly, drained, prepare_load
from loadtest.harness import PROXY_CORE, cpu_seconds, pin, pinning_available, rss_mb, run_wrk
from loadtest.process import launch_splitter


def start_forwarder(upstream: str) -> tuple[subprocess.Popen[bytes], str]:
    process = subprocess.Popen([*pin(PROXY_CORE), sys.executable, "-m", "loadtest.baselines.forwarder", "--upstream", upstream],
                               stdout=subprocess.PIPE)
    assert process.stdout is not None
    return process, json.loads(process.stdout.readline())["url"]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    receivers, env, bodies, auth = prepare_load()
    rows: dict[str, dict[str, Any]] = {}
    ok = True
    try:
        # 1. direct to the receiver: the floor (no proxy process to measure)
        direct = run_wrk(receivers.segment, "/v1/batch", bodies, auth, seconds=args.seconds, connections=CONNECTIONS)
        segment = await receivers.stats("segment")
        rows["direct"] = {"events_per_s": round(direct.ok * BATCH / direct.seconds), "cpu_us_per_event": None,
                          "delivered": segment["count"] >= direct.ok * BATCH}
        await receivers.reset()
        # 2. the plain forwarder: parse + hash + forward unchanged, no durability
        forwarder, url = start_forwarder(receivers.segment)
        try:
            before = cpu_seconds([forwarder.pid])
            run = run_wrk(url, "/v1/batch", bodies, auth, seconds=args.seconds, connections=CONNECTIONS)
            cpu = cpu_seconds([forwarder.pid]) - before
            segment = await receivers.stats("segment")
            rows["aiohttp forwarder"] = {"events_per_s": round(run.ok * BATCH / run.seconds), "cpu_us_per_event": round(1e6 * cpu / (run.ok * BATCH), 2),
                                         "rss_mb": round(rss_mb(forwarder.pid), 1), "delivered": segment["count"] >= run.ok * BATCH}
        finally:
            forwarder.terminate()
            forwarder.wait(10)
        await receivers.reset()
        # 3. splitter: 10 rules, 30 % split with a mirror, per-destination credentials, durable spool
        splitter = await launch_splitter(str(RULES), env, prefix=pin(PROXY_CORE))
        try:
            run_wrk(splitter.ingress, "/v1/batch", bodies, auth, seconds=2, connections=CONNECTIONS)  # warm-up
            await drained(splitter.admin, 30)
            await receivers.reset()
            before = cpu_seconds([splitter.process.pid])
            run = run_wrk(splitter.ingress, "/v1/batch", bodies, auth, seconds=args.seconds, connections=CONNECTIONS)
            cpu = cpu_seconds([splitter.process.pid]) - before
            await drained(splitter.admin, 60)
            segment, rudder = await receivers.stats("segment"), await receivers.stats("rudderstack")
            delivered = delivered_exactly(segment["count"], rudder["count"], run.ok)
            rows["splitter"] = {"events_per_s": round(run.ok * BATCH / run.seconds), "cpu_us_per_event": round(1e6 * cpu / (run.ok * BATCH), 2),
                                "rss_mb": round(rss_mb(splitter.process.pid), 1), "delivered": delivered}
        finally:
            await splitter.stop()
    finally:
        receivers.stop()
    ok = all(row["delivered"] for row in rows.values())
    pinned = f"proxies on core {PROXY_CORE}, wrk and receivers on the other" if pinning_available() else "not pinned"
    print(f"batches of {BATCH} events, {args.seconds:g} s each, {CONNECTIONS} connections, {pinned}")
    print(f"{'scenario':<20}{'events/s':>10}{'CPU µs/event':>14}{'RSS MB':>8}  delivered")
    for name, row in rows.items():
        print(f"{name:<20}{row['events_per_s']:>10}{row['cpu_us_per_event']!s:>14}{row.get('rss_mb', '-')!s:>8}  {'yes' if row['delivered'] else 'NO'}")
    if rows.get("splitter", {}).get("cpu_us_per_event") and rows.get("aiohttp forwarder", {}).get("cpu_us_per_event"):
        ratio = rows["splitter"]["cpu_us_per_event"] / rows["aiohttp forwarder"]["cpu_us_per_event"]
        print(f"splitter uses {ratio:.2f}x the plain forwarder's CPU per event (target: 1.8x better, i.e. at most {1 / 1.8:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
