"""Issue: once splitter has answered 200, the event reaches every destination it was routed to.

Real `splitter serve` processes, real stand-in upstreams with injected faults, real SIGKILL. Each
test compares the set of messageIds the clients were told were accepted with the set each
destination finally holds (duplicates allowed, none missing).
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from loadtest.bench_delivery import drained
from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import RunningReceiver, start_receiver
from proxy.delivery.spool import ACK_NOTE_INTERVAL
from proxy.delivery.spool_format import FORMAT, HEADER, REUSED, TAG, TAGGED, scan
from proxy.engine import EventContext, RuleSet, compile_rules, decide
from tests.rules_texts import served_head

WRITE_KEY = "lossless-web-key-0123"
RUDDER_KEY = "lossless-rs-key-0123"
OUTAGE_SECONDS = float(os.environ.get("SPLITTER_TEST_OUTAGE_SECONDS", "20"))
RULES = served_head(WRITE_KEY, RUDDER_KEY, timeout=2, delivery="retry_base: 0.05, retry_max: 0.5, breaker_cooldown: 0.2, flush_interval: 0.005") + """\
cohort: {key: [anonymousId, userId], salt: lossless}
rules:
  - name: rollout
    route:
      split: {rudderstack: 50, segment: 50}
      mirror: [segment]
"""
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Content-Type": "application/json"}


@pytest.fixture
async def upstreams():  # type: ignore[no-untyped-def]
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", record=True, valid_keys=[RUDDER_KEY])
    yield segment, rudder
    await segment.close()
    await rudder.close()


def setup_files(tmp_path: Path) -> tuple[Path, list[str]]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return rules, ["--spool-dir", str(tmp_path / "spool"), "--dead-letter-dir", str(tmp_path / "dead"), "--drain-timeout", "2"]


def env_for(segment: RunningReceiver, rudder: RunningReceiver) -> dict[str, str]:
    return dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url)


def expected_ids(rules: RuleSet, accepted: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    """Per destination, the messageIds the rules send there (primary or mirror)."""
    out: dict[str, set[str]] = {"segment": set(), "rudderstack": set()}
    for message_id, event in accepted.items():
        decision = decide(rules, event, EventContext("web"))
        for destination in (*decision.primary, *decision.mirror):
            out[destination].add(message_id)
    return out


def filler(padding: int) -> dict[str, Any]:
    """What `padded_event` adds to an event for `padding` bytes of filler (nothing for 0)."""
    return {"properties": {"pad": "x" * padding}} if padding else {}


def padded_event(prefix: str, worker: int, n: int, i: int, filler: dict[str, Any]) -> dict[str, Any]:
    """Ids of one width: batches of the same size and padding are spooled as records of the same size."""
    return {"type": "track", "event": "E", "anonymousId": f"user-{worker}-{n:06d}-{i:02d}", "messageId": f"{prefix}{worker}-{n:06d}-{i:02d}", **filler}


async def send_until(splitter: SplitterProcess, stop: asyncio.Event, accepted: dict[str, dict[str, Any]], statuses: Counter[str],
                     worker: int, batch_size: int = 20, padding: int = 0, prefix: str = "w") -> None:
    """Keep sending batches; record every event of every batch answered 200. Bounded by `stop`.
    `padding`: bytes of filler per event, to fill spool segments sooner."""
    n = 0
    extra = filler(padding)
    async with aiohttp.ClientSession() as client:
        while not stop.is_set():
            batch = [padded_event(prefix, worker, n, i, extra) for i in range(batch_size)]
            n += 1
            try:
                async with client.post(splitter.ingress + "/v1/batch", data=orjson.dumps({"batch": batch}), headers=AUTH,
                                       timeout=aiohttp.ClientTimeout(total=5)) as response:
                    statuses[str(response.status)] += 1
                    if response.status == 200:
                        accepted.update((e["messageId"], e) for e in batch)
            except (TimeoutError, aiohttp.ClientError):
                statuses["connection_error"] += 1
                await asyncio.sleep(0.05)


async def wait_delivered(receivers: dict[str, RunningReceiver], expected: dict[str, set[str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(expected[name] <= set(r.receiver.message_ids()) for name, r in receivers.items()):
            return
        await asyncio.sleep(0.1)
    missing = {name: len(expected[name] - set(r.receiver.message_ids())) for name, r in receivers.items()}
    raise AssertionError(f"events told 200 but never delivered: {missing}")


async def test_upstream_outage_costs_clients_nothing_and_loses_nothing(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    rules_path, args = setup_files(tmp_path)
    env = env_for(segment, rudder)
    splitter = await launch_splitter(str(rules_path), env, args)
    accepted: dict[str, dict[str, Any]] = {}
    statuses: Counter[str] = Counter()
    stop = asyncio.Event()
    try:
        rudder.receiver.faults.down = True
        workers = [asyncio.create_task(send_until(splitter, stop, accepted, statuses, w)) for w in range(3)]
        await asyncio.sleep(OUTAGE_SECONDS)
        stop.set()
        await asyncio.gather(*workers)
        during_outage = rudder.receiver.count
        rudder.receiver.faults.down = False
        assert set(statuses) == {"200"}, statuses  # no client error during the outage
        assert during_outage == 0 and len(accepted) > 500
        expected = expected_ids(compile_rules(RULES, env=env), accepted)
        await wait_delivered({"segment": segment, "rudderstack": rudder}, expected, timeout=60)
        assert rudder.receiver.refused > 0  # the outage really was seen, and retried through
    finally:
        assert await splitter.stop() == 0


async def test_sigkill_under_load_then_restart_delivers_every_accepted_event(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    rules_path, args = setup_files(tmp_path)
    env = env_for(segment, rudder)
    rudder.receiver.faults.delay = 0.3  # a slow upstream keeps a backlog in the spool when the kill lands
    first = await launch_splitter(str(rules_path), env, args)
    accepted: dict[str, dict[str, Any]] = {}
    statuses: Counter[str] = Counter()
    stop = asyncio.Event()
    workers = [asyncio.create_task(send_until(first, stop, accepted, statuses, w)) for w in range(3)]
    await asyncio.sleep(2.0)
    first.process.send_signal(signal.SIGKILL)
    await first.process.wait()
    stop.set()
    await asyncio.gather(*workers)
    assert statuses["200"] > 10
    rudder.receiver.faults.delay = 0
    second = await launch_splitter(str(rules_path), env, args)
    try:
        recovered = await second.wait_for_log("spool_recovered")
        assert recovered["pending"] > 0  # the kill left undelivered events, and the restart found them
        expected = expected_ids(compile_rules(RULES, env=env), accepted)
        await wait_delivered({"segment": segment, "rudderstack": rudder}, expected, timeout=60)
        async with aiohttp.ClientSession() as client, client.get(second.admin + "/metrics") as response:
            text = await response.text()
        replayed = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("splitter_spool_replayed_total{"))
        # every event sent again after the restart is counted: duplicates are allowed, and visible
        assert replayed == sum(r["pending"] for r in second.events("spool_recovered")) > 0
    finally:
        assert await second.stop() == 0


PADDING = 2000  # bytes of filler per event: batches of ~40 KB fill 16 MB segments in a few seconds
# Every event to Segment alone: each request is one record of the same size (a split's records, and
# their ledger tags, vary with how many events each side got), so records line up from file to file.
ONE_WAY = served_head(WRITE_KEY, RUDDER_KEY, timeout=2, delivery="flush_interval: 0.005") + """\
rules:
  - name: everything
    route: segment
