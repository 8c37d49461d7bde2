"""`splitter serve` as a real process: hot reload under traffic, bad reloads, signals, draining.

These run the console entry point in its own process and talk to it over loopback sockets, with
the stand-in receivers as upstreams: what an operator does with SIGHUP, a ConfigMap update or
`POST /admin/reload` is done here the same way.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import RunningReceiver, start_receiver
from proxy.engine import EventContext, compile_rules, decide
from tests.conftest import splitter_command

WRITE_KEY = "lifecycle-web-key-0123"
RUDDER_KEY = "lifecycle-rs-key-0123"
RULES = """\
version: 1
destinations:
  segment:     {{kind: segment,     url: "${{SEGMENT_URL}}"}}
  rudderstack: {{kind: rudderstack, url: "${{RUDDERSTACK_DATA_PLANE_URL}}", timeout: 5}}
sources:
  - name: web
    write_keys: ["{key}"]
    credentials: {{rudderstack: "{rudder}"}}
cohort: {{key: [anonymousId, userId], salt: lifecycle}}
rules:
  - name: rollout
    route:
      split: {{rudderstack: {percent}, segment: {rest}}}
"""
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Content-Type": "application/json"}


def rules_text(percent: int) -> str:
    return RULES.format(key=WRITE_KEY, rudder=RUDDER_KEY, percent=percent, rest=100 - percent)


class ConfigMapDir:
    """The layout kubelet gives a mounted ConfigMap: rules.yaml -> ..data/rules.yaml, ..data -> ..<timestamp>."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0

    @property
    def path(self) -> Path:
        return self.root / "rules.yaml"

    def publish(self, text: str) -> None:
        self.version += 1
        target = self.root / f"..2026_11_23_{self.version}"
        target.mkdir()
        (target / "rules.yaml").write_text(text)
        temporary = self.root / "..data_tmp"
        temporary.symlink_to(target.name)
        os.replace(temporary, self.root / "..data")  # the atomic swap kubelet does
        if not self.path.is_symlink():
            self.path.symlink_to("..data/rules.yaml")


@pytest.fixture
async def upstreams():  # type: ignore[no-untyped-def]
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", record=True, valid_keys=[RUDDER_KEY])
    yield segment, rudder
    await segment.close()
    await rudder.close()


def splitter_env(segment: RunningReceiver, rudder: RunningReceiver) -> dict[str, str]:
    return dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url)


