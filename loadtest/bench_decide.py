"""How fast is `decide()`? Decisions per second for a realistic 10-rule file, one core.

Side by side in one run with the floor a decision cannot beat (computing the cohort bucket of the
same events with mmh3 and nothing else), so the ratio means something on a noisy shared machine.
Target from the issue: over 300k decisions/s. Run: `python -m loadtest.bench_decide [--seconds S]`.

The events reach `decide()` the way they reach the proxy's routing: a batch of 50 is parsed from its
JSON, then its events are decided while they are fresh in the CPU's caches (only the deciding is
timed). Unlike the proxy, which calls `shared_decision()` with one context per request, each event
here comes with its own source, to exercise every rule. The same 50,000 events built once and decided
over and over measure the machine's memory instead: on a 2-vCPU VM whose caches hold a few thousand
of them, that took 40 % fewer decisions per second and 40 % fewer bare hashes. That figure is
printed too, as `cold`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from proxy.engine import EventContext, bucket, decide, load_rules

RULES = Path(__file__).resolve().parent / "rules" / "bench.yaml"
TARGET = 300_000
BATCH = 50  # events per request, as the proxy's batch benchmarks send them


def sample_events(count: int, seed: int = 7) -> list[tuple[dict[str, Any], EventContext]]:
    """Varied events: types, names, versions, countries and sources in realistic proportions."""
    rng = random.Random(seed)
    names = ["Product Viewed", "Checkout Started", "Order Completed", "Signed Up", "Payment Failed", "Search"]
    samples = []
    for i in range(count):
        event: dict[str, Any] = {
            "type": rng.choice(["track"] * 6 + ["page", "screen", "identify"]),
            "anonymousId": f"anon-{rng.randrange(1_000_000)}",
            "messageId": f"m-{i}",
            "context": {
                "app": {"version": rng.choice(["3.9.1", "4.2.0", "4.10.2 (812)", "5.0.0-beta.2", "2.1"])},
                "os": {"name": rng.choice(["iOS", "Android", "Mac OS"])},
                "library": {"name": rng.choice(["analytics.js", "analytics-ios", "analytics-python"])},
                "location": {"country": rng.choice(["US", "DE", "GB", "BR", "IN", "FR"])},
            },
        }
        if event["type"] == "track":
            event["event"] = rng.choice(names)
        if rng.random() < 0.5:
            event["userId"] = f"user-{rng.randrange(500_000)}"
        ctx = EventContext(source=rng.choice(["web", "web", "ios", "backend"]), region="us-east-1")
        samples.append((event, ctx))
    return samples


Pass = Callable[[], tuple[int, float]]  # one pass over the events: (how many, seconds spent on them)


def measure(fn: Pass, seconds: float) -> float:
    """Operations per second of `fn`, best of repeated passes."""
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        done, spent = fn()
        best = max(best, done / spent)
    return best


Work = Callable[[list[Any], list[EventContext]], None]  # decides (or hashes) every event of a list


def built_once(samples: list[tuple[dict[str, Any], EventContext]], work: Work) -> Pass:
    """A pass of `work` over every event at once, the same objects every pass: the `cold` figures."""
    events, contexts = [event for event, _ in samples], [ctx for _, ctx in samples]

    def run() -> tuple[int, float]:
        start = time.perf_counter()
        work(events, contexts)
        return len(events), time.perf_counter() - start
    return run


def fresh_batches(samples: list[tuple[dict[str, Any], EventContext]], work: Work) -> Pass:
    """A pass that parses each batch of `BATCH` events from JSON and times only `work` on them,
    while the parsed events are in the caches, as in the proxy."""
    chunks = [samples[start:start + BATCH] for start in range(0, len(samples), BATCH)]
    batches = [(orjson.dumps([event for event, _ in chunk]), [ctx for _, ctx in chunk]) for chunk in chunks]

    def run() -> tuple[int, float]:
        spent = 0.0
        for body, contexts in batches:
            events = orjson.loads(body)
            start = time.perf_counter()
            work(events, contexts)
            spent += time.perf_counter() - start
        return len(samples), spent
    return run


def summary(result: dict[str, Any]) -> str:
    """The figures on one line, as `loadtest.bench` prints them under its table."""
    return (f"decide(): {result['decisions_per_second']:,}/s over {result['rules']} rules, batches of {BATCH} freshly parsed; "
            f"a bare mmh3 bucket {result['hash_only_per_second']:,}/s; cold (the events built once): {result['cold_decisions_per_second']:,}/s, "
            f"a bare hash {result['cold_hash_only_per_second']:,}/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement: twice that for the fresh batches' pair, half for the cold pair")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    rules = load_rules(str(RULES), os.environ)
    samples = sample_events(50_000)

    def decide_each(events: list[Any], contexts: list[EventContext]) -> None:
        for event, ctx in zip(events, contexts, strict=True):
            decide(rules, event, ctx)

    def hash_each(events: list[Any], _: list[EventContext]) -> None:
        for event in events:
            bucket("segment-to-rudderstack", event["anonymousId"])

    # The judged pair gets twice the time, the best of more passes on a machine whose speed moves by
    # a third between seconds; the cold pair, printed for comparison, half.
    floor = measure(fresh_batches(samples, hash_each), 2 * args.seconds)
    decisions = measure(fresh_batches(samples, decide_each), 2 * args.seconds)
    cold_floor = measure(built_once(samples, hash_each), args.seconds / 2)
    cold = measure(built_once(samples, decide_each), args.seconds / 2)
    result = {
        "rules": len(rules.rules),
        "decisions_per_second": round(decisions),
        "hash_only_per_second": round(floor),
        "decide_cost_vs_hash_only": round(floor / decisions, 2),
        "cold_decisions_per_second": round(cold),
        "cold_hash_only_per_second": round(cold_floor),
        "target_decisions_per_second": TARGET,
        "meets_target": decisions >= TARGET,
    }
    print(summary(result))
    print(f"target > {TARGET:,}/s: {'met' if decisions >= TARGET else 'NOT met'}; a decision costs {floor / decisions:.2f}x a bare hash")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
