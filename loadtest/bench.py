"""Side by side, in one run: direct, nginx, nginx split+mirror, a plain aiohttp forwarder, splitter.

Same bodies (batches of 50 events, ~30 KB; single calls, ~600 B, to /v1/t and /v1/track), same
count-only receivers, same load; the proxy under test pinned to core 1, load generators and
receivers on core 0 where `taskset` allows. For each scenario and payload: requests/s and events/s
at saturation (wrk, closed loop), proxy CPU seconds per event and per request (from /proc), p50/p99
at a fixed offered load of half the direct rate (loadtest.openloop, open loop), peak and steady RSS,
and a delivery check. Then splitter with stalled upstreams (loadtest.stall). Targets are printed
next to the figures. Bounded: every run lasts `--seconds` (latency runs half that).
Run: `python -m loadtest.bench [--seconds 6] [--quick] [--only splitter] [--json PATH] [--strict]`.
Exits 1 if any delivery was not exact (or, with --strict, if a target was missed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest import subjects
from loadtest.bench_delivery import CONNECTIONS, prepare_load
from loadtest.harness import PROXY_CORE, Receivers, cpu_seconds, memory_mb, pinning_available, run_wrk
from loadtest.openloop import launch
from loadtest.payloads import SINGLE_PATHS, Payload, batch_payload, delivered, single_payload
from loadtest.report import evaluate_targets, print_stall, print_table, print_targets
from loadtest.stall import stalled_upstreams

LATENCY_LOAD = 0.5  # open-loop offered load, as a share of direct's saturation rate for the same payload
PROXIES = ("nginx", "nginx-split", "forwarder", "splitter")  # --only choices, besides "stall"; direct always runs
RUDDER_KEY = "rs-web-key"


@dataclass(frozen=True)
class Plan:
    seconds: float  # each saturation run
    latency_seconds: float  # each open-loop run
    warmup_seconds: float


def delivery(expect: subjects.Expect, payload: Payload, received: tuple[int, int], answered: int, in_flight: int) -> tuple[bool, str]:
    """Did the receivers get every event? Up to `in_flight` requests were unanswered when the load stopped."""
    segment, rudder = received
    if expect == "splitter":
        complete, exact = delivered(payload, segment, rudder, answered, in_flight)
        verdict = "exactly" if exact else "all, split within in-flight" if complete else "MISMATCH"
        return complete, f"{verdict} ({segment} + {rudder})"
    copies, total = (1, segment) if expect == "forward" else (2, segment + rudder)
    complete = copies * answered * payload.events <= total <= copies * (answered + in_flight) * payload.events
    if expect == "forward":
        complete = complete and rudder == 0
    label = "all" if expect == "forward" else "primary + mirror"
    return complete, f"{label if complete else 'MISSING'} ({segment} + {rudder})"


async def measure(subject: subjects.Subject, payload: Payload, receivers: Receivers, auth: str, plan: Plan,
                  offered: float | None) -> dict[str, Any]:
    """Saturation (CPU, memory, delivery), then latency at `offered` requests/s (or half of this run's rate)."""
    pids = subject.pids()
    before = cpu_seconds(pids)
    run = await asyncio.to_thread(run_wrk, subject.url, payload.path, payload.bodies, auth, seconds=plan.seconds, connections=CONNECTIONS)
    cpu = cpu_seconds(pids) - before
    steady, peak = memory_mb(pids), memory_mb(pids, "VmHWM")
    settled = await subject.settle()
    received = await counts(receivers)
    complete, note = delivery(subject.expect, payload, received, run.ok, CONNECTIONS)
    await receivers.reset()
    rate = run.ok / run.seconds
    offered = offered or LATENCY_LOAD * rate
    latency = await asyncio.to_thread(launch, subject.url, payload.path, payload.bodies, auth, rate=offered, seconds=plan.latency_seconds,
                                      grace=plan.latency_seconds)
    # The open-loop generator waits for every answer, so with none missing its requests are known
    # exactly: splitter's single calls are then checked exactly too, not within wrk's in-flight window.
    settled_again = await subject.settle()
    open_loop_complete, open_loop_note = delivery(subject.expect, payload, await counts(receivers), latency.answered,
                                                  latency.scheduled - latency.answered)
    await receivers.reset()
    return {
        "scenario": subject.name, "payload": payload.name, "events": payload.events, "body_bytes": payload.body_bytes,
        "requests_per_s": round(rate), "events_per_s": round(rate * payload.events),
        "cpu_us_per_event": round(1e6 * cpu / (run.ok * payload.events), 2) if pids and run.ok else None,
        "cpu_us_per_request": round(1e6 * cpu / run.ok, 1) if pids and run.ok else None,
        "wrk_p50_ms": run.p50_ms, "wrk_p99_ms": run.p99_ms, "non_2xx": run.non_2xx, "socket_errors": run.errors,
        "peak_rss_mb": round(peak, 1) if pids else None, "steady_rss_mb": round(steady, 1) if pids else None,
        "delivered": complete and open_loop_complete and None not in (settled, settled_again) and run.ok == run.requests,
        "delivery": note if run.ok == run.requests else f"{note}, {run.requests - run.ok} failed",
        "delivery_open_loop": open_loop_note.split(" (")[0],
        "received": dict(zip(("segment", "rudderstack"), received)), "answered_200": run.ok, "latency": asdict(latency),
    }


async def counts(receivers: Receivers) -> tuple[int, int]:
    return (await receivers.stats("segment"))["count"], (await receivers.stats("rudderstack"))["count"]


async def warm_up(subject: subjects.Subject, payload: Payload, receivers: Receivers, auth: str, plan: Plan) -> None:
    await asyncio.to_thread(run_wrk, subject.url, payload.path, payload.bodies, auth, seconds=plan.warmup_seconds, connections=CONNECTIONS)
    await subject.settle()
    await receivers.reset()


async def keep_running(subject: subjects.Subject) -> None:
    """--keep-running: leave splitter and the receivers up for profiling with your own load, until Ctrl-C."""
    assert subject.splitter is not None
    print(f"splitter keeps running: pid {subject.splitter.process.pid}, ingress {subject.url}, admin {subject.splitter.admin}; "
          f"`py-spy top --pid {subject.splitter.process.pid}`; Ctrl-C to stop", file=sys.stderr)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()


def contenders(receivers: Receivers, env: dict[str, str], only: set[str]) -> Iterator[tuple[str, AbstractAsyncContextManager[subjects.Subject]]]:
    """Direct first (its rates set the open-loop load of the others), then the proxies asked for."""
    factories: dict[str, Callable[[], AbstractAsyncContextManager[subjects.Subject]]] = {
        "nginx": lambda: subjects.nginx(receivers, "pass", RUDDER_KEY), "nginx-split": lambda: subjects.nginx(receivers, "split", RUDDER_KEY),
        "forwarder": lambda: subjects.forwarder(receivers), "splitter": lambda: subjects.splitter(env)}
    yield "direct", subjects.direct(receivers)
    for name in PROXIES:
        if name in only:
            yield name, factories[name]()


async def run_all(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    only = set(args.only or [*PROXIES, "stall"])
    receivers, env, rules, batch_bodies, auth = prepare_load()
    batch = batch_payload(batch_bodies)
    singles = {path: single_payload(rules, path) for path in SINGLE_PATHS}
    everything, baseline_kinds = [batch, *singles.values()], [batch, singles["/v1/track"]]  # /v1/t is Segment-only
    rows: list[dict[str, Any]] = []
    direct_rate: dict[str, float] = {}
    stall = None
    try:
        for name, context in contenders(receivers, env, only):
            try:
                async with context as subject:
                    if name != "direct" and not args.quick:
                        await warm_up(subject, batch, receivers, auth, plan)
                    for payload in everything if name in ("direct", "splitter") else baseline_kinds:
                        row = await measure(subject, payload, receivers, auth, plan, direct_rate.get(payload.name))
                        if name == "direct":
                            direct_rate[payload.name] = row["latency"]["offered_per_s"]
                        rows.append(row)
                    if name == "splitter" and args.keep_running:
                        await keep_running(subject)
            except subjects.Unavailable as missing:
                rows.append({"scenario": name, "skipped": str(missing), "delivered": True})
        if "stall" in only:
            stall = await stalled_upstreams(receivers, env, batch, auth, plan.seconds, hang=not args.quick)
    finally:
        receivers.stop()
    direct = {row["payload"]: row for row in rows if row["scenario"] == "direct"}
    for row in rows:
        base = direct.get(row.get("payload", ""))
        if base and row["scenario"] != "direct" and not row["latency"]["saturated"] and not base["latency"]["saturated"]:
            row["p99_added_ms"] = round(row["latency"]["p99_ms"] - base["latency"]["p99_ms"], 3)
    return {"rows": rows, "stall": stall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per saturation run (latency runs take half)")
    parser.add_argument("--quick", action="store_true", help="about 1 s per run: a smoke test of the harness, not a measurement")
    parser.add_argument("--only", action="append", choices=[*PROXIES, "stall"], help="run only these (repeatable); direct always runs")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--keep-running", action="store_true", help="after its runs, keep splitter up for profiling until Ctrl-C")
    args = parser.parse_args()
    seconds = 1 if args.quick else max(1, round(args.seconds))  # wrk takes whole seconds
    plan = Plan(seconds, seconds / 2, min(2, max(1, seconds // 2)))
    try:
        from uvloop import run
    except ImportError:  # pragma: no cover
        from asyncio import run
    results = run(run_all(args, plan))
    rows, stall = results["rows"], results["stall"]
    targets = evaluate_targets(rows, stall)
    pinned = f"proxies on core {PROXY_CORE}, load and receivers on the other" if pinning_available() else "not pinned"
    print(f"{plan.seconds:g} s per saturation run ({CONNECTIONS} connections, wrk), {plan.latency_seconds:g} s per open-loop run "
          f"at {LATENCY_LOAD:.0%} of direct's rate; {pinned}")
    print_table(rows)
    if stall:
        print_stall(stall)
    print_targets(targets)
    if args.json:
        args.json.write_text(json.dumps({"plan": asdict(plan), "pinned": pinning_available(), "rows": rows, "stall": stall, "targets": targets},
                                        indent=2) + "\n")
    delivered = all(row["delivered"] for row in rows) and (stall is None or stall["delivered"])
    if not delivered:
        print("delivery was not exact: see the delivered column", file=sys.stderr)
        return 1
    return 1 if args.strict and any(t["passed"] is False for t in targets) else 0


if __name__ == "__main__":
    raise SystemExit(main())