async def metric(client: aiohttp.ClientSession, splitter: SplitterProcess, name: str, **labels: str) -> float | None:
    async with client.get(splitter.admin + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.partition(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


async def settled(client: aiohttp.ClientSession, splitter: SplitterProcess, timeout: float = 10.0) -> None:
    """Wait until every spool is empty: all accepted events have been delivered upstream."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = [await metric(client, splitter, "splitter_spool_records", destination=d) for d in ("segment", "rudderstack")]
        if all(p == 0.0 for p in pending):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"spools not empty after {timeout} s: {pending}")


def batch(prefix: str, count: int) -> dict[str, Any]:
    return {"batch": [{"type": "track", "event": "E", "anonymousId": f"{prefix}-{i}", "messageId": f"{prefix}-{i}"} for i in range(count)]}


async def test_reload_under_continuous_traffic_via_configmap_swap(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    configmap = ConfigMapDir(tmp_path)
    configmap.publish(rules_text(10))
    splitter = await launch_splitter(str(configmap.path), splitter_env(segment, rudder), ["--reload-interval", "0.1"])
    statuses: Counter[int] = Counter()
    stop = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as client:
            async def traffic(worker: int) -> None:
                n = 0
                while not stop.is_set():
                    async with client.post(splitter.ingress + "/v1/batch", data=orjson.dumps(batch(f"w{worker}-{n}", 10)), headers=AUTH) as r:
                        statuses[r.status] += 1
                    n += 1

            workers = [asyncio.create_task(traffic(w)) for w in range(4)]
            await asyncio.sleep(0.5)
            configmap.publish(rules_text(60))
            reloaded = await splitter.wait_for_log("config_reloaded", timeout=10)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*workers)
            assert reloaded["trigger"] == "file_change"
            assert set(statuses) == {200} and statuses[200] > 20, statuses
            assert await metric(client, splitter, "splitter_rollout_percent", rule="rollout", destination="rudderstack") == 60.0
            assert await metric(client, splitter, "splitter_config_reloads_total", result="success") == 1.0

            # After the reload, events are routed by the new split, exactly as decide() says.
            new_rules = compile_rules(rules_text(60), env=splitter_env(segment, rudder))
            await settled(client, splitter)
            segment.receiver.clear()
            rudder.receiver.clear()
            probe = batch("after", 400)
            async with client.post(splitter.ingress + "/v1/batch", data=orjson.dumps(probe), headers=AUTH) as r:
                assert r.status == 200
            expected = Counter(decide(new_rules, e, EventContext("web")).primary[0] for e in probe["batch"])
            await settled(client, splitter)
            assert {"segment": segment.receiver.count, "rudderstack": rudder.receiver.count} == dict(expected)
            assert 180 < expected["rudderstack"] < 300  # about 60 %: the new split is live
    finally:
        assert await splitter.stop() == 0


async def test_a_started_process_freezes_what_it_started_with_out_of_the_cyclic_gc(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    """Full collections would otherwise scan every module, rule and app object, tens of ms with the loop stopped."""
    segment, rudder = upstreams
    configmap = ConfigMapDir(tmp_path)
    configmap.publish(rules_text(10))
    splitter = await launch_splitter(str(configmap.path), splitter_env(segment, rudder))
    try:
        frozen = await splitter.wait_for_log("startup_objects_frozen")
        assert int(str(frozen["objects"])) > 50_000
        async with aiohttp.ClientSession() as client, client.post(splitter.ingress + "/v1/batch", data=orjson.dumps(batch("gc", 10)), headers=AUTH) as r:
            assert r.status == 200
    finally:
        await splitter.stop()


async def test_bad_reload_is_refused_and_old_rules_keep_serving(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(10))
    splitter = await launch_splitter(str(path), splitter_env(segment, rudder), ["--reload-interval", "60"])
    try:
        async with aiohttp.ClientSession() as client:
            path.write_text(rules_text(10).replace("segment: 90", "segment: 80"))
            async with client.post(splitter.admin + "/admin/reload") as r:
                assert r.status == 400
                body = await r.json()
            assert body["success"] is False
            assert body["errors"] == [f"{path}:13: rules[0].route.split: percents sum to 90, must be 100"]
            failed = await splitter.wait_for_log("config_reload_failed")
            assert failed["errors"] == body["errors"]
            async with client.post(splitter.ingress + "/v1/batch", data=orjson.dumps(batch("x", 50)), headers=AUTH) as r:
                assert r.status == 200
            old_rules = compile_rules(rules_text(10), env=splitter_env(segment, rudder))
            expected = sum(1 for e in batch("x", 50)["batch"] if decide(old_rules, e, EventContext("web")).primary == ("rudderstack",))
            await settled(client, splitter)
            assert rudder.receiver.count == expected
            assert await metric(client, splitter, "splitter_config_reloads_total", result="error") == 1.0
            assert await metric(client, splitter, "splitter_rollout_percent", rule="rollout", destination="rudderstack") == 10.0
    finally:
        assert await splitter.stop() == 0


async def test_sighup_reloads_and_a_reshuffle_needs_consent(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(10))
    splitter = await launch_splitter(str(path), splitter_env(segment, rudder), ["--reload-interval", "60"])
    try:
        async with aiohttp.ClientSession() as client:
            path.write_text(rules_text(25))
            splitter.signal(signal.SIGHUP)
            record = await splitter.wait_for_log("config_reloaded")
            assert record["trigger"] == "sighup"
            assert await metric(client, splitter, "splitter_rollout_percent", rule="rollout", destination="rudderstack") == 25.0

            path.write_text(rules_text(5))  # a rollback: allowed, and logged loudly with the buckets moved back
            splitter.signal(signal.SIGHUP)
            rollback = await splitter.wait_for_log("config_rollback")
            assert rollback["buckets_back"] == 2000 and rollback["level"] == "warning"

            path.write_text(rules_text(5).replace("salt: lifecycle", "salt: other"))
            async with client.post(splitter.admin + "/admin/reload") as r:
                assert r.status == 400
                assert "reshuffle: true" in (await r.json())["message"] + " ".join((await r.json())["errors"])
            path.write_text(rules_text(5).replace("salt: lifecycle", "salt: other, reshuffle: true"))
            async with client.post(splitter.admin + "/admin/reload") as r:
                assert r.status == 200
    finally:
        assert await splitter.stop() == 0


async def test_sigterm_finishes_in_flight_requests_then_exits_zero(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(100))
    rudder.receiver.faults.delay = 1.5
    splitter = await launch_splitter(str(path), splitter_env(segment, rudder), ["--drain-timeout", "10"])
    async with aiohttp.ClientSession() as client:
        async def slow_request() -> int:
            async with client.post(splitter.ingress + "/v1/batch", data=orjson.dumps(batch("drain", 5)), headers=AUTH) as r:
                return r.status

        in_flight = asyncio.create_task(slow_request())
        await asyncio.sleep(0.5)
        started = time.monotonic()
        splitter.signal(signal.SIGTERM)
        await splitter.wait_for_log("draining")
        splitter.process.send_signal(signal.SIGTERM)  # an impatient second SIGTERM must not cut the drain short
        with pytest.raises(aiohttp.ClientConnectionError):
            async with client.post(splitter.ingress + "/v1/batch", data=b"{}", headers=AUTH, timeout=aiohttp.ClientTimeout(total=2)):
                pass
        assert await in_flight == 200
        code = await splitter.stop()
    assert code == 0
    assert time.monotonic() - started < 8
    assert rudder.receiver.count == 5
    assert splitter.events("stopped")


async def test_bad_rules_at_start_exit_2_with_located_errors(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(10).replace("segment: 90", "segment: 80"))
    with pytest.raises(RuntimeError, match="exited during start-up with code 2") as failure:
        await launch_splitter(str(path), splitter_env(segment, rudder))
    assert f"{path}:13: rules[0].route.split: percents sum to 90, must be 100" in str(failure.value)


async def test_public_admin_address_without_token_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(10))
    env = dict(os.environ, SEGMENT_URL="http://127.0.0.1:9", RUDDERSTACK_DATA_PLANE_URL="http://127.0.0.1:9")
    env.pop("SPLITTER_ADMIN_TOKEN", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(path), "--admin", "0.0.0.0:0",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 3
    assert "SPLITTER_ADMIN_TOKEN" in stderr.decode()


def catches_sighup(pid: int) -> bool:
    """The kernel's own view (/proc/PID/status SigCgt): does the process catch SIGHUP rather than die of it?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
    return bool(caught & (1 << (signal.SIGHUP - 1)))


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sighup_from_the_first_moments_of_start_never_kills(tmp_path: Path, upstreams, workers: str) -> None:  # type: ignore[no-untyped-def]
    """systemd's ExecReload (kill -HUP) can come at any time: from the moment the interpreter hands
    over to splitter (the kernel shows SIGHUP caught) it is survived, and one that comes before the
    reloader runs becomes a reload once it does."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text(20))
    started_at = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *splitter_command("serve", "--config", str(rules), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--workers", workers,
                          "--spool-dir", str(tmp_path / "spool"), "--dead-letter-dir", str(tmp_path / "dead"), "--state-dir", str(tmp_path / "state")),
        env=splitter_env(*upstreams), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    lines: list[dict[str, Any]] = []

    async def read() -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            lines.append(orjson.loads(line))

    reader = asyncio.create_task(read())
    try:
        while not catches_sighup(process.pid):
            assert process.returncode is None and time.monotonic() - started_at < 10, "SIGHUP never caught"
            await asyncio.sleep(0.001)
        caught_after = time.monotonic() - started_at
        sent = 0
        deadline = time.monotonic() + 30
        while not any(line.get("event") == "started" for line in lines):
            assert time.monotonic() < deadline, f"never started: {lines[-3:]}"
            assert process.returncode is None, f"died of an early SIGHUP (exit {process.returncode}) after {sent} signals"
            process.send_signal(signal.SIGHUP)
            sent += 1
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.5)
        assert process.returncode is None
        assert sent > 5, f"the test sent only {sent} signals before start ({caught_after:.3f} s to catch SIGHUP)"
        reloads = [line for line in lines if str(line.get("event", "")).startswith("config_reload") and line.get("trigger") == "sighup"]
        assert reloads, "a SIGHUP held during start-up must become a reload once the reloader runs"
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
        await reader
    assert code == 0


SERVE_VARIABLES = {  # every `serve` flag's variable before auto_envvar_prefix: the same names, none lost
    "SPLITTER_CONFIG", "SPLITTER_LISTEN", "SPLITTER_ADMIN", "SPLITTER_REGION", "SPLITTER_DRAIN_TIMEOUT", "SPLITTER_RELOAD_INTERVAL",
    "SPLITTER_TRUSTED_PROXIES", "SPLITTER_CORS_ORIGINS", "SPLITTER_MAX_IN_FLIGHT", "SPLITTER_HEADER_TIMEOUT", "SPLITTER_BODY_TIMEOUT",
    "SPLITTER_SPOOL_DIR", "SPLITTER_DEAD_LETTER_DIR", "SPLITTER_CDN_URL", "SPLITTER_PUBLIC_URL", "SPLITTER_CDN_CACHE_SECONDS",
    "SPLITTER_LOG_LEVEL", "SPLITTER_WORKERS", "SPLITTER_STATE_DIR", "SPLITTER_GEOIP_DB", "SPLITTER_DURABILITY", "SPLITTER_SYNC_INTERVAL",
    "SPLITTER_REPLICA_ID", "SPLITTER_TIER_TTL",
}


def test_serve_help_names_each_flags_variable_as_the_docs_do() -> None:
    result = subprocess.run(splitter_command("serve", "--help"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # click wraps the help to the terminal's width
    assert set(re.findall(r"env var: (SPLITTER_\w+)", text)) == SERVE_VARIABLES
    assert "[env var: SPLITTER_LISTEN; default: 0.0.0.0:8080]" in text
    docs = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    table = docs.partition("## `splitter serve` flags and environment")[2].partition("Exit codes:")[0]
    assert set(re.findall(r"`(SPLITTER_\w+)`", table)) == SERVE_VARIABLES | {"SPLITTER_ADMIN_TOKEN", "SPLITTER_NO_EXTENSIONS"}


async def test_serve_runs_from_splitter_variables_alone(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    """No flag at all, the way deploy/ manifests and the systemd unit configure it."""
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(10))
    env = {**splitter_env(*upstreams), "SPLITTER_CONFIG": str(path), "SPLITTER_LISTEN": "127.0.0.1:0", "SPLITTER_ADMIN": "127.0.0.1:0",
           "SPLITTER_REGION": "eu-test-1", "SPLITTER_DRAIN_TIMEOUT": "3", "SPLITTER_RELOAD_INTERVAL": "60",
           "SPLITTER_SPOOL_DIR": str(tmp_path / "spool"), "SPLITTER_DEAD_LETTER_DIR": str(tmp_path / "dead"),
           "SPLITTER_STATE_DIR": str(tmp_path / "state")}
    process = await asyncio.create_subprocess_exec(*splitter_command("serve"), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    lines: list[dict[str, Any]] = []
    try:
        while not lines or lines[-1].get("event") != "started":
            line = await asyncio.wait_for(process.stdout.readline(), 20)
            assert line, f"exited during start-up: {lines[-3:]}"
            lines.append(orjson.loads(line))
        started = lines[-1]
        assert (started["region"], started["rules"]) == ("eu-test-1", str(path))
        assert started["listen"][0].startswith("127.0.0.1:") and started["admin"][0].startswith("127.0.0.1:")
        assert (tmp_path / "spool" / "segment").is_dir()
        assert (tmp_path / "state" / "last-good.json").is_file()
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 30)
    draining = [orjson.loads(line) for line in rest.splitlines() if b'"draining"' in line]
    assert process.returncode == 0 and [d["timeout"] for d in draining] == [3.0]
