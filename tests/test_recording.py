"""Recorded traffic (the rules' `record:`): a real `splitter serve` records whole users to compressed
NDJSON files, and `splitter simulate` / `explain` read those files as they read hand-written samples.

Every test runs the proxy as an operator does (its own process, stand-in Segment and RudderStack
receivers on loopback, real files), and reads the files as they are on disk. Which users are in is
checked against the cohort hash itself (mmh3 of "salt:key" % 10000, computed here), and PII against
sha256(salt + value), so neither is taken from splitter's own code.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import json
import os
import re
import signal
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import mmh3
import orjson
import pytest

from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import start_receiver
from proxy.engine import RulesError, compile_rules, is_recorded, picked
from tests.test_cli_engine import run

WEB_KEY = "web-key-0123456789"
SERVER_KEY = "server-key-0123456789"
CREDENTIALS = ("seg-web-key-0123456789", "rs-web-key-0123456789", "seg-server-key-0123456789", "rs-server-key-0123456789")
PII_SALT = "pepper-for-the-tests"
RECORD_SALT = "rec-salt"
FAST = "retry_base: 0.02, retry_max: 0.2, flush_interval: 0.002"
RULES = f"""\
version: 1
destinations:
  segment: {{kind: segment, url: "${{SEGMENT_URL}}", timeout: 5, delivery: {{{FAST}}}}}
  rudderstack: {{kind: rudderstack, url: "${{RUDDERSTACK_URL}}", timeout: 5, delivery: {{{FAST}}}}}
sources:
  - name: web
    write_keys: ["{WEB_KEY}"]
    credentials: {{segment: "{CREDENTIALS[0]}", rudderstack: "{CREDENTIALS[1]}"}}
  - name: server
    write_keys: ["{SERVER_KEY}"]
    credentials: {{segment: "{CREDENTIALS[2]}", rudderstack: "{CREDENTIALS[3]}"}}
cohort: {{key: [anonymousId, userId], salt: "migration"}}
rules:
  - name: eu-web
    when: {{source: web, country: [DE, FR]}}
    route: {{split: {{rudderstack: 50, segment: 50}}}}
  - name: checkout
    when: {{event: "Checkout *"}}
    route: {{to: [segment], mirror: [rudderstack]}}
  - name: everyone
    route: {{split: {{rudderstack: 5, segment: 95}}}}
