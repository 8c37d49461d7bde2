"""How fast is `decide()`? Decisions per second for a realistic 10-rule file, one core.

Side by side in one run with the floor a decision cannot beat (computing the cohort bucket of the
same events with mmh3 and nothing else), so the ratio means something on a noisy shared machine.
Target from the issue: over 300k decisions/s. Run: `python -m loadtest.bench_decide [--seconds S]`.
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

from proxy.engine import EventContext, bucket, decide, load_rules

RULES = Path(__file__).resolve().parent / "rules" / "bench.yaml"
TARGET = 300_000


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


def measure(fn: Callable[[], int], seconds: float) -> float:
    """Operations per second of `fn` (which returns how many it did), best of repeated passes."""
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        done = fn()
        best = max(best, done / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement (bounded)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    rules = load_rules(str(RULES), os.environ)
    samples = sample_events(50_000)

    def decide_all() -> int:
        for event, ctx in samples:
            decide(rules, event, ctx)
        return len(samples)

    def hash_only() -> int:
        for event, _ in samples:
            bucket("segment-to-rudderstack", event["anonymousId"])
        return len(samples)

    floor = measure(hash_only, args.seconds)
    decisions = measure(decide_all, args.seconds)
    result = {
        "rules": len(rules.rules),
        "decisions_per_second": round(decisions),
        "hash_only_per_second": round(floor),
        "decide_cost_vs_hash_only": round(floor / decisions, 2),
        "target_decisions_per_second": TARGET,
        "meets_target": decisions >= TARGET,
    }
    print(f"decide(): {decisions:,.0f} decisions/s over {len(rules.rules)} rules (target > {TARGET:,}: {'met' if decisions >= TARGET else 'NOT met'})")
    print(f"floor (mmh3 bucket only): {floor:,.0f}/s; a decision costs {floor / decisions:.2f}x a bare hash")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