"""


def newest_segment(spool: Path, destination: str) -> Path | None:
    files = sorted((spool / destination).glob("*.seg"))
    return files[-1] if files else None


def written_over(path: Path | None) -> bool:
    """Whether `path` is a segment file written over (format 4's REUSED marker)."""
    if path is None:
        return False
    with path.open("rb") as file:
        return file.read(len(REUSED)) == REUSED


def old_records_past_the_end(path: Path) -> int:
    """Whole records of an earlier segment right after the last record of `path`'s own."""
    data, segment_id = path.read_bytes(), int(path.stem)
    _, end = scan(data, len(REUSED), FORMAT, segment_id)
    if end + TAGGED.size > len(data):
        return 0
    tag = TAG.unpack_from(data, end + HEADER.size)[0]
    return 0 if tag == segment_id else len(scan(data, end, FORMAT, tag)[0])


async def load_until(splitter: SplitterProcess, accepted: dict[str, dict[str, Any]], statuses: Counter[str], done: Callable[[], bool],
                     prefix: str, then: Callable[[], Awaitable[None]] | None = None, limit: float = 120.0) -> None:
    """~40 KB batches from 3 clients until `done()` (checked every 0.1 s), then `then()` while they go on
    sending; bounded by `limit`."""
    stop = asyncio.Event()
    workers = [asyncio.create_task(send_until(splitter, stop, accepted, statuses, w, padding=PADDING, prefix=prefix)) for w in range(3)]
    deadline = time.monotonic() + limit
    try:
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert done(), f"no segment file was written over within {limit:g} s: {statuses}"
        if then is not None:
            await then()
    finally:
        stop.set()
        await asyncio.gather(*workers)


async def test_sigkill_with_segment_files_written_over_replays_nothing_old_and_loses_nothing(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    """Spool format 4 writes new segments over the files of delivered ones, so an active segment's
    file goes on past its last record with records already delivered, here whole ones right after it.
    A SIGKILL while idle, every ack noted: the restart finds nothing to send (an old record read as
    new would be sent again) and no tear. A SIGKILL under load into such a file: every event
    answered 200 is delivered after the restart."""
    segment, rudder = upstreams
    _, args = setup_files(tmp_path)
    rules_path, spool = tmp_path / "one-way.yaml", tmp_path / "spool"
    rules_path.write_text(ONE_WAY)
    env = env_for(segment, rudder)
    rules = compile_rules(ONE_WAY, env=env)
    receivers = {"segment": segment, "rudderstack": rudder}
    accepted: dict[str, dict[str, Any]] = {}
    statuses: Counter[str] = Counter()
    first = await launch_splitter(str(rules_path), env, args)
    try:
        await load_until(first, accepted, statuses, lambda: written_over(newest_segment(spool, "segment")), "a")
        await wait_delivered(receivers, expected_ids(rules, accepted), timeout=60)
        await asyncio.sleep(ACK_NOTE_INTERVAL + 0.2)  # the next ack rewrites the active segment's note
        last = [padded_event("z", 9, 0, i, filler(PADDING)) for i in range(20)]  # the size of every batch before
        async with aiohttp.ClientSession() as client, client.post(first.ingress + "/v1/batch", data=orjson.dumps({"batch": last}),
                                                                   headers=AUTH) as response:
            assert response.status == 200
        accepted.update((e["messageId"], e) for e in last)
        await wait_delivered(receivers, expected_ids(rules, accepted), timeout=30)
        assert await drained(first.admin, 10) is not None  # acked, so noted
    finally:
        first.process.send_signal(signal.SIGKILL)
        await first.process.wait()
    active = newest_segment(spool, "segment")
    assert active is not None and written_over(active) and old_records_past_the_end(active) > 0
    received = {name: len(r.receiver.message_ids()) for name, r in receivers.items()}

    second = await launch_splitter(str(rules_path), env, args)
    try:
        await asyncio.sleep(1.0)
        assert not second.events("spool_recovered"), second.events("spool_recovered")
        assert {name: len(r.receiver.message_ids()) for name, r in receivers.items()} == received

        async def kill_under_load() -> None:
            await asyncio.sleep(0.5)  # more records into the file written over
            second.process.send_signal(signal.SIGKILL)  # the clients are still sending
            await second.process.wait()

        await load_until(second, accepted, statuses, lambda: written_over(newest_segment(spool, "segment")), "b", kill_under_load)
    finally:
        if second.process.returncode is None:
            second.process.send_signal(signal.SIGKILL)
            await second.process.wait()
    assert statuses["200"] > 100

    third = await launch_splitter(str(rules_path), env, args)
    try:
        await wait_delivered(receivers, expected_ids(rules, accepted), timeout=60)  # (a record torn by the kill may be cut: never answered 200)
    finally:
        assert await third.stop() == 0


async def test_torn_spool_tail_is_repaired_at_start_and_complete_records_survive(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    rules_path, args = setup_files(tmp_path)
    env = env_for(segment, rudder)
    rudder.receiver.faults.down = True
    segment.receiver.faults.down = True
    first = await launch_splitter(str(rules_path), env, args)
    accepted: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession() as client:
        for n in range(10):
            batch = [{"type": "track", "event": "E", "anonymousId": f"u-{n}-{i}", "messageId": f"torn-{n}-{i}"} for i in range(10)]
            async with client.post(first.ingress + "/v1/batch", data=orjson.dumps({"batch": batch}), headers=AUTH) as response:
                assert response.status == 200
            accepted.update((e["messageId"], e) for e in batch)
    first.process.send_signal(signal.SIGKILL)
    await first.process.wait()
    torn = {}
    for destination in ("segment", "rudderstack"):
        last = sorted((tmp_path / "spool" / destination).glob("*.seg"), key=lambda p: p.name)
        last = [p for p in last if p.stat().st_size][-1]
        with open(last, "ab") as handle:  # what a crash in the middle of a write leaves behind
            handle.write(b"\x00\x10\x00\x00\x99\x88partial-record")
        torn[destination] = last.name
    rudder.receiver.faults.down = segment.receiver.faults.down = False
    second = await launch_splitter(str(rules_path), env, args)
    try:
        expected = expected_ids(compile_rules(RULES, env=env), accepted)
        await wait_delivered({"segment": segment, "rudderstack": rudder}, expected, timeout=30)
        recoveries = {r["destination"]: r for r in second.events("spool_recovered")}
        for destination, name in torn.items():
            assert recoveries[destination]["truncated_bytes"] == 20
            assert recoveries[destination]["truncated_segments"] == [name]
    finally:
        assert await second.stop() == 0