"""
MONDAY = "2030-01-07T00:00:00Z"  # "what moves if I raise this to 20 % next Monday"
RAISED = RULES.replace(
    "    route: {split: {rudderstack: 5, segment: 95}}\n",
    f"    route:\n      split: {{rudderstack: 5, segment: 95}}\n      ramp: [{{at: {MONDAY}, rudderstack: 20}}]\n",
)
assert RAISED != RULES


def record_section(**settings: Any) -> str:
    values = {"percent": 30, "salt": RECORD_SALT, "hash": ["traits.email", "context.traits.email", "properties.phone"],
              "hash_salt": "${PII_SALT}", **settings}
    return "record:\n" + "".join(f"  {key}: {json.dumps(value)}\n" for key, value in values.items() if value is not None)


def bucket(salt: str, key: str) -> int:
    return mmh3.hash(f"{salt}:{key}", seed=0, signed=False) % 10000


def pii_hash(value: str) -> str:
    return hashlib.sha256(PII_SALT.encode() + value.encode()).hexdigest()


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


@dataclass
class Sent:
    """What the test sent: each request, and by hand the events an operator would write down for them."""

    requests: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)
    by_hand: list[dict[str, Any]] = field(default_factory=list)  # one sample line per request (an event or a batch body)
    accepted: Counter[str] = field(default_factory=Counter)  # anonymousId -> events the proxy accepted
    emails: set[str] = field(default_factory=set)


def traffic(users: range) -> Sent:
    """Per user: server-side batches (the server source, envelope context, an identify with an email, an
    order with a phone number) and browser calls (the web source, the key in the body, a country header
    for some); one batch also holds two events the proxy rejects."""
    sent = Sent()
    for start in range(users.start, users.stop, 10):
        group = [u for u in range(start, min(start + 10, users.stop))]
        batch: list[Any] = []
        for user in group:
            anon, email = f"anon-{user:04d}", f"u{user}@example.com"
            sent.emails.add(email)
            batch.append({"type": "identify", "anonymousId": anon, **({"userId": f"user-{user}"} if user % 3 == 0 else {}), "traits": {"email": email}})
            batch.append({"type": "track", "event": "Order Completed", "anonymousId": anon, "messageId": f"order-{user}",
                          "properties": {"total": user, "phone": f"+49 30 {user:06d}"}})
            sent.accepted[anon] += 2
        if start % 50 == 0:
            batch += [{"type": "track", "event": "No Identity"}, "not an event"]  # rejected: never recorded
        envelope = {"context": {"library": {"name": "analytics-python", "version": "2.3.0"}}}
        sent.requests.append(("/v1/batch", {"batch": batch, **envelope}, {"Authorization": basic(SERVER_KEY)}))
        sent.by_hand.append({"_splitter": {"source": "server"}, "batch": [e for e in batch if isinstance(e, dict) and "anonymousId" in e], **envelope})
        for user in group:
            anon = f"anon-{user:04d}"
            country = {0: "DE", 1: "FR", 2: "US"}.get(user % 4)
            headers = {"CF-IPCountry": country} if country else {}
            event = {"event": "Checkout Started" if user % 2 else "Product Viewed", "anonymousId": anon,
                     "context": {"traits": {"email": f"u{user}@example.com"}, "page": {"path": "/cart"}}}
            sent.requests.append(("/v1/track", {**event, "writeKey": WEB_KEY}, headers))
            sent.by_hand.append({**event, "type": "track", "_splitter": {"source": "web", **({"country": country} if country else {})}})
            sent.accepted[anon] += 1
    return sent


async def send(splitter: SplitterProcess, sent: Sent, concurrency: int = 8) -> None:
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as client:
        async def one(path: str, body: dict[str, Any], headers: dict[str, str]) -> None:
            async with limit, client.post(splitter.ingress + path, data=orjson.dumps(body),
                                          headers={"Content-Type": "application/json", **headers}) as answer:
                assert answer.status == 200, await answer.text()

        await asyncio.gather(*(one(*request) for request in sent.requests))


async def scrape(splitter: SplitterProcess, name: str, **labels: str) -> float:
    """The sum of `name`'s samples with these labels on the admin port's /metrics (0 when absent)."""
    async with aiohttp.ClientSession() as client, client.get(splitter.admin + "/metrics") as answer:
        text = await answer.text()
    total = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if re.fullmatch(rf"{name}(\{{.*\}})?", series) and all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


async def wait_metric(splitter: SplitterProcess, name: str, expected: float, timeout: float = 10.0, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while (value := await scrape(splitter, name, **labels)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} = {value}, expected {expected}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def serving(rules: Path, extra: tuple[str, ...] = ()) -> AsyncIterator[SplitterProcess]:
    async with (await start_receiver("segment", record=False) as segment,
                await start_receiver("rudderstack", valid_keys=CREDENTIALS[1::2], record=False) as rudder):
        env = dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_URL=rudder.url, PII_SALT=PII_SALT)
        splitter = await launch_splitter(str(rules), env, extra)
        try:
            yield splitter
        finally:
            if splitter.process.returncode is None:
                await splitter.stop()


def cli_env() -> dict[str, str]:
    return dict(os.environ, SEGMENT_URL="http://127.0.0.1:9", RUDDERSTACK_URL="http://127.0.0.1:9", PII_SALT=PII_SALT)


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith("events-"))


def disk(directory: Path) -> tuple[int, int]:
    """The recording files in `directory` and their bytes (a file the writer deletes meanwhile is left out)."""
    sizes = []
    for path in files(directory):
        with contextlib.suppress(FileNotFoundError):
            sizes.append(path.stat().st_size)
    return len(sizes), sum(sizes)


def recorded_lines(directory: Path) -> list[dict[str, Any]]:
    lines = []
    for path in files(directory):
        assert path.name.endswith(".ndjson.gz"), path  # finished: the process stopped cleanly
        lines += [orjson.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
    return lines


NOW = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def simulate(*args: str | Path) -> str:
    done = run(["simulate", *map(str, args)], cli_env())
    assert done.returncode == 0, done.stderr
    return done.stdout


# --------------------------------------------------------------------------- whole users, privacy, simulate


async def test_recorded_files_hold_whole_users_without_keys_or_plain_pii_and_simulate_as_written_by_hand(tmp_path: Path) -> None:
    directory = tmp_path / "recordings"
    rules = tmp_path / "current.yaml"
    rules.write_text(RULES + record_section(dir=str(directory)))
    sent = traffic(range(400))
    async with serving(rules) as splitter:
        await send(splitter, sent)
        chosen = {anon for anon in sent.accepted if bucket(RECORD_SALT, anon) < 3000}
        expected_events = sum(sent.accepted[anon] for anon in chosen)
        await wait_metric(splitter, "splitter_recording_events_total", expected_events)
        assert await scrape(splitter, "splitter_recording_dropped_events_total") == 0
        assert await splitter.stop() == 0

    lines = recorded_lines(directory)
    # Whole users: every accepted event of a chosen user, none of anyone else's (checked against the hash itself).
    assert Counter(line["anonymousId"] for line in lines) == {anon: sent.accepted[anon] for anon in chosen}
    assert 80 < len(chosen) < 160  # 30 % of 400, give or take: a sample, not everyone
    assert not any(line.get("event") == "No Identity" for line in lines)
    # Each line is the event as routed, with what the request told the proxy.
    by_kind = defaultdict(list)
    for line in lines:
        by_kind[(line["_splitter"]["source"], line["type"])].append(line)
    assert set(by_kind) == {("server", "identify"), ("server", "track"), ("web", "track")}
    for line in by_kind[("server", "track")]:
        assert line["context"]["library"]["name"] == "analytics-python"  # the batch envelope, merged
        assert line["_splitter"] == {"source": "server"}
    web = by_kind[("web", "track")]
    assert all(re.fullmatch(r"[0-9a-f-]{36}", line["messageId"]) for line in web)  # stamped as delivered
    for line in web:
        user = int(line["anonymousId"][5:])
        assert line["_splitter"] == {"source": "web", **({"country": {0: "DE", 1: "FR", 2: "US"}[user % 4]} if user % 4 != 3 else {})}
    # Privacy: no write key or credential anywhere, PII paths hashed with the configured salt, never in clear.
    raw = b"".join(gzip.decompress(path.read_bytes()) for path in files(directory))
    for secret in (WEB_KEY, SERVER_KEY, *CREDENTIALS, PII_SALT):
        assert secret.encode() not in raw
    assert b"writeKey" not in raw and b"example.com" not in raw
    for line in by_kind[("server", "identify")]:
        assert line["traits"]["email"] == pii_hash(f"u{int(line['anonymousId'][5:])}@example.com")
    for line in by_kind[("server", "track")]:
        user = int(line["anonymousId"][5:])
        assert line["properties"] == {"total": user, "phone": pii_hash(f"+49 30 {user:06d}")}
    assert all(line["context"]["traits"]["email"] == pii_hash(f"u{int(line['anonymousId'][5:])}@example.com") for line in web)
    for path in [directory, *files(directory)]:
        assert path.stat().st_mode & 0o077 == 0  # owner only: they hold what users did

    # The done-when: simulate over the recorded directory = over the same events written by hand.
    by_hand = tmp_path / "by-hand.ndjson"
    by_hand.write_text("".join(json.dumps(line) + "\n" for line in _chosen_lines(sent.by_hand, chosen)))
    new = tmp_path / "new.yaml"
    new.write_text(RAISED)
    for args in ([rules], [new, "--against", rules], [new, "--against", rules, "--at", MONDAY]):
        recorded, written = simulate(*args[:1], directory, *args[1:]), simulate(*args[:1], by_hand, *args[1:])
        assert NOW.sub("NOW", recorded) == NOW.sub("NOW", written)  # without --at, each run prints its own "now"
        assert recorded.startswith(f"{expected_events} events, {len(chosen)} distinct cohort keys")
    rehearsal = simulate(new, directory, "--against", rules, "--at", MONDAY)
    moved = re.search(r"against \S+: (\d+) of (\d+) cohort keys", rehearsal)
    assert moved is not None and int(moved[1]) > 0, rehearsal  # raising 5 -> 20 % moves some of the recorded users
    assert "segment -> rudderstack" in rehearsal and "rudderstack -> segment" not in rehearsal

    # explain: the same decision for every event, read from the directory or from the hand-written file.
    def decisions(path: Path) -> list[str]:
        done = run(["explain", str(rules), str(path)], cli_env())
        assert done.returncode == 0, done.stderr
        return sorted(done.stdout.splitlines())

    assert decisions(directory) == decisions(by_hand) and len(decisions(directory)) == expected_events


def _chosen_lines(by_hand: list[dict[str, Any]], chosen: set[str]) -> list[dict[str, Any]]:
    """The hand-written sample lines, restricted to the recorded users (a batch keeps only their events)."""
    out = []
    for line in by_hand:
        if "batch" in line:
            kept = [event for event in line["batch"] if event["anonymousId"] in chosen]
            if kept:
                out.append({**line, "batch": kept})
        elif line["anonymousId"] in chosen:
            out.append(line)
    return out


async def test_workers_record_into_one_directory_and_users_stay_whole(tmp_path: Path) -> None:
    """`--workers 2`: each worker writes its own files into the one directory; a user's calls may reach either worker."""
    directory = tmp_path / "recordings"
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES + record_section(dir=str(directory), percent=50))
    sent = traffic(range(200))
    chosen = {anon for anon in sent.accepted if bucket(RECORD_SALT, anon) < 5000}
    async with serving(rules, ("--workers", "2")) as splitter:
        await send(splitter, sent, concurrency=16)
        await wait_metric(splitter, "splitter_recording_events_total", sum(sent.accepted[anon] for anon in chosen))
        assert await splitter.stop() == 0
    assert Counter(line["anonymousId"] for line in recorded_lines(directory)) == {anon: sent.accepted[anon] for anon in chosen}


