"""Lossless delivery under load: throughput with a healthy upstream, and during an outage (spooling).

One bounded run: the proxy (pinned to core 1) on `rules/bench.yaml`, count-only receivers and wrk
(core 0), batches of 50 events (~30 KB). Phase 1 healthy; phase 2 with RudderStack down, so its
share is spooled and retried while clients keep getting 200; then recovery, and the time to drain
the backlog. Every phase checks that the receivers got exactly what the rules promise for the
requests answered 200. Run: `python -m loadtest.bench_delivery [--seconds 10] [--durability interval]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.harness import LOAD_CORE, PROXY_CORE, Receivers, cpu_seconds, pin, pinning_available, rss_mb, run_wrk, start_receivers
from loadtest.payloads import BATCH, batch_bodies, batch_payload, delivered
from loadtest.process import launch_splitter
from proxy.delivery.upstream import basic_auth
from proxy.engine import RuleSet, load_rules

RULES = Path(__file__).resolve().parent / "rules" / "bench.yaml"
WRITE_KEY = "bench-web-key"
CONNECTIONS = 32


async def metric_total(admin: str, name: str) -> float:
    """A labelled metric from splitter's /metrics, summed over its labels (e.g. over destinations)."""
    async with aiohttp.ClientSession() as client, client.get(admin + "/metrics") as response:
        text = await response.text()
    return sum(float(m) for m in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


async def spool_records(admin: str) -> float:
    return await metric_total(admin, "splitter_spool_records")


async def drained(admin: str, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await spool_records(admin) == 0:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    return None


def prepare_load(batches: int = 200) -> tuple[Receivers, dict[str, str], RuleSet, list[bytes], str]:
    """Count-only receivers, the environment for `rules/bench.yaml`, its rules, `batches` balanced batch bodies, auth."""
    receivers = start_receivers(["rs-web-key"])
    env = dict(os.environ, SEGMENT_URL=receivers.segment, RUDDERSTACK_DATA_PLANE_URL=receivers.rudderstack, SPLITTER_WRITE_KEY=WRITE_KEY)
    rules = load_rules(str(RULES), env)
    return receivers, env, rules, batch_bodies(rules, batches), basic_auth(WRITE_KEY)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--durability", choices=("fsync", "interval"), default="fsync", help="splitter serve's --durability")
    args = parser.parse_args()
    receivers, env, _, bodies, auth = prepare_load()
    splitter = await launch_splitter(str(RULES), env, ["--durability", args.durability], prefix=pin(PROXY_CORE))
    results: dict[str, Any] = {"pinned": pinning_available(), "proxy_core": PROXY_CORE, "load_core": LOAD_CORE, "durability": args.durability,
                               "body_bytes": sum(map(len, bodies)) // len(bodies), "events_per_request": BATCH}
    ok = True
    try:
        run_wrk(splitter.ingress, "/v1/batch", bodies, auth, seconds=2)  # warm-up
        await drained(splitter.admin, 30)
        await receivers.reset()
        for phase in ("healthy", "outage"):
            if phase == "outage":
                await receivers.faults("rudderstack", down=True)
            before = cpu_seconds([splitter.process.pid])
            run = run_wrk(splitter.ingress, "/v1/batch", bodies, auth, seconds=args.seconds, connections=CONNECTIONS)
            cpu = cpu_seconds([splitter.process.pid]) - before
            if phase == "outage":
                backlog = await spool_records(splitter.admin)
                await receivers.faults("rudderstack", down=False)
            drain = await drained(splitter.admin, 120)
            segment, rudder = await receivers.stats("segment"), await receivers.stats("rudderstack")
            events = run.ok * BATCH
            delivered_ok = delivered(batch_payload(bodies), segment["count"], rudder["count"], run.ok, CONNECTIONS)[1]  # wrk stops with CONNECTIONS in flight
            ok = ok and delivered_ok and run.ok == run.requests and drain is not None
            results[phase] = {
                "requests_per_s": round(run.ok / run.seconds), "events_per_s": round(events / run.seconds),
                "cpu_us_per_event": round(1e6 * cpu / events, 2) if events else None,
                "p50_ms": run.p50_ms, "p99_ms": run.p99_ms, "non_200": run.requests - run.ok, "socket_errors": run.errors,
                "rss_mb": round(rss_mb(splitter.process.pid), 1),
                "delivered_exactly": delivered_ok, "drain_seconds": None if drain is None else round(drain, 2),
                "received": {"segment": segment["count"], "rudderstack": rudder["count"]},
                "answered_200": run.ok,
            }
            if phase == "outage":
                results[phase]["spooled_at_recovery"] = int(backlog)
            await receivers.reset()
    finally:
        await splitter.stop()
        receivers.stop()
    pinned = f"proxy on core {PROXY_CORE}, wrk and receivers on core {LOAD_CORE}" if results["pinned"] else "not pinned (no taskset or one core)"
    print(f"splitter delivery benchmark: batches of {BATCH} events (~{results['body_bytes'] // 1024} KB), {args.seconds:g} s per phase, {pinned}, "
          f"--durability {args.durability}")
    print(f"{'phase':<9}{'req/s':>8}{'events/s':>10}{'CPU µs/event':>14}{'p50 ms':>8}{'p99 ms':>8}{'non-200':>9}{'drain s':>9}  delivered")
    for phase in ("healthy", "outage"):
        r = results[phase]
        print(f"{phase:<9}{r['requests_per_s']:>8}{r['events_per_s']:>10}{r['cpu_us_per_event']!s:>14}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}"
              f"{r['non_200']:>9}{r['drain_seconds']!s:>9}  {'all, exactly' if r['delivered_exactly'] else 'MISMATCH'}")
    print(json.dumps({k: results[k] for k in ("healthy", "outage")}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
