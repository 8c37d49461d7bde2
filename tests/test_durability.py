"""Issue 21, durability modes: `--durability fsync|interval` (proxy/delivery/commit.py).

Real `splitter serve` processes and real stand-in receivers, as in tests/test_lossless.py: for each
mode, a SIGKILL under load and a restart deliver every event that was answered 200 (a process death
keeps the page cache, so `interval` loses nothing to it either). `interval` answers without waiting
for an fsync: with a 30 s interval the records are in the spool files, readable by this process,
right after the 200s while `splitter_spool_syncs_total` is still 0; with `fsync` it counts the rounds
the answers waited for. Bad values of either flag stop the start naming the flag and its variable.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import start_receiver
from proxy.delivery.commit import ROUNDS_IN_FLIGHT, GroupCommit
from proxy.engine import compile_rules
from tests.conftest import splitter_command
from tests.test_lossless import RUDDER_KEY, RULES, WRITE_KEY, env_for, expected_ids, send_until, setup_files, wait_delivered

AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Content-Type": "application/json"}
MODES = {"fsync": ["--durability", "fsync"], "interval": ["--durability", "interval", "--sync-interval", "30"]}  # 30 s: no tick during the test


@pytest.fixture
async def receivers():  # type: ignore[no-untyped-def]
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", record=True, valid_keys=[RUDDER_KEY])
    yield segment, rudder
    await segment.close()
    await rudder.close()


async def syncs(splitter: SplitterProcess) -> float:
    async with aiohttp.ClientSession() as client, client.get(splitter.admin + "/metrics") as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("splitter_spool_syncs_total"))


@pytest.mark.parametrize("mode", list(MODES))
async def test_sigkill_under_load_then_restart_delivers_every_acknowledged_event(tmp_path: Path, receivers, mode: str) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = receivers
    rules_path, args = setup_files(tmp_path)
    env = env_for(segment, rudder)
    rudder.receiver.faults.delay = 0.3  # a slow upstream keeps a backlog in the spool when the kill lands
    first = await launch_splitter(str(rules_path), env, [*args, *MODES[mode]])
    accepted: dict[str, dict[str, Any]] = {}
    statuses: Counter[str] = Counter()
    stop = asyncio.Event()
    workers = [asyncio.create_task(send_until(first, stop, accepted, statuses, w)) for w in range(3)]
    await asyncio.sleep(2.0)
    synced = await syncs(first)
    first.process.send_signal(signal.SIGKILL)
    await first.process.wait()
    stop.set()
    await asyncio.gather(*workers)
    assert statuses["200"] > 10
    if mode == "interval":
        assert synced == 0  # every 200 of the run rested on the page cache alone, and survived the kill
    else:
        assert synced > 0
    rudder.receiver.faults.delay = 0
    second = await launch_splitter(str(rules_path), env, [*args, *MODES[mode]])
    try:
        recovered = await second.wait_for_log("spool_recovered")
        assert recovered["pending"] > 0  # the kill left undelivered events, and the restart found them
        expected = expected_ids(compile_rules(RULES, env=env), accepted)
        await wait_delivered({"segment": segment, "rudderstack": rudder}, expected, timeout=60)
    finally:
        assert await second.stop() == 0


async def post_batches(splitter: SplitterProcess, prefix: str, count: int) -> list[str]:
    ids = []
    async with aiohttp.ClientSession() as client:
        for n in range(count):
            batch = [{"type": "track", "event": "E", "anonymousId": f"u-{n}-{i}", "messageId": f"{prefix}-{n}-{i}"} for i in range(5)]
            async with client.post(splitter.ingress + "/v1/batch", data=orjson.dumps({"batch": batch}), headers=AUTH) as response:
                assert response.status == 200
            ids += [e["messageId"] for e in batch]
    return ids


def spooled_bytes(spool: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(spool.glob("*/*.seg")))


async def test_interval_answers_once_written_and_syncs_on_its_interval(tmp_path: Path, receivers) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = receivers
    segment.receiver.faults.down = rudder.receiver.faults.down = True  # everything stays in the spool files
    rules_path, args = setup_files(tmp_path)
    env = env_for(segment, rudder)
    slow = await launch_splitter(str(rules_path), env, [*args, *MODES["interval"]])
    try:
        ids = await post_batches(slow, "slow", 20)
        on_disk = spooled_bytes(tmp_path / "spool")  # another process reads them back: the kernel has them
        assert all(message_id.encode() in on_disk for message_id in ids)
        assert await syncs(slow) == 0  # and none of those 200s waited for an fsync
    finally:
        assert await slow.stop() == 0
    assert all(message_id.encode() in spooled_bytes(tmp_path / "spool") for message_id in ids)

    args = ["--spool-dir", str(tmp_path / "spool2"), "--dead-letter-dir", str(tmp_path / "dead2")]
    ticking = await launch_splitter(str(rules_path), env, [*args, "--durability", "interval", "--sync-interval", "0.2"])
    try:
        await post_batches(ticking, "tick", 5)
        for _ in range(50):  # the interval's round comes without any request waiting for it
            if await syncs(ticking) >= 1:
                break
            await asyncio.sleep(0.1)
        assert await syncs(ticking) >= 1
        await asyncio.sleep(0.5)
        settled = await syncs(ticking)
        await asyncio.sleep(0.6)
        assert await syncs(ticking) == settled  # nothing written since: no more rounds
    finally:
        assert await ticking.stop() == 0

    args = ["--spool-dir", str(tmp_path / "spool3"), "--dead-letter-dir", str(tmp_path / "dead3")]
    fsyncing = await launch_splitter(str(rules_path), env, args)  # the default
    try:
        await post_batches(fsyncing, "fsync", 5)
        assert await syncs(fsyncing) >= 5  # one round per request sent one after the other: each 200 waited for its own
    finally:
        assert await fsyncing.stop() == 0


@pytest.mark.parametrize(("flags", "variables", "named"), [
    (["--durability", "sometimes"], {}, ["--durability", "SPLITTER_DURABILITY", "fsync, interval"]),
    ([], {"SPLITTER_DURABILITY": "always"}, ["--durability", "SPLITTER_DURABILITY"]),
    (["--durability", "interval", "--sync-interval", "0"], {}, ["--sync-interval", "SPLITTER_SYNC_INTERVAL"]),
    ([], {"SPLITTER_SYNC_INTERVAL": "-1"}, ["--sync-interval", "SPLITTER_SYNC_INTERVAL"]),
])
def test_bad_durability_settings_stop_the_start_naming_flag_and_variable(tmp_path: Path, flags: list[str], variables: dict[str, str],
                                                                          named: list[str]) -> None:
    rules_path, _ = setup_files(tmp_path)
    env = {**os.environ, **variables}
    result = subprocess.run(splitter_command("serve", "--config", str(rules_path), "--spool-dir", str(tmp_path / "spool"), *flags),
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 3, result.stderr
    for text in named:
        assert text in result.stderr


class FakeSpool:
    def __init__(self) -> None:
        self.committed = self.appended = 0
        self.synced: list[int] = []

    def take_dirty(self) -> int:
        return self.appended

    def sync(self, dirty: int) -> None:
        self.synced.append(dirty)

    def sync_failed(self, dirty: int) -> None:
        raise AssertionError("not expected")

    def close_sealed(self, dirty: int) -> None:
        pass

    def release(self, dirty: int) -> None:
        pass


async def test_group_commit_interval_rounds_on_tick_on_seal_and_at_idle() -> None:
    rounds: list[int] = []
    group = GroupCommit(0.05, lambda: rounds.append(1))
    spool = FakeSpool()
    spool.appended = 1
    await group.wait([(spool, 1)])  # returns at once
    assert spool.synced == [] and spool.committed == 0
    await asyncio.sleep(0.2)
    assert spool.synced == [1] and spool.committed == 1 and len(rounds) == 1
    long = GroupCommit(60.0)
    spool.appended = 2
    await long.wait([(spool, 2)])
    spool.appended = 3
    long.soon(spool)  # a sealed segment: synced now, not in 60 s
    await asyncio.sleep(0.05)
    assert spool.synced[-1] == 3 and spool.committed == 3
    spool.appended = 4
    await long.wait([(spool, 4)])
    await long.idle()  # shutdown's round
    assert spool.synced[-1] == 4 and spool.committed == 4


class GatedSpool:
    """A Syncable whose every sync waits in its worker thread until the test opens that round's gate,
    and fails if the test says so: the order in which rounds end is the test's to choose."""

    def __init__(self) -> None:
        self.committed = self.appended = 0
        self.gates: list[threading.Event] = []  # one per round, in the order the rounds started
        self.fail: set[int] = set()  # rounds (0-based) whose sync raises
        self.released: list[int] = []
        self.failed: list[int] = []

    def take_dirty(self) -> int:
        self.gates.append(threading.Event())
        return len(self.gates) - 1

    def sync(self, dirty: int) -> None:
        assert self.gates[dirty].wait(10)
        if dirty in self.fail:
            raise OSError(5, "Input/output error")

    def sync_failed(self, dirty: int) -> None:
        self.failed.append(dirty)

    def close_sealed(self, dirty: int) -> None:
        pass

    def release(self, dirty: int) -> None:
        self.released.append(dirty)