def test_the_request_path_pick_is_the_cohort_hash_with_the_recording_salt() -> None:
    """`picked` (the request path's loop, the hash written out) chooses exactly the events `is_recorded` does, for any key value."""
    rules = compile_rules(RULES.replace("${SEGMENT_URL}", "http://a").replace("${RUDDERSTACK_URL}", "http://b")
                          .replace("key: [anonymousId, userId]", "key: [anonymousId, userId, context.traits.account]")
                          + "record: {percent: 37.5, salt: s}\n", env={})
    settings = rules.recording
    assert settings is not None
    values: list[Any] = ["", " ", "a", "  x ", 42, 42.0, 1.5, -3, True, None, {"x": 1}, [1]]
    events: list[Any] = ["not an event"]
    for i in range(3000):
        event: dict[str, Any] = {name: values[(i * 7 + n) % len(values)] if i % 5 else f"{name}-{i}" for n, name in enumerate(("anonymousId", "userId")) if (i + n) % 3}
        if i % 4 == 0:
            event["context"] = {"traits": {"account": values[i % len(values)] if i % 8 else f"acct-{i}"}}
        events.append(event)
    assert picked(settings, events) == [e for e in events[1:] if is_recorded(settings, e)]
    assert picked(settings, events, {1, 2}) == [e for e in events[3:] if is_recorded(settings, e)]
    assert all(is_recorded(settings, {"anonymousId": f"u{i}"}) == (bucket("s", f"u{i}") < 3750) for i in range(2000))


