"""The floor: what the work splitter cannot skip costs on this machine, next to the CPU targets.

`loadtest.bench` says what splitter costs; this says what any splitter built on the same stack must
cost at least, measured piece by piece in one run, so a missed target can be told apart from a target
below the floor. `loadtest.bench` measures it in its own run (`measure(seconds, Shared(...))`: its
receivers, payloads and forwarder row); on its own it measures direct and the forwarder too. For
batches of 50 events (`rules/bench.yaml`, the payload of `bench_delivery`) and single calls:

- over HTTP, each server pinned to the proxy core, wrk on the other, CPU from /proc:
  - `direct` (on its own only): the load straight to Segment's stand-in receiver;
  - `aiohttp, read and answer`: an aiohttp + uvloop app that reads the body and answers 200
    (`loadtest/baselines/sink.py`): what aiohttp alone costs per request;
  - `splitter's ingest port, read and answer`: the same handler on splitter's ingest listener (llhttp
    framing and aiohttp's request objects, with its timeouts, keepalive and backpressure) behind
    splitter's observer (request metrics, in-flight limit, CORS, JSON errors), served by `python -m loadtest.floor --serve`: splitter's HTTP
    layer; once with batches, once with single calls to /v1/track (/v1/t is the same handler);
  - `bare asyncio protocol`: a Content-Length-only protocol on uvloop: moving the bytes through Python;
  - `aiohttp forwarder`: the plain parsing forwarder of `loadtest.bench` (the ratio target's baseline);
- in this process, pinned to the proxy core, best of repeated passes over the same bodies:
  - `orjson parse`, `orjson encode per event`, `shared_decision()` per event (batches);
  - `prepare()`: parse, validate, complete, route, encode and file every event, as the ingest route
    of the path does it (batches, /v1/t, /v1/track);
  - `spool framing`: the records for the primary and the mirror (lengths, crc32);
  - `spool write`: those records written as `--durability interval` writes them before the 200 (page
    cache, no fsync): `write_all` (one `pwritev` per request and destination, the primary and a mirror
    copy for the same destination together) to one segment file per destination in a temporary
    directory beside the bench's spool (`tempfile.gettempdir()`, as `loadtest/process.py`), rotated at
    16 MB like the spool's segments (a new file with its format marker, the full one removed). CPU
    from `time.process_time()`, which counts the kernel's time in the writes;
- over HTTP from a process pinned to the proxy core (`python -m loadtest.floor --send PLAN`):
  - `upstream sends`: the load's events, the primary and mirror copies (1.3 per event with
    `rules/bench.yaml`), cut into the upstream batches splitter's sender makes
    (`upstream_batches()` with the destination's `batch_max_events` / `batch_max_bytes`), each body
    joined into `{"batch":[...]}` and POSTed with the destination's credential to the count-only
    receivers by an aiohttp ClientSession per destination (keep-alive, the connector of
    `proxy/delivery/upstream.py`), `max_in_flight` at once per destination; no metrics, no retries.
    CPU per event of the load from `time.process_time()` in that process, best of repeated passes.

floor = splitter's ingest port (read and answer) + prepare() + spool framing + spool write + upstream
sends: per event for batches, per request for single calls (a single call is one record for one or
two destinations, written on its own; its upstream send is batched across requests by the sender, so
it costs the batched send's figure per event). What still comes on top: the fsync (`--durability
fsync`'s 200 waits for it; `interval` runs it off the request path), the reader's handoff of fresh
records to the sender, the delivery ledger, the event catalog and the metrics, and the bookkeeping of
the 200 (group commit tickets, the accounting of what was accepted). Run: `python -m loadtest.floor
[--seconds S] [--json PATH]` (about 60 s at the default 4 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from loadtest import subjects
from loadtest.bench_delivery import CONNECTIONS, WRITE_KEY, prepare_load
from loadtest.harness import LOAD_CORE, PROXY_CORE, Receivers, cpu_seconds, pin, pinned_server, pinning_available, run_wrk
from loadtest.payloads import BATCH, SINGLE_PATHS, Payload, batch_payload, single_payload
from loadtest.report import CPU_PER_EVENT_US, CPU_PER_SINGLE_US, FORWARDER, FORWARDER_RATIO
from proxy.delivery.batches import upstream_batches
from proxy.delivery.options import DeliveryOptions
from proxy.delivery.segment_files import write_all
from proxy.delivery.spool_format import MAGIC, Frame, tag_of
from proxy.delivery.spool_format import frame as frame_record
from proxy.delivery.submission import Submission
from proxy.delivery.upstream import MAX_ANSWER_BYTES, USER_AGENT, basic_auth, read_bounded
from proxy.engine import EventContext, RuleSet, shared_decision
from proxy.ingress.app import FAST_INGRESS, FastIngress, Observer, observing, routes
from proxy.ingress.body import read_body
from proxy.ingress.handlers import _prepare_request
from proxy.ingress.listener import listen
from proxy.ingress.prepare import Prepared
from proxy.metrics import Metrics

PORT_ROW = "splitter's ingest port, read and answer"
PREPARE = "prepare() (parse, validate, route, encode, file)"
FRAMING = "spool framing (primary + mirror records)"
WRITE = "spool write (primary + mirror records, page cache)"
SEND = "upstream sends (batched POSTs, primary + mirror copies)"
FLOOR_SUM = "ingest port read and answer + prepare() + spool framing + spool write + upstream sends"
ON_TOP = "the fsync, the reader's handoff, ledger, catalog, metrics and the 200's bookkeeping"
SEGMENT_BYTES = 16 * 1024 * 1024  # the spool's segment size (proxy/delivery/spool.py)
FORWARDED_FOR = "10.0.0.1"  # the client address prepare() is given here
SINGLE_PORT_PATH = "/v1/track"  # the ingest port's read and answer of single calls, measured once: /v1/t is the same handler
IN_PROCESS_SECONDS = 2.0  # at most, per in-process piece (best of the passes that fit)


def http_row(name: str, url: str, pids: list[int], payload: Payload, auth: str, seconds: float) -> dict[str, Any]:
    run_wrk(url, payload.path, payload.bodies, auth, seconds=1, connections=CONNECTIONS)  # warm-up: connections, caches
    before = cpu_seconds(pids)
    run = run_wrk(url, payload.path, payload.bodies, auth, seconds=seconds, connections=CONNECTIONS)
    cpu = cpu_seconds(pids) - before
    answered = run.requests - run.non_2xx
    per_request = 1e6 * cpu / answered if pids and answered else None
    return {"name": name, "payload": payload.name, "events_per_s": answered * payload.events / run.seconds, "cpu_us_per_request": per_request,
            "cpu_us_per_event": per_request / payload.events if per_request is not None else None, "non_2xx": run.non_2xx}


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


def per_event(work: Callable[[bytes], object], bodies: list[bytes], seconds: float, events: int = BATCH) -> float:
    """CPU µs per event of `work` over every body (`events` each), best of the passes that fit in `seconds`."""
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        started = time.process_time()
        for body in bodies:
            work(body)
        best = min(best, (time.process_time() - started) / (len(bodies) * events) * 1e6)
        if time.perf_counter() >= deadline:
            return best


def _records(submission: Submission) -> list[tuple[str, list[Frame]]]:
    """The spool records of one request, as splitter writes them: per destination one write, its primary
    record and a mirror copy for the same destination together, then the mirror copies for the others."""
    source = submission.source

    def record(name: str, events: list[bytes]) -> Frame:
        return frame_record(1.0, source.credential_for(name, submission.presented_key), submission.forwarded_for, events)

    mirror = {name: chunk.events for name, chunk in submission.mirror.items() if chunk.events}
    writes = []
    for name, chunk in submission.primary.items():
        if chunk.events:
            copy = mirror.pop(name, None)
            writes.append((name, [record(name, chunk.events)] + ([record(name, copy)] if copy else [])))
    return writes + [(name, [record(name, events)]) for name, events in mirror.items()]


class SegmentWriter:
    """One destination's spool files, written as the spool writes them (`write_all` at the record's offset,
    the format marker first) and rotated at the spool's segment size, the full file removed (the spool
    keeps the last two delivered ones to write over: removing is the floor's simpler, dearer choice)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fd: int | None = None
        self.size = 0
        self.serial = 0

    def _start(self) -> int:
        self.close()
        self.serial += 1
        fd = os.open(self._path(), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        write_all(fd, (MAGIC,), 0)
        self.fd, self.size = fd, len(MAGIC)
        return fd

    def _path(self) -> Path:
        return self.directory / f"{self.serial:012d}.seg"

    def write(self, parts: list[bytes], size: int) -> None:
        fd = self.fd
        if fd is None or self.size + size > SEGMENT_BYTES:
            fd = self._start()
        write_all(fd, parts, self.size)
        self.size += size

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            os.unlink(self._path())
            self.fd = None


def preparer(rules: RuleSet, payload: Payload) -> Callable[[bytes], Prepared]:
    """prepare() of one body of `payload`, as the ingest route of its path does it."""
    shape = routes()[payload.path]

    def prepare(body: bytes) -> Prepared:
        return _prepare_request(rules, body, WRITE_KEY, shape, None, None, FORWARDED_FOR)

    return prepare


def _prepare_frame_and_write(rules: RuleSet, payload: Payload, seconds: float) -> dict[str, float]:
    """prepare(), the spool framing of its records and their write, per event of `payload`, as the ingest route of its path does them."""
    prepare = preparer(rules, payload)
    prepared = {id(body): prepare(body).submission for body in payload.bodies}

    def frame(body: bytes) -> None:  # the record's head and crc32, its events joined: what the spool's writev sends
        done = prepared[id(body)]
        for chunk in (*done.primary.values(), *done.mirror.values()):
            frame_record(1.0, "key", None, chunk.events)

    tag = tag_of(1)  # the segment's tag each record carries (format 4)
    writes = {id(body): [(name, [part for one in frames for part in one.parts(tag)], sum(one.size for one in frames))
                         for name, frames in _records(prepared[id(body)])] for body in payload.bodies}
    pieces = {PREPARE: per_event(prepare, payload.bodies, seconds, payload.events), FRAMING: per_event(frame, payload.bodies, seconds, payload.events)}
    # beside the bench's spool: a fresh temporary directory (loadtest/process.py, tempfile.mkdtemp)
    directory = Path(tempfile.mkdtemp(prefix="splitter-floor-"))
    files = {name: SegmentWriter(directory / name) for name in rules.destinations}
    for one in files.values():
        one.directory.mkdir()

    def write(body: bytes) -> None:
        for name, parts, size in writes[id(body)]:
            files[name].write(parts, size)

    try:
        pieces[WRITE] = per_event(write, payload.bodies, seconds, payload.events)
    finally:
        for one in files.values():
            one.close()
            one.directory.rmdir()
        directory.rmdir()
    return pieces


def send_plan(rules: RuleSet, batch: Payload, receivers: Receivers, seconds: float) -> dict[str, Any]:
    """What `--send` POSTs: per destination, the load's records in the order splitter spools them, cut into
    the upstream batches its sender makes (`upstream_batches` with the destination's delivery options)."""
    prepare = preparer(rules, batch)
    records: dict[str, list[Frame]] = {name: [] for name in rules.destinations}
    for body in batch.bodies:
        for name, frames in _records(prepare(body).submission):
            records[name] += frames
    urls = {"segment": receivers.segment, "rudderstack": receivers.rudderstack}
    destinations = []
    for name, frames in records.items():
        if not frames:
            continue
        options = DeliveryOptions.from_mapping(rules.destinations[name].options)
        batches = [{"credential": one.credential, "forwarded_for": one.forwarded_for, "parts": [part.decode() for part in one.parts], "events": one.count}
                   for one in upstream_batches([frame.record(1) for frame in frames], options.batch_max_events, options.batch_max_bytes)]
        destinations.append({"name": name, "url": urls[rules.destinations[name].kind], "timeout": rules.destinations[name].timeout,
                             "max_in_flight": options.max_in_flight, "batches": batches})
    return {"events": len(batch.bodies) * batch.events, "seconds": seconds, "destinations": destinations}


def send_row(plan: dict[str, Any]) -> dict[str, Any]:
    """`python -m loadtest.floor --send` on the proxy core with `plan`; its report (bounded: it ends within its seconds plus a margin)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".json", prefix="splitter-floor-send-") as file:
        file.write(orjson.dumps(plan))
        file.flush()
        finished = subprocess.run([*pin(PROXY_CORE), sys.executable, "-m", "loadtest.floor", "--send", file.name],
                                  capture_output=True, text=True, timeout=plan["seconds"] + 60, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"loadtest.floor --send failed ({finished.returncode}): {finished.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(finished.stdout.strip().splitlines()[-1])
    return result


async def run_sends(plan: dict[str, Any]) -> dict[str, Any]:
    """The `--send` process: the plan's batches POSTed once to warm the connections, then pass after pass for the plan's
    seconds, the destinations at once, `max_in_flight` requests at once each; the best pass's CPU per event of the load."""
    destinations = []
    for spec in plan["destinations"]:
        session = aiohttp.ClientSession(  # as proxy/delivery/upstream.py's Upstream makes it
            connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=30, ttl_dns_cache=60),
            timeout=aiohttp.ClientTimeout(total=spec["timeout"]), headers={"User-Agent": USER_AGENT}, skip_auto_headers=("Accept-Encoding",))
        batches = [(one["credential"], one["forwarded_for"], [part.encode() for part in one["parts"]]) for one in spec["batches"]]
        destinations.append((session, spec["url"] + "/v1/batch", spec["max_in_flight"], batches))
    refused = 0

    async def post(session: aiohttp.ClientSession, url: str, credential: str, forwarded_for: str | None, parts: list[bytes]) -> None:
        nonlocal refused
        body = b'{"batch":[' + b",".join(parts) + b"]}"  # Batch.body()
        headers = {"Content-Type": "application/json", "Authorization": basic_auth(credential)}
        if forwarded_for:
            headers["X-Forwarded-For"] = forwarded_for
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
            await read_bounded(response, MAX_ANSWER_BYTES)
            refused += not 200 <= response.status < 300

    async def destination(session: aiohttp.ClientSession, url: str, in_flight: int, batches: list[tuple[str, str | None, list[bytes]]]) -> None:
        todo = iter(batches)

        async def worker() -> None:
            for credential, forwarded_for, parts in todo:
                await post(session, url, credential, forwarded_for, parts)

        await asyncio.gather(*(worker() for _ in range(in_flight)))

    async def one_pass() -> float:
        started = time.process_time()
        await asyncio.gather(*(destination(*one) for one in destinations))
        return time.process_time() - started

    try:
        await one_pass()  # warm-up: connections, caches
        best, passes = float("inf"), 0
        deadline = time.perf_counter() + plan["seconds"]
        while True:
            best, passes = min(best, await one_pass()), passes + 1
            if time.perf_counter() >= deadline:
                break
    finally:
        for session, *_ in destinations:
            await session.close()
    requests = sum(len(batches) for *_, batches in destinations)
    copies = sum(one["events"] for spec in plan["destinations"] for one in spec["batches"])
    return {"name": SEND, "cpu_us_per_event": best / plan["events"] * 1e6, "events": plan["events"], "copies": copies, "requests_per_pass": requests,
            "events_per_request": copies / requests, "passes": passes, "non_2xx": refused,
            "destinations": {spec["name"]: len(spec["batches"]) for spec in plan["destinations"]}}


