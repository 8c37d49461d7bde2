"""`splitter serve --workers N` as real processes: a supervisor, its workers, real signals and sockets.

Every test runs the console entry point with the stand-in receivers as upstreams and checks what an
operator relies on: events delivered once, `/metrics` summed over workers, per-worker spools,
reloads reaching every worker, a killed worker restarted with nothing acknowledged lost, a clean
SIGTERM drain, and spools left by a larger N (or by a single process) drained, not forgotten.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest

from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import RunningReceiver, start_receiver
from proxy.delivery.worker_dirs import leftovers, worker_dir
from tests.rules_texts import served_head

WRITE_KEY = "workers-web-key-0123"
RUDDER_KEY = "workers-rs-key-0123"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Content-Type": "application/json"}
TIMEOUT = 30.0  # generous: these wait for processes and retries, never measure them


def rules_text(percent: int) -> str:
    return served_head(WRITE_KEY, RUDDER_KEY, delivery="retry_base: 0.05, retry_max: 0.5, breaker_cooldown: 0.1") + f"""\
cohort: {{key: [anonymousId], salt: workers}}
rules:
  - name: rollout
    route:
      split: {{rudderstack: {percent}, segment: {100 - percent}}}
"""


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[RunningReceiver, RunningReceiver]]:
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", record=True, valid_keys=[RUDDER_KEY])
    yield segment, rudder
    await segment.close()
    await rudder.close()


@pytest.fixture
def rules_path(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(50))
    return path


async def start(rules: Path, upstreams: tuple[RunningReceiver, RunningReceiver], state: Path, *extra: str) -> SplitterProcess:
    segment, rudder = upstreams
    env = dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url, PYTHONUNBUFFERED="1")  # as in the image
    return await launch_splitter(str(rules), env, ["--spool-dir", str(state / "spool"), "--dead-letter-dir", str(state / "dead-letter"),
                                                   "--reload-interval", "60", *extra])


async def send(splitter: SplitterProcess, prefix: str, requests: int, per_request: int = 5) -> list[str]:
    """Each request on a fresh connection, so the kernel spreads them over the workers; returns acked messageIds."""
    acked: list[str] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
        for n in range(requests):
            ids = [f"{prefix}-{n}-{i}" for i in range(per_request)]
            body = {"batch": [{"type": "track", "event": "E", "anonymousId": m, "messageId": m} for m in ids]}
            async with client.post(splitter.ingress + "/v1/batch", data=orjson.dumps(body), headers=AUTH) as response:
                assert response.status == 200, (await response.text(), splitter.log[-5:])
            acked.extend(ids)
    return acked


async def scrape(splitter: SplitterProcess) -> str:
    async with aiohttp.ClientSession() as client, client.get(splitter.admin + "/metrics") as response:
        assert response.status == 200
        return await response.text()


def total(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels`."""
    found = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric == name and labels.items() <= dict(re.findall(r'(\w+)="([^"]*)"', label_text)).items():
            found += float(value)
    return found


async def eventually(check: Callable[[], Awaitable[bool]], what: str, splitter: SplitterProcess, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}; last log lines: {splitter.log[-12:]}")
        await asyncio.sleep(0.05)


def received(upstreams: tuple[RunningReceiver, RunningReceiver]) -> list[str]:
    return [m for u in upstreams for m in u.receiver.message_ids()]


def worker_pids(splitter: SplitterProcess, role: str) -> list[int]:
    return [int(r["pid"]) for r in splitter.events("worker_started") if r.get("process") == role]  # type: ignore[arg-type]