# --------------------------------------------------------------------------- rotation, cap, queue


async def test_files_rotate_and_the_directory_stays_under_its_cap_oldest_deleted_first(tmp_path: Path) -> None:
    directory = tmp_path / "recordings"
    rules = tmp_path / "rules.yaml"
    cap = 100_000
    rules.write_text(RULES + record_section(dir=str(directory), percent=100, file_mb=0.01, max_mb=cap / 1024 / 1024))
    sent = traffic(range(2000))
    async with serving(rules) as splitter:
        for start in range(0, len(sent.requests), 110):  # ten users' calls a round, rounds in order: the newest events are the last sent
            await send(splitter, Sent(requests=sent.requests[start:start + 110]))
        total = sum(sent.accepted.values())
        await wait_metric(splitter, "splitter_recording_events_total", total)
        deadline = time.monotonic() + 5  # the writer's tidy, once a second, publishes what is on disk
        while (shown := (await scrape(splitter, "splitter_recording_files"), await scrape(splitter, "splitter_recording_bytes"))) != disk(directory):
            assert time.monotonic() < deadline, (shown, disk(directory))
            await asyncio.sleep(0.1)
        assert await splitter.stop() == 0
        assert splitter.events("recording_files_deleted")
        finished = splitter.events("recording_file_finished")
    kept = files(directory)
    assert len(finished) > 2 * len(kept) and len(kept) >= 3  # rotated many times; the oldest went
    assert sum(p.stat().st_size for p in kept) <= cap
    assert all(p.stat().st_size < 3 * 10_486 for p in kept[:-1])  # file_mb 0.01: each finished near that size
    # What is left is the newest traffic: the last round's users whole, the first users gone.
    recorded = Counter(line["anonymousId"] for line in recorded_lines(directory))
    assert sum(recorded.values()) < total and "anon-0000" not in recorded
    assert all(recorded[f"anon-{user:04d}"] == sent.accepted[f"anon-{user:04d}"] for user in range(1990, 2000))
    assert simulate(rules, directory).startswith(f"{sum(recorded.values())} events, ")