def in_process_rows(rules: RuleSet, batch: Payload, seconds: float) -> dict[str, float]:
    source = rules.source_for_key(WRITE_KEY)
    assert source is not None
    ctx = EventContext(source.name)
    parsed = {id(body): orjson.loads(body)["batch"] for body in batch.bodies}
    with on_proxy_core():
        return {
            "orjson parse": per_event(orjson.loads, batch.bodies, seconds),
            "orjson encode per event": per_event(lambda body: [orjson.dumps(event) for event in parsed[id(body)]], batch.bodies, seconds),
            "shared_decision() per event": per_event(lambda body: [shared_decision(rules, event, ctx) for event in parsed[id(body)]],
                                                     batch.bodies, seconds),
            **_prepare_frame_and_write(rules, batch, seconds),
        }


def single_rows(rules: RuleSet, singles: dict[str, Payload], seconds: float) -> dict[str, dict[str, float]]:
    """prepare(), framing and the spool write per single call, for each single path."""
    with on_proxy_core():
        return {path: _prepare_frame_and_write(rules, payload, seconds) for path, payload in singles.items()}


def floors(http: dict[str, dict[str, Any]], pieces: dict[str, float], single_pieces: dict[str, dict[str, float]],
           send: float) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The floor's pieces: for batches per event, for each single path per request (= per event; the upstream send is
    batched across single calls by the sender, so a single call's share is the batched send's cost per event)."""
    def floor_of(port: float, parts: dict[str, float]) -> dict[str, float]:
        return {PORT_ROW: port, PREPARE: parts[PREPARE], FRAMING: parts[FRAMING], WRITE: parts[WRITE], SEND: send}

    port_single = http[f"{PORT_ROW}, single"]["cpu_us_per_request"]
    return floor_of(http[PORT_ROW]["cpu_us_per_event"], pieces), {path: floor_of(port_single, parts) for path, parts in single_pieces.items()}


def verdicts(floor: float, single_floors: dict[str, float], forwarder_us: float | None) -> list[dict[str, Any]]:
    """Each CPU target of the issue against the floor: a limit under the floor cannot be met by any splitter on this stack."""
    def row(target: str, limit: float, floor_us: float, note: str) -> dict[str, Any]:
        below = floor_us > limit
        room = (f"the floor alone is over it by {floor_us - limit:.2f} µs" if below
                else f"leaves {limit - floor_us:.2f} µs for {ON_TOP}")
        return {"target": target, "limit_us": limit, "floor_us": floor_us, "below_floor": below, "note": f"{note}{'; ' if note else ''}{room}"}

    rows = [row(f"batch, interval: ≤ {CPU_PER_EVENT_US['interval']:g} µs proxy CPU/event", CPU_PER_EVENT_US["interval"], floor, "")]
    if forwarder_us is not None:
        rows.append(row(f"batch, interval: ≤ {FORWARDER_RATIO:g}× the forwarder's CPU/event", forwarder_us * FORWARDER_RATIO, floor,
                        f"forwarder {forwarder_us:.2f} µs × {FORWARDER_RATIO:g}"))
    rows.append(row(f"batch, fsync: ≤ {CPU_PER_EVENT_US['fsync']:g} µs proxy CPU/event", CPU_PER_EVENT_US["fsync"], floor, ""))
    rows += [row(f"single {path}: ≤ {CPU_PER_SINGLE_US:g} µs CPU/request", CPU_PER_SINGLE_US, single, "") for path, single in single_floors.items()]
    return rows


def render(result: dict[str, Any]) -> str:
    pinned = f"servers on core {PROXY_CORE}, wrk on core {LOAD_CORE}" if pinning_available() else "no taskset: nothing pinned"
    lines = [f"floor: batches of {BATCH} events and single calls, rules/bench.yaml ({pinned})", "",
             f"{'over HTTP':<52} {'payload':<17} {'events/s':>10} {'CPU µs/req':>11} {'CPU µs/ev':>10}"]
    for row in result["http"]:
        per_request = "–" if row["cpu_us_per_request"] is None else f"{row['cpu_us_per_request']:.1f}"
        per_event_text = "–" if row["cpu_us_per_event"] is None else f"{row['cpu_us_per_event']:.2f}"
        lines.append(f"{row['name']:<52} {row['payload']:<17} {row['events_per_s']:>10,.0f} {per_request:>11} {per_event_text:>10}")
    lines += ["", f"{'in process, per event':<52} {'batch':>17}" + "".join(f" {'single ' + path:>17}" for path in result["single_in_process_us"])]
    for name, value in result["in_process_us_per_event"].items():
        singles = "".join(f" {parts[name]:>17.2f}" if name in parts else f" {'':>17}" for parts in result["single_in_process_us"].values())
        lines.append(f"{name:<52} {value:>17.2f}{singles}")
    send = result["upstream_send"]
    lines += ["", f"{SEND + ', per event of the load':<52} {send['cpu_us_per_event']:>17.2f}  ({send['copies']:,} copies of {send['events']:,} events "
                  f"in {send['requests_per_pass']} POSTs, {send['events_per_request']:.0f} events each; best of {send['passes']} passes)"]
    single_text = ", ".join(f"single {path} {value:.1f} µs/request" for path, value in result["single_floor_us"].items())
    lines += ["", f"floor = {FLOOR_SUM}: batch {result['floor_us_per_event']:.2f} µs/event, {single_text} "
                  f"({ON_TOP} on top)", ""]
    for row in result["targets"]:
        lines.append(f"{'BELOW THE FLOOR' if row['below_floor'] else 'above the floor':<16} {row['target']:<51} "
                     f"limit {row['limit_us']:.2f} µs, floor {row['floor_us']:.2f} µs ({row['note']})")
    return "\n".join(lines)


@dataclass(frozen=True)
class Shared:
    """What `loadtest.bench` already has when it measures the floor in its own run: its receivers, rules, auth, payloads,
    and its forwarder batch row (measured the same way: wrk, CPU from /proc), so direct and the forwarder are not run twice."""

    receivers: Receivers
    rules: RuleSet
    auth: str
    batch: Payload
    singles: dict[str, Payload]
    forwarder: dict[str, Any] | None  # None: the forwarder is measured here


async def measure(seconds: float, shared: Shared | None = None, in_process_seconds: float = IN_PROCESS_SECONDS) -> dict[str, Any]:
    """Every piece of the floor (`seconds` per HTTP run, at most `in_process_seconds` per in-process piece); on its own (no `shared`)
    with its own receivers, direct and forwarder."""
    own = shared is None
    if shared is None:
        receivers, _, rules, bodies, auth = prepare_load()
        shared = Shared(receivers, rules, auth, batch_payload(bodies), {path: single_payload(rules, path) for path in SINGLE_PATHS}, None)
    receivers, rules, auth, batch, singles = shared.receivers, shared.rules, shared.auth, shared.batch, shared.singles
    http: dict[str, dict[str, Any]] = {}
    try:
        if own:
            http["direct"] = http_row("direct", receivers.segment, [], batch, auth, seconds)
        for args, name, payload in (
                (("loadtest.baselines.sink", "--kind", "aiohttp"), "aiohttp, read and answer", batch), (("loadtest.floor", "--serve"), PORT_ROW, batch),
                (("loadtest.floor", "--serve"), f"{PORT_ROW}, single", singles[SINGLE_PORT_PATH]),
                (("loadtest.baselines.sink", "--kind", "bare"), "bare asyncio protocol", batch)):
            with pinned_server(*args) as (url, pid):
                http[name] = http_row(name, url, [pid], payload, auth, seconds)
        send = send_row(send_plan(rules, batch, receivers, seconds))
        if shared.forwarder is None:
            async with subjects.forwarder(receivers) as running:
                http[FORWARDER] = http_row(FORWARDER, running.url, running.pids(), batch, auth, seconds)
        else:
            http[FORWARDER] = {"name": FORWARDER, "payload": batch.name,
                               **{key: shared.forwarder[key] for key in ("events_per_s", "cpu_us_per_request", "cpu_us_per_event", "non_2xx")},
                               "from": "loadtest.bench's forwarder row"}
    finally:
        if own:
            receivers.stop()
    in_process_seconds = min(seconds, in_process_seconds)
    pieces = in_process_rows(rules, batch, in_process_seconds)
    single_pieces = single_rows(rules, singles, in_process_seconds)
    floor_pieces, single_floor_pieces = floors(http, pieces, single_pieces, send["cpu_us_per_event"])
    floor = sum(floor_pieces.values())
    single_floors = {path: sum(parts.values()) for path, parts in single_floor_pieces.items()}
    return {"http": list(http.values()), "in_process_us_per_event": pieces, "single_in_process_us": single_pieces, "upstream_send": send,
            "floor_pieces": floor_pieces, "single_floor_pieces": single_floor_pieces, "floor_us_per_event": floor, "single_floor_us": single_floors,
            "targets": verdicts(floor, single_floors, http[FORWARDER]["cpu_us_per_event"]), "pinned": pinning_available()}


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
    parser.add_argument("--send", type=Path, help=argparse.SUPPRESS)  # the upstream sends of a plan (send_plan), measured by the run
    args = parser.parse_args()
    if args.send:
        import uvloop

        print(json.dumps(uvloop.run(run_sends(orjson.loads(args.send.read_bytes())))), flush=True)
        return 0
    if args.serve:
        import uvloop

        uvloop.run(serve_ingest_port())
        return 0
    result = asyncio.run(measure(args.seconds))
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    unanswered = [row["name"] for row in (*result["http"], result["upstream_send"]) if row["non_2xx"]]
    if unanswered:
        print(f"non-2xx answers from: {', '.join(unanswered)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
