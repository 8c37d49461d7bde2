"""Side by side, in one run: direct, nginx, nginx split+mirror, a plain aiohttp forwarder, splitter in both durability modes.

Same bodies (batches of 50 events, ~30 KB; single calls, ~600 B, to /v1/t and /v1/track), same
count-only receivers, same load; the proxy under test pinned to core 1, load generators and
receivers on core 0 where `taskset` allows. For each scenario and payload: requests/s and events/s
at saturation (wrk, closed loop), proxy CPU per event and per request (from /proc, until the run's
events are delivered: a saturated splitter sends part of them after wrk stops), peak and steady
RSS, and a delivery check. Then latency, open loop (loadtest.openloop): each splitter at 50 % of its
own saturated rate for that payload; nginx and the forwarder at splitter (interval)'s rate (the same
load), and the forwarder at 50 % of its own rate too; direct right after each, at the same rate, so
"p99 added" subtracts direct's p99 at the same offered rate, measured beside it. Then the floor
(loadtest.floor), splitter with stalled upstreams (loadtest.stall), decide() (loadtest.bench_decide)
and the idle tax (loadtest.idle_tax), all in this run, and the issue's targets under the table with
PASS/FAIL.
Bounded: every run lasts `--seconds` (latency runs half that); the total is printed at the end.
Run: `python -m loadtest.bench [--seconds 6] [--quick] [--only splitter] [--json PATH] [--strict]`.
Exits 1 if any delivery was not exact (or, with --strict, if a target was missed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest import floor as floor_bench
from loadtest import subjects
from loadtest.bench_decide import summary as decide_summary
from loadtest.bench_delivery import CONNECTIONS, prepare_load
from loadtest.harness import PROXY_CORE, Receivers, cpu_seconds, memory_mb, pin, pinning_available, run_wrk
from loadtest.idle_tax import summary as idle_summary
from loadtest.openloop import launch
from loadtest.payloads import SINGLE_PATHS, Payload, batch_payload, delivered, single_payload
from loadtest.report import FORWARDER, evaluate_targets, print_floor, print_ratio, print_stall, print_table, print_targets
from loadtest.stall import stalled_upstreams

RATIO_PAIRS = 3  # alternating saturation runs of splitter (interval) and the forwarder on batches, for the ratio target
LATENCY_LOAD = 0.5  # open-loop offered load: a share of splitter's own saturation rate for the same payload
DRAIN_NOTED = 0.2  # seconds: a saturation run's delivery after wrk stopped that its row's note mentions
SPLITTERS: dict[str, subjects.Durability] = {"splitter-interval": "interval", "splitter-fsync": "fsync"}
PEERS = ("nginx", "nginx-split", "forwarder")
EXTRAS = ("stall", "floor", "decide", "idle")
ONLY = (*SPLITTERS, *PEERS, *EXTRAS, "splitter")  # --only choices; "splitter" is both modes; direct always runs
RUDDER_KEY = "rs-web-key"


@dataclass(frozen=True)
class Plan:
    seconds: float  # each saturation run
    latency_seconds: float  # each open-loop run
    warmup_seconds: float
    floor_seconds: float  # each of the floor's HTTP runs
    in_process_seconds: float  # each of the floor's in-process pieces, and each decide() measurement (twice that for its judged pair)
    quick: bool = False  # --quick: the harness is smoke-tested, nothing is measured (no warm-ups, one ratio pair)


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


async def saturate(subject: subjects.Subject, payload: Payload, receivers: Receivers, auth: str, plan: Plan) -> dict[str, Any]:
    """wrk at saturation: rate, CPU per event and request, memory, and what the receivers got.

    The CPU is counted until the run's events are delivered, not only while wrk runs: saturated,
    splitter's intake outpaces its senders (one upstream batch in flight per destination, sharing
    the core with 32 connections), and what is still spooled when wrk stops is read back and sent
    after it. Counting the run alone left that out: 20–30 % of a batch request's cost. The run
    alone is kept beside it (`cpu_us_per_event_run`), and how long the rest took (`drain_s`)."""
    pids = subject.pids()
    before = cpu_seconds(pids)
    run = await asyncio.to_thread(run_wrk, subject.url, payload.path, payload.bodies, auth, seconds=plan.seconds, connections=CONNECTIONS)
    during = cpu_seconds(pids) - before
    steady, peak = memory_mb(pids), memory_mb(pids, "VmHWM")
    settled = await subject.settle()
    cpu = cpu_seconds(pids) - before
    received = await counts(receivers)
    complete, note = delivery(subject.expect, payload, received, run.ok, CONNECTIONS)
    run_alone = round(1e6 * during / (run.ok * payload.events), 2) if pids and run.ok else None
    if subject.expect == "splitter" and settled is not None and settled >= DRAIN_NOTED and run_alone is not None:
        note += f"; the rest delivered in {settled:.1f} s after the run, counted (the run alone {run_alone:.2f} µs/ev)"
    await receivers.reset()
    rate = run.ok / run.seconds
    return {
        "scenario": subject.name, "payload": payload.name, "events": payload.events, "body_bytes": payload.body_bytes,
        "requests_per_s": round(rate), "events_per_s": round(rate * payload.events),
        "cpu_us_per_event": round(1e6 * cpu / (run.ok * payload.events), 2) if pids and run.ok else None,
        "cpu_us_per_request": round(1e6 * cpu / run.ok, 1) if pids and run.ok else None,
        "cpu_us_per_event_run": run_alone,
        "drain_s": settled if subject.expect == "splitter" else None,
        "wrk_p50_ms": run.p50_ms, "wrk_p99_ms": run.p99_ms, "non_2xx": run.non_2xx, "socket_errors": run.errors,
        "peak_rss_mb": round(peak, 1) if pids else None, "steady_rss_mb": round(steady, 1) if pids else None,
        "delivered": complete and settled is not None and run.ok == run.requests,
        "delivery": note if run.ok == run.requests else f"{note}, {run.requests - run.ok} failed",
        "received": dict(zip(("segment", "rudderstack"), received)), "answered_200": run.ok,
    }


async def open_loop(subject: subjects.Subject, payload: Payload, receivers: Receivers, auth: str, plan: Plan, rate: float) -> tuple[dict[str, Any], bool, str]:
    """Latency at `rate` requests/s, open loop, then the delivery check of what it sent: (latency, complete, note).

    The proxy's CPU over the run is kept beside it: how busy its core was at that rate, and what a
    request cost there (on a VM a core that idles between requests spends more per request than one
    kept busy, so 50 % of the saturated rate is more than 50 % of the core)."""
    pids = subject.pids()
    before = cpu_seconds(pids)
    result = await asyncio.to_thread(launch, subject.url, payload.path, payload.bodies, auth, rate=rate, seconds=plan.latency_seconds,
                                     grace=plan.latency_seconds)
    cpu = cpu_seconds(pids) - before  # the generator's start-up and the last answers add a little CPU, no load: over the schedule's length
    latency = asdict(result)
    if pids and result.answered and result.offered_per_s:
        latency.update(proxy_busy=round(cpu / (result.scheduled / result.offered_per_s), 3), cpu_us_per_request=round(1e6 * cpu / result.answered, 1))
    # The open-loop generator waits for every answer, so with none missing its requests are known
    # exactly: splitter's single calls are then checked exactly too, not within wrk's in-flight window.
    settled = await subject.settle()
    complete, note = delivery(subject.expect, payload, await counts(receivers), result.answered, result.scheduled - result.answered)
    await receivers.reset()
    return latency, complete and settled is not None, note.split(" (")[0]


async def measure(subject: subjects.Subject, payload: Payload, receivers: Receivers, auth: str, plan: Plan, rate: float | None,
                  rate_from: str) -> dict[str, Any]:
    """Saturation, then latency at `rate` (None: LATENCY_LOAD of this run's own saturated rate)."""
    row = await saturate(subject, payload, receivers, auth, plan)
    offered = LATENCY_LOAD * row["requests_per_s"] if rate is None else rate
    if offered < 1:  # nothing was answered at saturation: there is no rate to offer
        row.update(latency=None, latency_rate_from=rate_from, delivery_open_loop="not run", delivered=False)
        return row
    latency, complete, note = await open_loop(subject, payload, receivers, auth, plan, offered)
    row.update(latency=latency, latency_rate_from=rate_from, delivery_open_loop=note, delivered=row["delivered"] and complete)
    return row


async def at_own_half_rate(subject: subjects.Subject, row: dict[str, Any], payload: Payload, receivers: Receivers, auth: str, plan: Plan,
                           beside: DirectBeside) -> None:
    """The forwarder's open loop at 50 % of its own saturated rate as well, with direct beside it: the latency targets'
    condition met by the issue's own baseline (its table row is at splitter's rate, for a same-rate comparison). Kept
    under the row as `own_rate`."""
    offered = LATENCY_LOAD * row["requests_per_s"]
    if offered < 1:
        return
    latency, complete, note = await open_loop(subject, payload, receivers, auth, plan, offered)
    own: dict[str, Any] = {"scenario": f"{row['scenario']} (50 % of its own rate)", "latency": latency, "delivery_open_loop": note}
    await beside.beside(own, payload)
    row["own_rate"] = own
    row["delivered"] = row["delivered"] and complete


async def counts(receivers: Receivers) -> tuple[int, int]:
    return (await receivers.stats("segment"))["count"], (await receivers.stats("rudderstack"))["count"]


async def warm_up(subject: subjects.Subject, payload: Payload, receivers: Receivers, auth: str, plan: Plan) -> None:
    await asyncio.to_thread(run_wrk, subject.url, payload.path, payload.bodies, auth, seconds=plan.warmup_seconds, connections=CONNECTIONS)
    await subject.settle()
    await receivers.reset()


async def keep_running(subject: subjects.Subject) -> None:
    """--keep-running: leave splitter and the receivers up for profiling with your own load, until Ctrl-C."""
    assert subject.splitter is not None
    print(f"{subject.name} keeps running: pid {subject.splitter.process.pid}, ingress {subject.url}, admin {subject.splitter.admin}; "
          f"`py-spy top --pid {subject.splitter.process.pid}`; Ctrl-C to go on", file=sys.stderr)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().remove_signal_handler(sig)


def chosen(only: list[str] | None) -> set[str]:
    """--only's names, "splitter" standing for both modes; everything when none is given."""
    if not only:
        return {*SPLITTERS, *PEERS, *EXTRAS}
    return {name for given in only for name in (SPLITTERS if given == "splitter" else (given,))}


class DirectBeside:
    """Direct, open loop, at the rate a proxy row was just measured at, run right after it (so both see the machine alike);
    one run per payload and rate, shared by the rows measured at that rate. The proxy row gets direct's latency and
    `p99_added_ms`, direct's row the run under `open_loop` with the scenarios it served."""

    def __init__(self, direct: subjects.Subject, rows: dict[str, dict[str, Any]], receivers: Receivers, auth: str, plan: Plan) -> None:
        self.direct, self.rows, self.receivers, self.auth, self.plan = direct, rows, receivers, auth, plan
        self.runs: dict[tuple[str, float], dict[str, Any]] = {}

    async def beside(self, row: dict[str, Any], payload: Payload) -> None:
        if row.get("latency") is None:
            return
        rate = row["latency"]["offered_per_s"]
        run = self.runs.get((payload.name, rate))
        if run is None:
            latency, complete, note = await open_loop(self.direct, payload, self.receivers, self.auth, self.plan, rate)
            run = self.runs[(payload.name, rate)] = {**latency, "delivery": note, "for": []}
            base = self.rows[payload.name]
            base.setdefault("open_loop", []).append(run)
            base["delivered"] = base["delivered"] and complete
        run["for"].append(row["scenario"])
        row["direct_latency"] = {key: value for key, value in run.items() if key not in ("delivery", "for")}
        if not row["latency"]["saturated"] and not run["saturated"]:
            row["p99_added_ms"] = round(row["latency"]["p99_ms"] - run["p99_ms"], 3)


async def ratio_pairs(env: dict[str, str], receivers: Receivers, payload: Payload, auth: str, plan: Plan) -> dict[str, Any]:
    """The ratio target's figure, measured as a ratio should be on a machine whose speed drifts between
    minutes (25–60 % between runs on the 2-vCPU VM): splitter (interval) and the forwarder both up,
    saturation runs on `payload` alternated RATIO_PAIRS times (once with --quick), each pair's ratio, and their median."""
    async with subjects.splitter(env, "interval") as splitter, subjects.forwarder(receivers) as forwarder:
        if not plan.quick:
            await warm_up(splitter, payload, receivers, auth, plan)
            await warm_up(forwarder, payload, receivers, auth, plan)
        runs = []
        for _ in range(1 if plan.quick else RATIO_PAIRS):
            mine = await saturate(splitter, payload, receivers, auth, plan)
            theirs = await saturate(forwarder, payload, receivers, auth, plan)
            ours, base = mine["cpu_us_per_event"], theirs["cpu_us_per_event"]
            runs.append({"splitter_us_per_event": ours, "forwarder_us_per_event": base, "ratio": round(ours / base, 3) if ours and base else None,
                         "delivered": mine["delivered"] and theirs["delivered"]})
    ratios = sorted(run["ratio"] for run in runs if run["ratio"] is not None)
    return {"payload": payload.name, "pairs": runs, "median_ratio": ratios[len(ratios) // 2] if ratios else None,
            "delivered": all(run["delivered"] for run in runs)}


def pinned_report(module: str, *args: str) -> dict[str, Any]:
    """`python -m module *args --json F` in its own process pinned to the proxy core; what it wrote to F."""
    with tempfile.TemporaryDirectory(prefix="splitter-report-") as scratch:
        report = Path(scratch) / "report.json"
        subprocess.run([*pin(PROXY_CORE), sys.executable, "-m", module, *args, "--json", str(report)], check=True, capture_output=True, timeout=120)
        result: dict[str, Any] = json.loads(report.read_text())
        return result


def decide_rate(seconds: float) -> dict[str, Any]:
    """loadtest.bench_decide: decisions per second, and a bare hash's."""
    return pinned_report("loadtest.bench_decide", "--seconds", f"{seconds:g}")


def idle_tax(plan: Plan) -> dict[str, Any]:
    """loadtest.idle_tax: one batch's prepare() back to back and with idle gaps."""
    calls, rounds = (20, 1) if plan.quick else (100, 3)
    return pinned_report("loadtest.idle_tax", "--calls", str(calls), "--rounds", str(rounds))


async def run_all(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    only = chosen(args.only)
    receivers, env, rules, batch_bodies, auth = prepare_load()
    batch = batch_payload(batch_bodies)
    singles = {path: single_payload(rules, path) for path in SINGLE_PATHS}
    everything, baseline_kinds = [batch, *singles.values()], [batch, singles["/v1/track"]]  # /v1/t is Segment-only
    rows: list[dict[str, Any]] = []
    lead: dict[str, tuple[float, str]] = {}  # payload -> the rate the peers' latency is measured at, and whose it is
    stall = floor = decide = ratio = idle = None
    errors: dict[str, str] = {}  # the floor or decide() failed: said, and their targets are n/a
    try:
        async with subjects.direct(receivers) as direct:  # saturation first; its open-loop runs come beside each proxy's, at the same rate
            for payload in everything:
                rows.append(await saturate(direct, payload, receivers, auth, plan))
            beside = DirectBeside(direct, {row["payload"]: row for row in rows}, receivers, auth, plan)
            for name, mode in SPLITTERS.items():
                if name not in only:
                    continue
                async with subjects.splitter(env, mode) as subject:
                    if not plan.quick:
                        await warm_up(subject, batch, receivers, auth, plan)
                    for payload in everything:
                        row = await measure(subject, payload, receivers, auth, plan, None, "50 % of its own")
                        await beside.beside(row, payload)
                        if row["latency"] is not None:
                            lead.setdefault(payload.name, (row["latency"]["offered_per_s"], subject.name))
                        rows.append(row)
                    if args.keep_running:
                        await keep_running(subject)
            for direct_row in rows[:len(everything)]:  # no splitter: the peers at 50 % of direct's rate
                lead.setdefault(direct_row["payload"], (LATENCY_LOAD * direct_row["requests_per_s"], "direct"))
            factories: dict[str, Callable[[], AbstractAsyncContextManager[subjects.Subject]]] = {
                "nginx": lambda: subjects.nginx(receivers, "pass", RUDDER_KEY), "nginx-split": lambda: subjects.nginx(receivers, "split", RUDDER_KEY),
                "forwarder": lambda: subjects.forwarder(receivers)}
            for name in PEERS:
                if name not in only:
                    continue
                try:
                    async with factories[name]() as subject:
                        if not plan.quick:
                            await warm_up(subject, batch, receivers, auth, plan)
                        for payload in baseline_kinds:
                            rate, whose = lead[payload.name]
                            row = await measure(subject, payload, receivers, auth, plan, rate, f"{whose}'s")
                            await beside.beside(row, payload)
                            if name == "forwarder":
                                await at_own_half_rate(subject, row, payload, receivers, auth, plan, beside)
                            rows.append(row)
                except subjects.Unavailable as missing:
                    rows.append({"scenario": name, "skipped": str(missing), "delivered": True})
        if {"splitter-interval", "forwarder"} <= only:
            ratio = await ratio_pairs(env, receivers, batch, auth, plan)
        if "floor" in only:
            forwarder = next((row for row in rows if row["scenario"] == FORWARDER and row.get("payload") == "batch"), None)
            shared = floor_bench.Shared(receivers, rules, auth, batch, singles, forwarder)
            try:  # it reaches into proxy.ingress's internals: a change there must not cost the rest of the run
                floor = await floor_bench.measure(plan.floor_seconds, shared, plan.in_process_seconds)
            except Exception as error:
                errors["floor"] = f"{type(error).__name__}: {error}"
        if "stall" in only:  # last: the hung requests it leaves in the receivers cannot touch another row
            await receivers.reset()  # the floor's own forwarder run (when the table has none) left its counts there
            stall_env = dict(env, SPLITTER_DURABILITY=args.stall_durability)
            stall = {**await stalled_upstreams(receivers, stall_env, batch, auth, plan.seconds, hang=not plan.quick), "durability": args.stall_durability}
    finally:
        receivers.stop()
    if "decide" in only:
        try:
            decide = await asyncio.to_thread(decide_rate, plan.in_process_seconds)
        except (subprocess.SubprocessError, OSError, ValueError) as error:
            errors["decide"] = f"{type(error).__name__}: {error}"
    if "idle" in only:
        try:
            idle = await asyncio.to_thread(idle_tax, plan)
        except (subprocess.SubprocessError, OSError, ValueError) as error:
            errors["idle"] = f"{type(error).__name__}: {error}"
    return {"rows": rows, "stall": stall, "floor": floor, "decide": decide, "ratio": ratio, "idle": idle, "errors": errors}


def _run(main: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(main)
    return uvloop.run(main)


def main() -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per saturation run (latency runs take half)")
    parser.add_argument("--quick", action="store_true", help="about 1 s per run: a smoke test of the harness, not a measurement")
    parser.add_argument("--only", action="append", choices=ONLY, help="run only these (repeatable; splitter = both modes); direct always runs")
    parser.add_argument("--stall-durability", choices=("interval", "fsync"), default="interval",
                        help="splitter's --durability in the stalled-upstream run (default interval: it accepts fastest)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--keep-running", action="store_true", help="after its runs, keep each splitter up for profiling until Ctrl-C")
    args = parser.parse_args()
    seconds = 1 if args.quick else max(1, round(args.seconds))  # wrk takes whole seconds
    plan = Plan(seconds, seconds / 2, min(2, max(1, seconds // 2)), max(1, round(seconds * 2 / 3)), 0.3 if args.quick else min(2.0, seconds / 3),
                quick=args.quick)
    results = _run(run_all(args, plan))
    rows, stall, floor, decide, ratio, idle = (results[key] for key in ("rows", "stall", "floor", "decide", "ratio", "idle"))
    targets = evaluate_targets(rows, stall, floor, decide, ratio)
    pinned = f"proxies on core {PROXY_CORE}, load and receivers on the other" if pinning_available() else "not pinned"
    print(f"{plan.seconds:g} s per saturation run ({CONNECTIONS} connections, wrk), {plan.latency_seconds:g} s per open-loop run: "
          f"splitter at {LATENCY_LOAD * 100:.0f} % of its own rate, nginx and the forwarder at splitter (interval)'s, "
          f"direct beside each at the same rate; {pinned}")
    print_table(rows)
    if stall:
        print_stall(stall)
    if floor:
        print_floor(floor)
    if ratio:
        print_ratio(ratio)
    if decide:
        print(decide_summary(decide))
    if idle:
        print(idle_summary(idle))
    for name, error in results["errors"].items():
        print(f"{name} FAILED, its figures are missing: {error}")
    print_targets(targets)
    duration = time.monotonic() - started
    print(f"total {duration:.0f} s")
    if args.json:
        everything = {"plan": asdict(plan), "pinned": pinning_available(), "rows": rows, "stall": stall, "floor": floor, "decide": decide, "ratio": ratio,
                      "idle": idle, "errors": results["errors"], "targets": targets, "duration_s": round(duration, 1)}
        args.json.write_text(json.dumps(everything, indent=2, ensure_ascii=False) + "\n")
    delivered = all(row["delivered"] for row in rows) and (stall is None or stall["delivered"]) and (ratio is None or ratio["delivered"])
    if not delivered:
        print("delivery was not exact: see the delivered column", file=sys.stderr)
        return 1
    if results["errors"]:
        print(f"failed: {', '.join(results['errors'])}", file=sys.stderr)
        return 1
    if floor and any(row["non_2xx"] for row in (*floor["http"], floor["upstream_send"])):
        print("the floor's servers or receivers answered non-2xx: see --json's floor.http and floor.upstream_send", file=sys.stderr)
        return 1
    return 1 if args.strict and any(t["passed"] is False for t in targets) else 0


if __name__ == "__main__":
    raise SystemExit(main())