async def test_a_full_queue_drops_and_counts_and_the_requests_do_not_wait(tmp_path: Path) -> None:
    directory = tmp_path / "recordings"
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES + record_section(dir=str(directory), percent=100, queue=10))
    sent = traffic(range(300))
    batches = [request for request in sent.requests if request[0] == "/v1/batch"]  # 20 events each: more than the queue holds
    singles = [request for request in sent.requests if request[0] == "/v1/track"]
    async with serving(rules) as splitter:
        await send(splitter, Sent(requests=batches), concurrency=1)
        await wait_metric(splitter, "splitter_recording_dropped_events_total", 20 * len(batches), reason="queue_full")
        assert await scrape(splitter, "splitter_recording_events_total") == 0
        started = time.monotonic()
        await send(splitter, Sent(requests=singles), concurrency=64)  # faster than the writer takes them
        recorded_run = time.monotonic() - started
        dropped = await scrape(splitter, "splitter_recording_dropped_events_total", reason="queue_full") - 20 * len(batches)
        await wait_metric(splitter, "splitter_recording_events_total", len(singles) - dropped)
        assert 0 < dropped < len(singles)  # the queue took what fit, and dropped the rest, counted
        assert await scrape(splitter, "splitter_recording_queued_events") == 0
        # The same calls with nothing recorded (a reload to 0 %): the dropping run was no slower.
        rules.write_text(RULES + record_section(dir=str(directory), percent=0, queue=10))
        splitter.signal(signal.SIGHUP)
        await splitter.wait_for_log("config_reloaded")
        started = time.monotonic()
        await send(splitter, Sent(requests=singles), concurrency=64)
        plain_run = time.monotonic() - started
        assert recorded_run < 2 * plain_run + 0.5, (recorded_run, plain_run)


