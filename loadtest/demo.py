"""`make demo`: the proxy on the bundled rules, real stand-in receivers, sample traffic, the split.

Starts a Segment and a RudderStack stand-in on loopback, runs `splitter serve` as a real process on
`rules/default.yaml` pointed at them, sends a few thousand events from many users (batches from a
server SDK and single calls as analytics.js sends them), then prints what each destination received
against what the rules promise, and stops everything with SIGTERM. Bounded: it ends on its own.

While it runs it prints the address of the admin console (`GET /` on the admin port). With `--keep`
(`make demo KEEP=1`) it stays up after the sample traffic, sending a trickle of events so the
console's numbers move, until Ctrl-C; then it reports as usual.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from loadtest.process import launch_splitter
from loadtest.receivers import start_receiver
from proxy.engine import EventContext, decide, load_rules

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules" / "default.yaml"
WRITE_KEY = "demo-sdk-write-key"
RUDDER_KEY = "demo-rudderstack-write-key"
USERS = 2000
BATCHES = 60
BATCH_SIZE = 50
SINGLES = 400


def sample_events(rng: random.Random, count: int | None = None, first: int = 0) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """The sample traffic: BATCHES batches and SINGLES browser calls, or (`count`) one batch of that many events."""
    def event(i: int) -> dict[str, Any]:
        user = rng.randrange(USERS)
        kind = rng.choice(["track", "track", "track", "page", "identify"])
        body: dict[str, Any] = {"type": kind, "anonymousId": f"anon-{user:05d}", "messageId": f"demo-{i}", "properties": {"n": i}}
        if kind == "track":
            body["event"] = rng.choice(["Product Viewed", "Order Completed", "Signed Up"])
        if kind == "identify" or rng.random() < 0.3:
            body["userId"] = f"user-{user:05d}"
        return body

    counter = iter(range(first, 10**9))
    if count is not None:
        return [[event(next(counter)) for _ in range(count)]], []
    batches = [[event(next(counter)) for _ in range(BATCH_SIZE)] for _ in range(BATCHES)]
    singles = [event(next(counter)) for _ in range(SINGLES)]
    return batches, singles


async def main(keep: bool = False) -> int:
    rng = random.Random(2026)
    segment = await start_receiver("segment")
    rudder = await start_receiver("rudderstack", valid_keys=[RUDDER_KEY])
    env = dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url,
               SPLITTER_WRITE_KEY=WRITE_KEY, RUDDERSTACK_WRITE_KEY=RUDDER_KEY)
    splitter = await launch_splitter(str(RULES), env)
    ingress, admin = splitter.ingress, splitter.admin
    print(f"splitter demo: console at {admin}/ (the admin port; {'up until Ctrl-C' if keep else 'make demo KEEP=1 keeps it up'})", flush=True)
    batches, singles = sample_events(rng)
    auth = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
    statuses: Counter[int] = Counter()
    try:
        async with aiohttp.ClientSession() as client:
            async def post(path: str, body: dict[str, Any], headers: dict[str, str]) -> None:
                async with client.post(ingress + path, data=orjson.dumps(body), headers=headers) as response:
                    statuses[response.status] += 1

            await asyncio.gather(*(post("/v1/batch", {"batch": b}, {**auth, "Content-Type": "application/json"}) for b in batches))
            browser = {"Content-Type": "text/plain", "Origin": "https://shop.example"}
            await asyncio.gather(*(post(f"/v1/{e['type'][0]}", {**e, "writeKey": WRITE_KEY}, browser) for e in singles))
            if keep:
                await trickle(post, auth, batches, rng, first=sum(len(b) for b in batches) + len(singles))
            async with client.get(admin + "/metrics") as response:
                metrics_text = await response.text()
        code = await splitter.stop()
    finally:
        await splitter.stop()
        await segment.close()
        await rudder.close()
    report(batches, singles, env, statuses, segment.receiver, rudder.receiver, metrics_text, code)
    return 0 if code == 0 and set(statuses) == {200} else 1


async def trickle(post: Any, auth: dict[str, str], batches: list[list[dict[str, Any]]], rng: random.Random, first: int) -> None:
    """`--keep`: a small batch every half second until Ctrl-C (or SIGTERM), kept in `batches` for the report."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("splitter demo: sending a few events a second; Ctrl-C to stop and see the report", flush=True)
    sent = first  # messageIds go on from the sample's
    try:
        while not stop.is_set():
            more, _ = sample_events(rng, count=rng.randint(5, 25), first=sent)
            sent += len(more[0])
            batches.extend(more)
            await post("/v1/batch", {"batch": more[0]}, {**auth, "Content-Type": "application/json"})
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def report(batches: list[list[dict[str, Any]]], singles: list[dict[str, Any]], env: dict[str, str], statuses: Counter[int],
           segment: Any, rudder: Any, metrics_text: str, exit_code: int) -> None:
    rules = load_rules(str(RULES), env)
    events = [e for b in batches for e in b] + singles
    ctx = EventContext("default")
    expected: Counter[str] = Counter()
    users: dict[str, set[str]] = {"segment": set(), "rudderstack": set()}
    for event in events:
        decision = decide(rules, event, ctx)
        for destination in (*decision.primary, *decision.mirror):
            expected[destination] += 1
        users[decision.primary[0]].add(event["anonymousId"])
    received = {"segment": segment.count, "rudderstack": rudder.count}
    split = dict(rules.rules[-1].route.split.percents)  # type: ignore[union-attr]
    total_users = len(users["segment"]) + len(users["rudderstack"])
    print(f"\nsplitter demo: {len(events)} events from {total_users} users via {len(batches)} batches and {len(singles)} browser calls")
    print(f"client answers: {dict(statuses)}   proxy exit code after SIGTERM: {exit_code}\n")
    print(f"{'destination':<13}{'received':>10}{'expected':>10}   primary users   configured split")
    for name in ("rudderstack", "segment"):
        share = 100.0 * len(users[name]) / total_users
        print(f"{name:<13}{received[name]:>10}{expected[name]:>10}   {len(users[name]):>5} ({share:5.1f} %)   {split[name]:.0f} %")
    mirrored = sum(1 for r in segment.events if r.event["messageId"] in set(rudder.message_ids()))
    print(f"\nsegment also holds a mirror copy of {mirrored} RudderStack events, with the same messageId on both sides.")
    for line in metrics_text.splitlines():
        if line.startswith("splitter_rollout_percent"):
            print("  " + line)
    ok = received == dict(expected) and exit_code == 0
    print("\nall events delivered as the rules say" if ok else "\nMISMATCH between what was sent and what arrived")


if __name__ == "__main__":
    sys.exit(asyncio.run(main(keep="--keep" in sys.argv[1:])))
