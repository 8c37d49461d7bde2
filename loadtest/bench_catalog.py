"""What the event catalog costs per event on the request path, in process, before and after.

The catalog's per-event work happens in `prepare()` (the event's name joins the routing count it
already makes; the first event of a name in a request may be sampled for its property paths) and
once per request after the events are accepted (the request's counts merged into the catalog).
This times exactly that work: `_prepare_request()` (parse, validate, route, encode, file), the
routing counts into the metrics, and the catalog's merge, per event, best of repeated passes,
pinned to the proxy core like `loadtest.floor`.

Run it on two checkouts in one sitting to compare (a tree without the catalog times the same work
without it): `python -m loadtest.bench_catalog [--seconds S]`, e.g. from a `git archive` of the
commit before, with `PYTHONPATH=that/tree`. Two payloads: `bench` is `bench_delivery`'s (one event
name, the balanced batches of 50), `varied` has 40 names over track, page, screen and identify with
properties of changing types, so sampling and the merge see many names per request.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

import proxy
from loadtest.floor import on_proxy_core
from loadtest.payloads import BATCH, batch_bodies
from proxy.engine import RuleSet, load_rules
from proxy.ingress.handlers import _prepare_request
from proxy.ingress.prepare import CallShape, prepare
from proxy.metrics import Metrics

RULES = Path(__file__).resolve().parent / "rules" / "bench.yaml"
WRITE_KEY = "bench-web-key"

try:  # absent from a checkout before the catalog (or before its request path): the same work is then timed without it
    from proxy.observe.catalog import Catalog
except ImportError:  # pragma: no cover - only when timing an older tree
    Catalog = None  # type: ignore[assignment,misc]
if "catalog" not in inspect.signature(prepare).parameters:  # pragma: no cover - as above
    Catalog = None  # type: ignore[assignment,misc]


def varied_batches(count: int, seed: int = 3) -> list[list[dict[str, Any]]]:
    """Batches of 50 events from 40 names (track, page, screen, identify); `price` is sometimes a string."""
    rng = random.Random(seed)
    names = [("track", f"Event {i}") for i in range(30)] + [("page", f"Page {i}") for i in range(5)] + [("screen", f"Screen {i}") for i in range(4)]
    names.append(("identify", "identify"))
    batches = []
    for b in range(count):
        batch = []
        for i in range(BATCH):
            event_type, name = rng.choice(names)
            event: dict[str, Any] = {"type": event_type, "anonymousId": f"a{b}-{i}-{rng.getrandbits(32):x}", "messageId": f"m{b}-{i}",
                                     "context": {"app": {"version": "4.3.0"}, "library": {"name": "analytics.js", "version": "5.0"}, "ip": "10.0.0.1"}}
            if event_type == "identify":
                event["traits"] = {"email": "x@example.com", "plan": "team", "age": rng.randint(18, 90)}
            else:
                event["event" if event_type == "track" else "name"] = name
                event["properties"] = {"price": rng.choice([19.99, 5, "19.99"]), "sku": f"s-{i}", "tags": ["a", "b"],
                                       "cart": {"items": rng.randint(1, 5), "currency": "EUR"}}
            batch.append(event)
        batches.append(batch)
    return batches


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


def request_work(rules: RuleSet, with_catalog: bool) -> Callable[[bytes], object]:
    """One request's synchronous work as the ingest handler does it, with or without the catalog."""
    metrics = Metrics()
    shape = CallShape(True)
    catalog = Catalog() if with_catalog and Catalog is not None else None

    def work(body: bytes) -> None:
        if catalog is None:
            prepared = _prepare_request(rules, body, WRITE_KEY, shape, None, None, "10.0.0.1")
        else:
            prepared = _prepare_request(rules, body, WRITE_KEY, shape, None, None, "10.0.0.1", catalog=catalog)
        for labels, count in prepared.routed_labels("web"):
            metrics.child(metrics.events, *labels).inc(count)
        if catalog is not None:
            catalog.record(rules.catalog, "web", prepared.routed, prepared.sampled)

    return work


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    args = parser.parse_args()
    rules = load_rules(str(RULES), {"SPLITTER_WRITE_KEY": WRITE_KEY})
    payloads = {
        "bench": batch_bodies(rules, 200),
        "varied": [orjson.dumps({"batch": b}) for b in varied_batches(200)],
    }
    variants = {"without catalog": False} if Catalog is None else {"without catalog": False, "with catalog": True}
    results: dict[str, dict[str, float]] = {name: {} for name in payloads}
    with on_proxy_core():
        for _ in range(args.rounds):
            for payload, bodies in payloads.items():
                for variant, on in variants.items():
                    work = request_work(rules, on)
                    for body in bodies[:20]:  # warm-up: the catalog learns the names, the rules their caches
                        work(body)
                    value = per_event(work, bodies, args.seconds)
                    results[payload][variant] = min(results[payload].get(variant, float("inf")), value)
    tree = Path(proxy.__file__).resolve().parent.parent
    print(f"catalog cost per event (CPU µs, best of {args.rounds} rounds of {args.seconds:g} s; tree {tree})")
    for payload, row in results.items():
        cells = "  ".join(f"{variant}: {value:.3f}" for variant, value in row.items())
        extra = f"  difference: {row['with catalog'] - row['without catalog']:+.3f}" if len(row) == 2 else ""
        print(f"{payload:<8} {cells}{extra}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