async def until(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


def request(group: GroupCommit, spool: GatedSpool) -> asyncio.Task[None]:
    spool.appended += 1
    return asyncio.ensure_future(group.wait([(spool, spool.appended)]))


async def test_fsync_rounds_overlap_and_answer_in_the_order_they_started() -> None:
    """A request arriving while a round syncs starts its own round at once; a later round that ends
    first waits for the earlier ones before its requests hear success (its fsyncs did not cover theirs)."""
    rounds: list[int] = []
    group, spool = GroupCommit(None, lambda: rounds.append(1)), GatedSpool()
    first = request(group, spool)
    await until(lambda: len(spool.gates) == 1)
    second = request(group, spool)
    await until(lambda: len(spool.gates) == 2)  # started while the first one still syncs
    assert ROUNDS_IN_FLIGHT == 2
    third, fourth = request(group, spool), request(group, spool)  # both rounds busy: these wait, together
    spool.gates[1].set()  # the second round ends first
    await asyncio.sleep(0.05)
    assert not second.done() and not first.done() and spool.committed == 0
    assert len(spool.gates) == 2  # still two rounds: the second is not settled until the first is
    spool.gates[0].set()
    await asyncio.gather(first, second)
    assert spool.committed == 2 and spool.released[:2] == [0, 1] and len(rounds) == 2
    await until(lambda: len(spool.gates) == 3)  # one round for the two that waited
    spool.gates[2].set()
    await asyncio.gather(third, fourth)
    assert spool.committed == 4 and len(spool.gates) == 3 and spool.failed == []
    await group.idle()


async def test_a_failed_fsync_round_fails_the_rounds_after_it_and_the_waiting_not_the_next_ones() -> None:
    group, spool = GroupCommit(), GatedSpool()
    spool.fail.add(0)
    first = request(group, spool)
    await until(lambda: len(spool.gates) == 1)
    second = request(group, spool)  # its own fsync will succeed, but it may sit behind the first's hole
    await until(lambda: len(spool.gates) == 2)
    waiting = request(group, spool)
    spool.gates[1].set()
    spool.gates[0].set()
    for task in (first, second, waiting):
        with pytest.raises(OSError):
            await task
    assert spool.committed == 0 and spool.failed == [0] and sorted(spool.released) == [0, 1]
    later = request(group, spool)  # not stuck behind the failure
    await until(lambda: len(spool.gates) == 3)
    spool.gates[2].set()
    await later
    assert spool.committed == 4
    await group.idle()


async def test_a_round_whose_fsyncs_ran_beside_a_failed_one_fails_too_even_when_it_started_first() -> None:
    """Linux reports a writeback error to one fsync of an open file: when two rounds fsync the same
    descriptor at once, the second may get the error of the first one's records. The first round
    ended well, but it is not answered before the round beside it is over, and fails with it."""
    group, spool = GroupCommit(), GatedSpool()
    spool.fail.add(1)
    first = request(group, spool)
    await until(lambda: len(spool.gates) == 1)
    second = request(group, spool)
    await until(lambda: len(spool.gates) == 2)
    spool.gates[0].set()  # the first round's fsyncs end well
    await asyncio.sleep(0.05)
    assert not first.done() and spool.committed == 0  # the round beside it still runs
    spool.gates[1].set()  # and fails
    for task in (first, second):
        with pytest.raises(OSError):
            await task
    assert spool.committed == 0 and spool.failed == [1]
    later = request(group, spool)  # a round that starts afterwards is not failed by it
    await until(lambda: len(spool.gates) == 3)
    spool.gates[2].set()
    await later
    assert spool.committed == 3
    await group.idle()


async def test_idle_waits_for_every_round_in_flight_and_the_one_they_start() -> None:
    group, spool = GroupCommit(), GatedSpool()
    tasks = [request(group, spool) for _ in range(2)]
    await until(lambda: len(spool.gates) == 2)
    tasks.append(request(group, spool))  # waits for a free round
    idle = asyncio.ensure_future(group.idle())
    for index in range(3):
        await until(lambda index=index: len(spool.gates) > index)
        await asyncio.sleep(0.02)
        assert not idle.done()
        spool.gates[index].set()
    await idle
    assert all(task.done() for task in tasks) and spool.committed == 3