# --------------------------------------------------------------------------- a reload turns it on and off; a crash; the default directory


async def test_a_reload_turns_recording_on_and_off_and_a_relative_dir_is_under_the_state_dir(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    state = tmp_path / "state"
    directory = state / "recordings"
    sent = traffic(range(100))
    async with serving(rules, ("--state-dir", str(state))) as splitter:
        await send(splitter, Sent(requests=sent.requests[:10]))
        assert not directory.exists()  # no `record:`, nothing recorded
        rules.write_text(RULES + record_section(percent=100))  # no dir: <state-dir>/recordings
        splitter.signal(signal.SIGHUP)
        await splitter.wait_for_log("config_reloaded")
        await send(splitter, Sent(requests=sent.requests[10:]))
        expected = sum(len([e for e in body.get("batch", [body]) if isinstance(e, dict) and "anonymousId" in e])
                       for _, body, _ in sent.requests[10:])
        await wait_metric(splitter, "splitter_recording_events_total", expected)
        assert [p.name.endswith(".part") for p in files(directory)] == [True]  # being written
        async with aiohttp.ClientSession() as client, client.get(splitter.admin + "/admin/config") as answer:
            shown = await answer.text()
        assert json.loads(shown)["record"] == {
            "percent": 100.0, "salt": RECORD_SALT, "dir": "recordings", "hash": ["traits.email", "context.traits.email", "properties.phone"],
            "file_bytes": 16 << 20, "file_seconds": 3600.0, "max_bytes": 256 << 20, "queue": 10_000}
        assert PII_SALT not in shown
        rules.write_text(RULES)
        splitter.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while any(p.name.endswith(".part") for p in files(directory)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert [p.name.endswith(".ndjson.gz") for p in files(directory)] == [True]  # finished while the proxy runs on
        assert len(recorded_lines(directory)) == expected
        await send(splitter, Sent(requests=sent.requests[:10]))
    assert len(recorded_lines(directory)) == expected  # off: the later calls were not recorded


async def test_a_killed_writer_leaves_a_file_simulate_reads_and_the_next_start_finishes(tmp_path: Path) -> None:
    directory = tmp_path / "recordings"
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES + record_section(dir=str(directory), percent=100))
    sent = traffic(range(50))
    scratch = tmp_path / "spool"
    extra = ("--spool-dir", str(scratch), "--dead-letter-dir", str(tmp_path / "dead"))
    async with serving(rules, extra) as splitter:
        await send(splitter, sent)
        total = sum(sent.accepted.values())
        await wait_metric(splitter, "splitter_recording_events_total", total)
        await asyncio.sleep(1.5)  # the writer sync-flushes at least once a second
        splitter.signal(signal.SIGKILL)
        await splitter.process.wait()
    [part] = files(directory)
    assert part.name.endswith(".ndjson.gz.part")
    done = run(["simulate", str(rules), str(directory)], cli_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{total} events, ") and "still being written, or its writer stopped" in done.stderr
    async with serving(rules, extra) as splitter:
        await splitter.wait_for_log("recording_file_recovered")
        assert [p.name for p in files(directory)] == [part.name.removesuffix(".part")]


# --------------------------------------------------------------------------- reading: several inputs, gzip or not; the schema


def test_simulate_and_explain_read_several_inputs_gzip_or_not(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    events = [{"type": "track", "event": "Product Viewed", "anonymousId": f"a-{i}", "_splitter": {"source": "web"}} for i in range(60)]
    text = "".join(json.dumps(event) + "\n" for event in events)
    nested = tmp_path / "recordings" / "replica-b"
    nested.mkdir(parents=True)
    (tmp_path / "one.ndjson").write_text("".join(text.splitlines(keepends=True)[:20]))
    (tmp_path / "recordings" / "events-1.ndjson.gz").write_bytes(gzip.compress(text.encode()))
    (nested / "events-2.jsonl").write_text(text)
    (tmp_path / "recordings" / ".hidden.ndjson").write_text("not json\n")  # hidden: skipped
    (tmp_path / "recordings" / "notes.txt").write_text("not events\n")  # not an event file: skipped
    everything = simulate(rules, tmp_path / "one.ndjson", tmp_path / "recordings")
    assert everything.startswith("140 events, 60 distinct cohort keys")
    cut = gzip.compress(text.encode())[:-30]  # a crashed writer's file
    (tmp_path / "cut.ndjson.gz").write_bytes(cut)
    done = run(["explain", str(rules), str(tmp_path / "cut.ndjson.gz")], cli_env())
    assert done.returncode == 0 and "cut short: read up to its last whole line" in done.stderr
    assert 0 < len(done.stdout.splitlines()) <= 60
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run(["simulate", str(rules), str(empty)], cli_env())
    assert done.returncode == 2 and "no event files in this directory" in done.stderr
    done = run(["simulate", str(rules)], cli_env())
    assert done.returncode == 2 and "Missing argument 'EVENTS...'" in done.stderr


def test_record_section_problems_are_reported_with_their_lines() -> None:
    head = RULES.replace("${SEGMENT_URL}", "http://127.0.0.1:9").replace("${RUDDERSTACK_URL}", "http://127.0.0.1:9")
    line = head.count("\n") + 1

    def problems(section: str) -> list[str]:
        with pytest.raises(RulesError) as caught:
            compile_rules(head + section, env={"PII_SALT": PII_SALT})
        return sorted(caught.value.lines)

    assert problems("record: {percent: 5, salt: migration}") == [
        f"rules.yaml:{line}: record.salt: 'migration' is a cohort salt of this file: the recorded users would be the low buckets every split "
        "sends to its first destination, not a sample; give the recording a salt of its own"]
    assert problems("record: {percent: 5, hash: [traits.email], hash_salt: literal}") == [
        f'rules.yaml:{line}: record.hash_salt: must come from the environment, e.g. "${{PII_SALT}}": a salt written in the rules file '
        "lets anyone who reads the file reverse the hashes"]
    assert problems("record: {percent: 5, hash: [anonymousId, context.app, properties], hash_salt: '${PII_SALT}'}") == sorted([
        f"rules.yaml:{line}: record.hash: anonymousId is never transformed: destinations refuse an event without userId or anonymousId",
        f"rules.yaml:{line}: record.hash: 'context.app' cannot be hashed: routing reads 'context.app.version', so a replay of the recorded "
        "events would not route as the proxy did",
        f"rules.yaml:{line}: record.hash: 'properties' names the whole object: give a field inside it, e.g. properties.plan"])
    assert problems("record: {percent: 5, hash: [traits.email]}") == [
        f'rules.yaml:{line}: record.hash_salt: is required with `hash`, from the environment, e.g. "${{PII_SALT}}" '
        "(the variable your hash_property transforms use gives the same hashes)"]
    assert problems("record: {salt: x, file_mb: 10, max_mb: 15, queue: 0.5}") == sorted([
        f"rules.yaml:{line}: record.percent: is required: the share of users to record, e.g. 1",
        f"rules.yaml:{line}: record.max_mb: must be at least twice file_mb (10), so a finished file can be kept beside the one being written, not 15",
        f"rules.yaml:{line}: record.queue: must be a whole number between 1 and 1000000, not 0.5"])
    settings = compile_rules(head + "record: {percent: 2.5}", env={}).recording
    assert settings is not None and (settings.below, settings.salt, settings.directory) == (250, "recording", "recordings")
    assert (settings.file_bytes, settings.max_bytes, settings.queue, settings.file_seconds) == (16 << 20, 256 << 20, 10_000, 3600.0)
    assert compile_rules(head, env={}).recording is None
    with_salt = compile_rules(head + "record: {percent: 1, hash: [traits.email], hash_salt: '${PII_SALT}'}", env={"PII_SALT": PII_SALT})
    assert PII_SALT not in repr(with_salt.recording)
