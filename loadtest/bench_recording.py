"""What recording traffic (the rules' `record:`) costs per event, in process: on the request path, and in the writer.

The request path's share is what `serve` does per request in its synchronous part: `_prepare_request()`
(parse, validate, route, encode, file) and, when the rules record, a `Pick` (a cohort hash per event
with the recording's salt) offered to the recorder's queue. Timed with recording off (no `record:`:
one attribute read per request), and on at 1 % and 100 % of users, per event, best of repeated
passes, pinned to the proxy core like `loadtest.floor`. The writer's share (PII hashed, encoded,
gzip-compressed and written, in its thread, off the request path) is timed per recorded event.

`python -m loadtest.bench_recording [--seconds S]`. Payload: `bench_delivery`'s balanced batches of 50.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from loadtest.floor import on_proxy_core, per_event
from loadtest.payloads import batch_bodies
from proxy.engine import EventContext, RuleSet, compile_rules, load_rules
from proxy.ingress.handlers import _prepare_request
from proxy.ingress.prepare import CallShape
from proxy.metrics import Metrics
from proxy.observe.recording import Pick, Recorder, Writer

RULES = Path(__file__).resolve().parent / "rules" / "bench.yaml"
WRITE_KEY = "bench-web-key"
ENV = {"SPLITTER_WRITE_KEY": WRITE_KEY, "PII_SALT": "bench-salt"}
RECORD = 'record: {{percent: {percent}, salt: bench-recording, queue: 1000000, hash: [context.traits.email, traits.email], hash_salt: "${{PII_SALT}}"}}\n'


def with_recording(percent: float) -> RuleSet:
    return compile_rules(RULES.read_text() + RECORD.format(percent=percent), filename=str(RULES), env=ENV)


DRAIN_EVERY = 20  # requests: the writer takes the queue every 50 ms (LINGER), 20 batches of 50 at 20k events/s


def request_work(rules: RuleSet) -> Callable[[bytes], object]:
    """One request's synchronous work as the ingest handler does it. The queue is handed over (dropped here) every
    `DRAIN_EVERY` requests as the writer takes it: the picked events live as long as they would while serving."""
    shape = CallShape(True)
    recorder, requests = Recorder(tempfile.gettempdir()), 0

    def work(body: bytes) -> None:
        nonlocal recorder, requests
        pick = Pick(rules.recording) if rules.recording is not None else None
        _prepare_request(rules, body, WRITE_KEY, shape, None, None, "10.0.0.1", None, None, pick=pick)
        if pick is not None:
            recorder.offer(pick)
            requests += 1
            if requests % DRAIN_EVERY == 0:
                recorder = Recorder(tempfile.gettempdir())

    return work


def writer_work(rules: RuleSet, bodies: list[bytes], directory: Path) -> float:
    """CPU µs per recorded event of the writer: hash, encode, compress and write every event of `bodies` (100 %)."""
    settings = rules.recording
    assert settings is not None
    picks = []
    for body in bodies:
        pick = Pick(settings)
        pick.choose(orjson.loads(body)["batch"], EventContext("web"), set())
        picks.append(pick)
    events = sum(len(pick.events) for pick in picks)
    writer = Writer(directory, Metrics())
    started = time.process_time()
    for start in range(0, len(picks), 20):  # as the task hands them over: a batch of requests at a time
        writer.write(picks[start:start + 20], settings)
    writer.write([], None, final=True)
    return (time.process_time() - started) / events * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    args = parser.parse_args()
    base = load_rules(str(RULES), ENV)
    bodies = batch_bodies(base, 200)
    variants = {"off": base, "on, 1 %": with_recording(1), "on, 10 %": with_recording(10), "on, 100 %": with_recording(100)}
    results: dict[str, float] = {}
    with on_proxy_core():
        for _ in range(args.rounds):
            for name, rules in variants.items():
                work = request_work(rules)
                for body in bodies[:20]:
                    work(body)
                results[name] = min(results.get(name, float("inf")), per_event(work, bodies, args.seconds))
        with tempfile.TemporaryDirectory(prefix="bench-recording-") as scratch:
            writer = min(writer_work(variants["on, 100 %"], bodies, Path(scratch) / f"r{i}") for i in range(args.rounds))
            written = sum(p.stat().st_size for p in Path(scratch).rglob("*.gz")) / args.rounds
    raw = sum(len(body) for body in bodies)
    print(f"recording cost per event (CPU µs, best of {args.rounds} rounds of {args.seconds:g} s; request path = _prepare_request + pick + offer)")
    for name, value in results.items():
        extra = f"  (+{value - results['off']:.3f} over off)" if name != "off" else ""
        print(f"request path, recording {name:<10} {value:.3f}{extra}")
    print(f"writer (its thread, per recorded event: hash, encode, gzip, write) {writer:.3f}; compressed to {written / raw:.1%} of the request bytes")
    print(json.dumps({**results, "writer": writer}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
