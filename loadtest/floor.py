"""The floor: what the work splitter cannot skip costs on this machine, next to the batch targets.

`loadtest.bench` says what splitter costs; this says what any splitter built on the same stack must
cost at least, measured piece by piece in one run, so a missed target can be told apart from a target
below the floor. For a batch of 50 events (`rules/bench.yaml`, the payload of `bench_delivery`):

- over HTTP, each server pinned to the proxy core, wrk on the other, CPU from /proc:
  - `direct`: the load straight to Segment's stand-in receiver (its rate sets the latency target's load);
  - `aiohttp, read and answer`: an aiohttp + uvloop app that reads the body and answers 200
    (`loadtest/baselines/sink.py`): what aiohttp alone costs per request;
  - `splitter's ingest port, read and answer`: the same handler on splitter's ingest listener (aiohttp
    with its timeouts, keepalive and backpressure) behind splitter's observer (request metrics,
    in-flight limit, CORS, JSON errors), served by `python -m loadtest.floor --serve`: splitter's HTTP layer;
  - `bare asyncio protocol`: a Content-Length-only protocol on uvloop: moving the bytes through Python;
  - `aiohttp forwarder`: the plain parsing forwarder of `loadtest.bench` (the ratio target's baseline);
- in this process, pinned to the proxy core, best of repeated passes over the same bodies:
  - `orjson parse`, `orjson encode per event`, `shared_decision()` per event;
  - `prepare()`: parse, validate, complete, route, encode and file every event;
  - `spool framing`: the records for the primary and the mirror (lengths, crc32).

floor = splitter's ingest port (read and answer) + prepare() + spool framing, per event. Writing and syncing the
spool, reading it back, the upstream sends and the metrics come on top. Run:
`python -m loadtest.floor [--seconds S] [--json PATH]` (about 40 s at the default 4 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from loadtest import subjects
from loadtest.bench_delivery import CONNECTIONS, WRITE_KEY, prepare_load
from loadtest.harness import LOAD_CORE, PROXY_CORE, cpu_seconds, pinned_server, pinning_available, run_wrk
from loadtest.payloads import BATCH
from loadtest.report import CPU_PER_EVENT_US as BATCH_TARGET_US
from loadtest.report import FORWARDER_RATIO
from proxy.delivery.spool import encode
from proxy.engine import EventContext, RuleSet, shared_decision
from proxy.ingress.app import FAST_INGRESS, FastIngress, Observer, observing
from proxy.ingress.body import read_body
from proxy.ingress.handlers import _prepare_request
from proxy.ingress.listener import listen
from proxy.ingress.prepare import CallShape
from proxy.metrics import Metrics

PORT_ROW = "splitter's ingest port, read and answer"


def http_row(name: str, url: str, pids: list[int], bodies: list[bytes], auth: str, seconds: float) -> dict[str, Any]:
    run_wrk(url, "/v1/batch", bodies, auth, seconds=1, connections=CONNECTIONS)  # warm-up: connections, caches
    before = cpu_seconds(pids)
    run = run_wrk(url, "/v1/batch", bodies, auth, seconds=seconds, connections=CONNECTIONS)
    cpu = cpu_seconds(pids) - before
    answered = run.requests - run.non_2xx
    per_request = 1e6 * cpu / answered if pids and answered else None
    return {"name": name, "events_per_s": answered * BATCH / run.seconds, "cpu_us_per_request": per_request,
            "cpu_us_per_event": per_request / BATCH if per_request is not None else None, "non_2xx": run.non_2xx}


@contextmanager
def on_proxy_core() -> Iterator[None]:
    """This process on the proxy core for the in-process pieces (the servers are stopped by then)."""
    if not pinning_available():
        yield
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(PROXY_CORE)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def per_event(work: Callable[[bytes], object], bodies: list[bytes], seconds: float) -> float:
    """CPU µs per event of `work` over every body, best of the passes that fit in `seconds`."""
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        started = time.process_time()
        for body in bodies:
            work(body)
        best = min(best, (time.process_time() - started) / (len(bodies) * BATCH) * 1e6)
        if time.perf_counter() >= deadline:
            return best


def in_process_rows(rules: RuleSet, bodies: list[bytes], seconds: float) -> dict[str, float]:
    source = rules.source_for_key(WRITE_KEY)
    assert source is not None
    ctx = EventContext(source.name)
    parsed = {id(body): orjson.loads(body)["batch"] for body in bodies}
    shape = CallShape(True)
    prepared = {id(body): _prepare_request(rules, body, WRITE_KEY, shape, None, None, "10.0.0.1").submission for body in bodies}

    def frame(body: bytes) -> None:
        done = prepared[id(body)]
        for chunk in (*done.primary.values(), *done.mirror.values()):
            encode(1.0, "key", None, chunk.events)

    with on_proxy_core():
        return {
            "orjson parse": per_event(orjson.loads, bodies, seconds),
            "orjson encode per event": per_event(lambda body: [orjson.dumps(event) for event in parsed[id(body)]], bodies, seconds),
            "shared_decision() per event": per_event(lambda body: [shared_decision(rules, event, ctx) for event in parsed[id(body)]], bodies, seconds),
            "prepare() (parse, validate, route, encode, file)": per_event(
                lambda body: _prepare_request(rules, body, WRITE_KEY, shape, None, None, "10.0.0.1"), bodies, seconds),
            "spool framing (primary + mirror records)": per_event(frame, bodies, seconds),
        }


def verdicts(http: dict[str, dict[str, Any]], pieces: dict[str, float]) -> tuple[float, list[dict[str, Any]]]:
    port_cost = http[PORT_ROW]["cpu_us_per_event"]
    floor = port_cost + pieces["prepare() (parse, validate, route, encode, file)"] + pieces["spool framing (primary + mirror records)"]
    forwarder_target = http["aiohttp forwarder"]["cpu_us_per_event"] / FORWARDER_RATIO
    offered = http["direct"]["events_per_s"] / 2
    capacity = 1e6 / floor
    rows = [
        {"target": f"batch ≤ {BATCH_TARGET_US:g} µs proxy CPU/event", "limit_us": BATCH_TARGET_US, "below_floor": floor > BATCH_TARGET_US,
         "note": (f"leaves {BATCH_TARGET_US - floor:.1f} µs for spool I/O, upstream sends, metrics" if floor <= BATCH_TARGET_US
                  else "the floor alone is over it")},
        {"target": f"{FORWARDER_RATIO}× less than the forwarder", "limit_us": forwarder_target, "below_floor": floor > forwarder_target,
         "note": f"forwarder {http['aiohttp forwarder']['cpu_us_per_event']:.1f} µs / {FORWARDER_RATIO}"},
        {"target": "p99 at 50 % of direct (one core must sustain it)", "limit_us": 1e6 / offered, "below_floor": capacity < offered,
         "note": f"offered {offered / 1000:.0f}k events/s: the floor alone keeps the core {100 * offered / capacity:.0f} % busy"},
    ]
    return floor, rows


def render(http: dict[str, dict[str, Any]], pieces: dict[str, float], floor: float, rows: list[dict[str, Any]]) -> str:
    pinned = f"servers on core {PROXY_CORE}, wrk on core {LOAD_CORE}" if pinning_available() else "no taskset: nothing pinned"
    lines = [f"floor: batches of {BATCH} events, rules/bench.yaml ({pinned})", "",
             f"{'over HTTP':<52} {'events/s':>10} {'CPU µs/req':>11} {'CPU µs/ev':>10}"]
    for row in http.values():
        per_request = "–" if row["cpu_us_per_request"] is None else f"{row['cpu_us_per_request']:.0f}"
        per_event_text = "–" if row["cpu_us_per_event"] is None else f"{row['cpu_us_per_event']:.2f}"
        lines.append(f"{row['name']:<52} {row['events_per_s']:>10,.0f} {per_request:>11} {per_event_text:>10}")
    lines += ["", f"{'in process, per event':<52} {'CPU µs/ev':>33}"]
    lines += [f"{name:<52} {value:>33.2f}" for name, value in pieces.items()]
    lines += ["", f"floor = ingest port read and answer + prepare() + spool framing = {floor:.2f} µs/event "
                  "(before spool writes, upstream sends, metrics)", ""]
    for row in rows:
        lines.append(f"{'BELOW THE FLOOR' if row['below_floor'] else 'above the floor':<16} {row['target']:<50} "
                     f"limit {row['limit_us']:.2f} µs/event  ({row['note']})")
    return "\n".join(lines)


async def measure(seconds: float) -> dict[str, Any]:
    receivers, _, rules, bodies, auth = prepare_load()
    try:
        http = {"direct": http_row("direct", receivers.segment, [], bodies, auth, seconds)}
        for args, name in ((("loadtest.baselines.sink", "--kind", "aiohttp"), "aiohttp, read and answer"), (("loadtest.floor", "--serve"), PORT_ROW),
                           (("loadtest.baselines.sink", "--kind", "bare"), "bare asyncio protocol")):
            with pinned_server(*args) as (url, pid):
                http[name] = http_row(name, url, [pid], bodies, auth, seconds)
        async with subjects.forwarder(receivers) as forwarder:
            http["aiohttp forwarder"] = http_row("aiohttp forwarder", forwarder.url, forwarder.pids(), bodies, auth, seconds)
    finally:
        receivers.stop()
    pieces = in_process_rows(rules, bodies, min(seconds, 3.0))
    floor, rows = verdicts(http, pieces)
    return {"http": list(http.values()), "in_process_us_per_event": pieces, "floor_us_per_event": floor, "targets": rows,
            "pinned": pinning_available()}


async def _answer(request: web.Request) -> web.Response:
    await read_body(request)
    return web.Response(body=b'{"success":true}', content_type="application/json")


async def serve_ingest_port() -> None:
    """The `PORT_ROW` server: read and answer on splitter's ingest listener and observer; prints its URL as JSON."""
    observer = Observer(Metrics(), ("*",), 10_000)
    app = web.Application(middlewares=[observing(observer)], client_max_size=1024**2)
    paths = ("/v1/batch", "/v1/track", "/v1/t")
    for path in paths:
        app.router.add_post(path, _answer)
    app[FAST_INGRESS] = FastIngress(dict.fromkeys(paths, _answer), observer)  # dispatched as splitter's own ingest routes are
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    listener = await listen(runner, "127.0.0.1", 0)
    print(json.dumps({"url": listener.url}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await listener.close(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per HTTP run (default 4)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the ingest-port server measured by the run
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve_ingest_port())
        return 0
    result = asyncio.run(measure(args.seconds))
    http = {row["name"]: row for row in result["http"]}
    print(render(http, result["in_process_us_per_event"], result["floor_us_per_event"], result["targets"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    unanswered = [row["name"] for row in result["http"] if row["non_2xx"]]
    if unanswered:
        print(f"non-2xx answers from: {', '.join(unanswered)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
