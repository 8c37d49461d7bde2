"""The request bodies of the side-by-side benchmark, and what splitter must deliver for them.

Two kinds: batches of 50 events from distinct users (~30 KB, balanced so that each fans out the
same way) and single calls (~600 B) to `/v1/t` and `/v1/track` from varied users, some known by
userId, some by anonymousId, some both, each with its own messageId, so the cohort split is
exercised per request. Each payload records per body how many events splitter delivers to each
receiver, so a run's delivery can be checked exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import orjson

from loadtest.harness import balanced_batches, event
from proxy.engine import EventContext, RuleSet, decide

SOURCE = "web"
BATCH, RUDDER_SHARE = 50, 15  # per batch: 15 events to RudderStack (30 % split), all 50 to Segment (primary + mirror)
SINGLE_PATHS = ("/v1/t", "/v1/track")


@dataclass(frozen=True)
class Payload:
    name: str  # "batch", "single /v1/t", ...
    path: str
    bodies: list[bytes]
    events: int  # per request
    fanout: list[tuple[int, int]]  # per body: events splitter delivers to (Segment, RudderStack)

    @property
    def segment_total(self) -> int:
        return sum(s for s, _ in self.fanout)

    @property
    def rudder_total(self) -> int:
        return sum(r for _, r in self.fanout)

    @property
    def body_bytes(self) -> int:
        return sum(map(len, self.bodies)) // len(self.bodies)


def batch_bodies(rules: RuleSet, count: int) -> list[bytes]:
    """`count` balanced batch bodies from source `web`: each sends RUDDER_SHARE of its BATCH events to RudderStack under `rules/bench.yaml`."""
    return [orjson.dumps({"batch": batch}) for batch in balanced_batches(rules, count, BATCH, RUDDER_SHARE, SOURCE)]


def batch_payload(bodies: list[bytes]) -> Payload:
    """The balanced batches of bench_delivery.prepare_load: each sends RUDDER_SHARE of its events to RudderStack."""
    return Payload("batch", "/v1/batch", bodies, BATCH, [(BATCH, RUDDER_SHARE)] * len(bodies))


def single_event(rng: random.Random, i: int) -> dict[str, Any]:
    """A track call of ~600 B: a third by userId only, a third anonymous, a third both."""
    body = event(f"a-{rng.getrandbits(48):x}", i)
    body["messageId"] = f"single-{rng.getrandbits(64):x}"
    if i % 3 == 0:
        body["userId"] = f"user-{rng.getrandbits(32):x}"
        del body["anonymousId"]
    elif i % 3 == 1:
        body["userId"] = f"user-{rng.getrandbits(32):x}"
    return body


def single_payload(rules: RuleSet, path: str, count: int = 2000, seed: int = 5) -> Payload:
    rng = random.Random(seed)
    ctx = EventContext(SOURCE)
    bodies, fanout = [], []
    for i in range(count):
        body = single_event(rng, i)
        decision = decide(rules, body, ctx)
        targets = {*decision.primary, *decision.mirror}
        bodies.append(orjson.dumps(body))
        fanout.append((int("segment" in targets), int("rudderstack" in targets)))
    return Payload(f"single {path}", path, bodies, 1, fanout)


def _prefix(payload: Payload, count: int) -> tuple[int, int]:
    """Events the first `count` requests (bodies in list order, cycling) fan out to (Segment, RudderStack)."""
    rounds, rest = divmod(max(0, count), len(payload.fanout))
    seg = rounds * payload.segment_total + sum(s for s, _ in payload.fanout[:rest])
    return seg, rounds * payload.rudder_total + sum(r for _, r in payload.fanout[:rest])


def delivered(payload: Payload, segment: int, rudder: int, answered: int, in_flight: int) -> tuple[bool, bool]:
    """(every event arrived, and exactly so) for a run where `answered` requests got 200 and up to
    `in_flight` more were sent when the generator stopped (splitter read and delivers those too).

    Every body sends each of its events to Segment once (as primary or mirror), so Segment's count
    says how many requests K were delivered, exactly. wrk and the open-loop generator send bodies in
    list order, so the K are the first K sent but for at most `in_flight` still-unanswered ones:
    when every body fans out alike (batches), or nothing was in flight (the open-loop generator waits
    for every answer), RudderStack's count is exact too; otherwise it must lie within what the first
    K - in_flight and K + in_flight bodies send there.
    """
    requests, remainder = divmod(segment, payload.events)
    if remainder or not answered <= requests <= answered + in_flight:
        return False, False
    if len(set(payload.fanout)) == 1:
        low = high = _prefix(payload, requests)[1]
    else:
        low, high = _prefix(payload, requests - in_flight)[1], _prefix(payload, requests + in_flight)[1]
    complete = low <= rudder <= high
    return complete, complete and low == high