async def test_two_workers_deliver_exactly_once_and_metrics_sum_over_workers(tmp_path: Path, rules_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    splitter = await start(rules_path, upstreams, tmp_path, "--workers", "2")
    try:
        assert splitter.events("started")[0]["workers"] == 2
        assert sorted(r["process"] for r in splitter.events("worker_started")) == ["worker-0", "worker-1"]  # type: ignore[type-var]
        assert worker_dir(tmp_path / "spool", 0).is_dir() and worker_dir(tmp_path / "spool", 1).is_dir()
        acked = await send(splitter, "once", 40)

        async def all_delivered() -> bool:
            return len(received(upstreams)) >= len(acked)

        await eventually(all_delivered, f"{len(acked)} events delivered", splitter)
        await asyncio.sleep(0.3)  # a duplicate, if any, would arrive now
        assert sorted(received(upstreams)) == sorted(acked)  # each event once, to one destination
        text = await scrape(splitter)
        assert total(text, "splitter_events_total") == len(acked)
        assert total(text, "splitter_events_delivered_total") == len(acked)
        assert total(text, "splitter_requests_total", path="/v1/batch", code="200") == 40
        assert total(text, "splitter_workers_ready") == 2
        assert total(text, "splitter_rollout_percent", rule="rollout", destination="rudderstack") == 50
        assert "pid=" not in text  # every gauge is merged over the workers, none listed per process
        async with aiohttp.ClientSession() as client, client.get(splitter.admin + "/readyz") as response:
            assert response.status == 200
    finally:
        assert await splitter.stop() == 0
    assert not splitter.events("unparsed")  # the processes share stdout, and no two lines ran together


async def test_sighup_and_admin_reload_reach_every_worker(tmp_path: Path, rules_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    splitter = await start(rules_path, upstreams, tmp_path, "--workers", "2")
    try:
        rules_path.write_text(rules_text(70))
        splitter.signal(signal.SIGHUP)

        async def both_reloaded() -> bool:
            return {r.get("process") for r in splitter.events("config_reloaded")} >= {"worker-0", "worker-1", "supervisor"}

        await eventually(both_reloaded, "config_reloaded from both workers and the supervisor", splitter)
        assert total(await scrape(splitter), "splitter_rollout_percent", rule="rollout", destination="rudderstack") == 70

        rules_path.write_text(rules_text(60))  # a rollback: allowed, and it too must reach both workers
        async with aiohttp.ClientSession() as client, client.post(splitter.admin + "/admin/reload") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "success"

        async def both_rolled_back() -> bool:
            return len([r for r in splitter.events("config_rollback") if str(r.get("process")).startswith("worker-")]) == 2

        await eventually(both_rolled_back, "config_rollback from both workers", splitter)
        text = await scrape(splitter)
        assert total(text, "splitter_rollout_percent", rule="rollout", destination="rudderstack") == 60
        # Counted once, by the supervisor, however many workers reloaded the same file.
        assert total(text, "splitter_config_reloads_total", result="success") == 2
        assert total(text, "splitter_config_rollbacks_total", kind="split") == 1

        rules_path.write_text(rules_text(60).replace("salt: workers", "salt: changed"))  # refused: a reshuffle
        assert rules_text(60) != rules_path.read_text()
        async with aiohttp.ClientSession() as client, client.post(splitter.admin + "/admin/reload") as response:
            assert response.status == 400 and (await response.json())["status"] == "refused"
        splitter.signal(signal.SIGHUP)  # the same file again: answered and logged, not counted again

        async def refused_twice_everywhere() -> bool:  # the POST's and the SIGHUP's, by the supervisor and both workers
            return len(splitter.events("config_reload_refused")) >= 6

        await eventually(refused_twice_everywhere, "the refusals of the POST and the SIGHUP", splitter)
        assert total(await scrape(splitter), "splitter_config_reloads_total", result="refused") == 1
    finally:
        assert await splitter.stop() == 0


async def test_a_killed_worker_is_restarted_and_its_spool_replayed(tmp_path: Path, rules_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    _segment, rudder = upstreams
    rules_path.write_text(rules_text(100))
    rudder.receiver.faults.status = 503  # the upstream is out: every accepted event waits in a spool
    splitter = await start(rules_path, upstreams, tmp_path, "--workers", "2")
    try:
        acked = await send(splitter, "kill", 30)

        async def all_spooled() -> bool:
            return total(await scrape(splitter), "splitter_spool_records", destination="rudderstack") == len(acked)

        await eventually(all_spooled, "the spool gauges, summed over workers, count every acked event", splitter)
        [victim] = worker_pids(splitter, "worker-0")
        os.kill(victim, signal.SIGKILL)
        exited = await splitter.wait_for_log("worker_exited", timeout=TIMEOUT)
        assert exited["process"] == "supervisor" and exited["role"] == "worker-0" and exited["code"] == -signal.SIGKILL

        async def restarted() -> bool:
            return len(worker_pids(splitter, "worker-0")) == 2

        await eventually(restarted, "worker-0 restarted", splitter)
        assert total(await scrape(splitter), "splitter_worker_restarts_total", role="worker-0") == 1
        rudder.receiver.faults.status = None

        async def all_delivered() -> bool:
            return set(acked) <= set(rudder.receiver.message_ids())

        await eventually(all_delivered, "every acknowledged event delivered after the restart", splitter)
        assert {r.get("process") for r in splitter.events("spool_recovered")} >= {"worker-0"}  # replayed from its own spool
    finally:
        assert await splitter.stop() == 0


async def test_sigterm_drains_every_worker_and_exits_zero(tmp_path: Path, rules_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    segment.receiver.faults.delay = rudder.receiver.faults.delay = 0.5  # slow upstreams: work is still in the spools at SIGTERM
    splitter = await start(rules_path, upstreams, tmp_path, "--workers", "2", "--drain-timeout", "20")
    acked = await send(splitter, "drain", 20)
    splitter.signal(signal.SIGTERM)
    assert await splitter.stop() == 0
    assert sorted(received(upstreams)) == sorted(acked)
    assert {r.get("process") for r in splitter.events("stopped")} == {"worker-0", "worker-1", "supervisor"}


async def test_spools_no_worker_owns_are_drained_at_start(tmp_path: Path, rules_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    segment.receiver.faults.status = rudder.receiver.faults.status = 503
    first = await start(rules_path, upstreams, tmp_path, "--drain-timeout", "0.5")  # a single process: <spool-dir>/<destination>
    acked = await send(first, "single", 10)
    assert await first.stop() == 0
    second = await start(rules_path, upstreams, tmp_path, "--workers", "3", "--drain-timeout", "0.5")
    acked += await send(second, "three", 30)
    assert await second.stop() == 0
    assert leftovers(tmp_path / "spool", 2)[0] == tmp_path / "spool"  # and worker-2's, if the kernel gave it a connection

    segment.receiver.faults.status = rudder.receiver.faults.status = None
    third = await start(rules_path, upstreams, tmp_path, "--workers", "2")
    try:
        assert {"drain:spool"} <= set(third.events("started")[0]["drainers"])  # type: ignore[arg-type]

        async def all_delivered() -> bool:
            return set(acked) <= set(received(upstreams))

        await eventually(all_delivered, "every event spooled by earlier runs delivered", third)
        await third.wait_for_log("leftover_spool_drained", timeout=TIMEOUT)
    finally:
        assert await third.stop() == 0


async def test_a_single_process_reports_spools_left_by_workers(tmp_path: Path, rules_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    segment.receiver.faults.status = rudder.receiver.faults.status = 503
    workers = await start(rules_path, upstreams, tmp_path, "--workers", "2", "--drain-timeout", "0.5")
    await send(workers, "left", 10)
    assert await workers.stop() == 0
    single = await start(rules_path, upstreams, tmp_path)
    try:
        orphaned = {str(r["directory"]) for r in single.events("spool_orphaned")}
        assert orphaned and orphaned <= {str(worker_dir(tmp_path / "spool", 0)), str(worker_dir(tmp_path / "spool", 1))}
    finally:
        assert await single.stop() == 0


async def test_workers_drain_and_stop_when_their_supervisor_is_killed(tmp_path: Path, rules_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    segment.receiver.faults.status = rudder.receiver.faults.status = 503  # nothing is delivered before the supervisor dies
    splitter = await start(rules_path, upstreams, tmp_path, "--workers", "2")
    acked = await send(splitter, "orphan", 10)
    assert received(upstreams) == []
    splitter.process.kill()  # SIGKILL: the supervisor cannot tell its workers anything

    async def both_lost() -> bool:
        return {r.get("process") for r in splitter.events("supervisor_lost")} == {"worker-0", "worker-1"}

    await eventually(both_lost, "both workers noticed", splitter)
    segment.receiver.faults.status = rudder.receiver.faults.status = None  # the drain they do on their own delivers

    async def both_stopped() -> bool:
        return {r.get("process") for r in splitter.events("stopped")} >= {"worker-0", "worker-1"}

    await eventually(both_stopped, "both workers stopped on their own", splitter)
    assert await splitter.stop() == -signal.SIGKILL
    assert sorted(received(upstreams)) == sorted(acked)  # they drained before stopping


async def test_a_worker_that_cannot_start_stops_the_others_and_exits_3(tmp_path: Path, rules_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    locked = worker_dir(tmp_path / "spool", 1)
    locked.mkdir(parents=True)
    with open(locked / ".lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another splitter using that spool would
        with pytest.raises(RuntimeError, match="exited during start-up with code 3") as failure:
            await start(rules_path, upstreams, tmp_path, "--workers", "2")
    assert "workers_failed_to_start" in str(failure.value)


async def test_a_supervisor_whose_admin_port_is_taken_exits_3_before_any_worker_starts(tmp_path: Path, rules_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        with pytest.raises(RuntimeError, match="exited during start-up with code 3") as failure:
            await start(rules_path, upstreams, tmp_path, "--workers", "2", "--admin", taken)  # the later --admin wins
    assert "listen_failed" in str(failure.value) and "worker_started" not in str(failure.value)
    assert not (tmp_path / "spool").exists()  # no worker ever ran


async def test_workers_env_below_one_refuses_to_start(rules_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(rules_path), env=dict(os.environ, SPLITTER_WORKERS="0"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode == 3
    assert stderr.decode().strip() == "splitter: --workers (SPLITTER_WORKERS) must be 1 or more"


def test_layout_names_only_spools_no_worker_owns(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    for owner in ("segment", "worker-0/segment", "worker-1/rudderstack", "worker-3/segment", "worker-4/segment"):
        (spool / owner).mkdir(parents=True)
        (spool / owner / "000000000001.seg").write_bytes(b"SPLTSEG1" + (b"record" if owner != "worker-4/segment" else b""))
    assert leftovers(spool, 2) == [spool, spool / "worker-3"]  # worker-4 holds an empty segment only
    assert leftovers(spool, 4) == [spool]


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("exists", [False, True])
async def test_a_prometheus_multiproc_dir_from_the_environment_is_not_used(tmp_path: Path, rules_path: Path, upstreams, workers: str,  # type: ignore[no-untyped-def]
                                                                          exists: bool) -> None:
    """An inherited PROMETHEUS_MULTIPROC_DIR (another app's, or one long removed) must neither crash
    start-up nor hide the rules gauges: splitter uses its own directory, or none, whatever it says."""
    segment, rudder = upstreams
    inherited = tmp_path / "inherited"
    if exists:
        inherited.mkdir()
    env = dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url, PROMETHEUS_MULTIPROC_DIR=str(inherited))
    splitter = await launch_splitter(str(rules_path), env, ["--spool-dir", str(tmp_path / "spool"), "--dead-letter-dir", str(tmp_path / "dl"),
                                                            "--reload-interval", "60", "--workers", workers])
    try:
        acked = await send(splitter, "inherited", 4)

        async def counted() -> bool:
            return total(await scrape(splitter), "splitter_events_total") == len(acked)

        await eventually(counted, "every routed event counted once", splitter)
        text = await scrape(splitter)
        assert total(text, "splitter_rollout_percent", rule="rollout", destination="rudderstack") == 50
        assert total(text, "splitter_config_info") == 1
        assert list(inherited.iterdir()) == [] if exists else not inherited.exists()
    finally:
        assert await splitter.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_known_label_values_are_exported_at_zero_before_any_traffic(tmp_path: Path, rules_path: Path, upstreams, workers: str) -> None:  # type: ignore[no-untyped-def]
    """rate() and the shipped alerts see the first occurrence only if the series already exists at 0."""
    splitter = await start(rules_path, upstreams, tmp_path, "--workers", workers)
    try:
        text = await scrape(splitter)
        for result in ("success", "error", "refused", "unchanged"):
            assert f'splitter_config_reloads_total{{result="{result}"}} 0.0' in text, result
        for destination in ("segment", "rudderstack"):
            for name in ("splitter_events_delivered_total", "splitter_events_dead_lettered_total", "splitter_upstream_retries_total",
                         "splitter_spool_replayed_total", "splitter_dedup_hits_total"):
                assert f'{name}{{destination="{destination}"}} 0.0' in text, (name, destination)
            for reason in ("spool_full", "spool_error"):
                assert f'splitter_mirror_dropped_total{{destination="{destination}",reason="{reason}"}} 0.0' in text
        if workers == "2":
            for role in ("worker-0", "worker-1"):
                assert f'splitter_worker_restarts_total{{role="{role}"}} 0.0' in text
    finally:
        assert await splitter.stop() == 0
