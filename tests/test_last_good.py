"""The last good rules survive a restart (issue 17): real `splitter serve` processes, real files, real signals.

A rules file a reload refused stays on disk; the next start compares it with the last good rules
kept in `--state-dir` the way a reload does, starts on those if it would be refused, and says so
(log, `/readyz` detail, `splitter_config_file_refused`, the shipped alert) until the file is fixed
or consents with `reshuffle: true`. `splitter check --against` gives the same verdict offline.
"""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from loadtest.process import SplitterProcess, launch_splitter
from loadtest.receivers import RunningReceiver, start_receiver
from proxy.control.last_good import LastGoodStore, LastGoodUnreadable
from proxy.engine import EventContext, compile_rules, decide
from tests.conftest import ROOT, RULES_ENV, splitter_command

WRITE_KEY = "last-good-web-key-0123"
RUDDER_KEY = "last-good-rs-key-0123"
RULES = """\
version: 1
destinations:
  segment:     {{kind: segment,     url: "${{SEGMENT_URL}}", delivery: {{retry_base: 0.02, retry_max: 0.2, flush_interval: 0.002}}}}
  rudderstack: {{kind: rudderstack, url: "${{RUDDERSTACK_DATA_PLANE_URL}}", timeout: 5, delivery: {{retry_base: 0.02, retry_max: 0.2, flush_interval: 0.002}}}}
sources:
  - name: web
    write_keys: ["{key}"]
    credentials: {{rudderstack: "{rudder}"}}
cohort:
  key: [userId]
  salt: "{salt}"{reshuffle}
rules:
  - name: rollout
    route:
      split: {{rudderstack: {percent}, segment: {rest}}}
"""
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Content-Type": "application/json"}
SALT_REFUSAL = ("rule 'rollout': cohort salt changed from 's1' to 's2'; this reshuffles users between destinations. "
                "Set `reshuffle: true` on the rule (or on the cohort) to do it anyway")


def rules_text(percent: int, salt: str = "s1", reshuffle: bool = False) -> str:
    return RULES.format(key=WRITE_KEY, rudder=RUDDER_KEY, salt=salt, reshuffle="\n  reshuffle: true" if reshuffle else "",
                        percent=percent, rest=100 - percent)


A, B = rules_text(10), rules_text(50)  # B widens A: accepted
C = rules_text(50, salt="s2")  # a salt change without consent: refused against B
C_CONSENTED = rules_text(50, salt="s2", reshuffle=True)


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[RunningReceiver, RunningReceiver]]:
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", record=True, valid_keys=[RUDDER_KEY])
    yield segment, rudder
    await segment.close()
    await rudder.close()


def env_for(upstreams: tuple[RunningReceiver, RunningReceiver]) -> dict[str, str]:
    segment, rudder = upstreams
    return dict(os.environ, SEGMENT_URL=segment.url, RUDDERSTACK_DATA_PLANE_URL=rudder.url)


def sha(text: str) -> str:
    return compile_rules(text, env={"SEGMENT_URL": "http://x", "RUDDERSTACK_DATA_PLANE_URL": "http://x"}).sha256


def record(state: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((state / "last-good.json").read_bytes())
    return loaded


async def launch(rules: Path, env: Mapping[str, str], tmp_path: Path, state: Path, *extra: str) -> SplitterProcess:
    return await launch_splitter(str(rules), env, ["--spool-dir", str(tmp_path / "spool"), "--dead-letter-dir", str(tmp_path / "dead"),
                                                   "--state-dir", str(state), "--reload-interval", "60", "--drain-timeout", "5", *extra])


async def get_json(client: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with client.get(url) as response:
        return response.status, await response.json()


async def reload(client: aiohttp.ClientSession, splitter: SplitterProcess) -> tuple[int, Any]:
    async with client.post(splitter.admin + "/admin/reload") as response:
        return response.status, await response.json()


async def metric(client: aiohttp.ClientSession, splitter: SplitterProcess, name: str) -> float | None:
    async with client.get(splitter.admin + "/metrics") as response:
        text = await response.text()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + " ", name + "{"))]
    assert len(values) <= 1, values
    return values[0] if values else None


async def send_and_check_routing(client: aiohttp.ClientSession, splitter: SplitterProcess, upstreams: tuple[RunningReceiver, RunningReceiver],
                                 serving: str, other: str, tag: str) -> None:
    """Send 60 users' events; each lands where `serving` routes it, and `other` would route some elsewhere."""
    segment, rudder = upstreams
    env = {"SEGMENT_URL": segment.url, "RUDDERSTACK_DATA_PLANE_URL": rudder.url}
    expected, alternative = compile_rules(serving, env=env), compile_rules(other, env=env)
    events = [{"type": "track", "event": "E", "userId": f"{tag}-{i}", "messageId": f"{tag}-{i}"} for i in range(60)]
    ctx = EventContext("web", None, None)
    want = {e["messageId"]: decide(expected, e, ctx).primary for e in events}
    assert any(want[e["messageId"]] != decide(alternative, e, ctx).primary for e in events), "the two rule sets must route differently"
    segment.receiver.clear()
    rudder.receiver.clear()
    async with client.post(splitter.ingress + "/v1/batch", data=orjson.dumps({"batch": events}), headers=AUTH) as response:
        assert response.status == 200
    to_rudder = sum(1 for d in want.values() if d == ("rudderstack",))
    await rudder.receiver.wait_for(to_rudder)
    await segment.receiver.wait_for(len(events) - to_rudder)
    got = {r.event["messageId"]: ("segment",) for r in segment.receiver.events} | {r.event["messageId"]: ("rudderstack",) for r in rudder.receiver.events}
    assert got == want


# --------------------------------------------------------------------------- serve

async def test_a_restart_on_a_refused_file_serves_the_last_good_rules_until_consent(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    rules, state = tmp_path / "rules.yaml", tmp_path / "state"
    env = env_for(upstreams)
    rules.write_text(A)
    first = await launch(rules, env, tmp_path, state)
    try:
        async with aiohttp.ClientSession() as client:
            assert record(state)["sha256"] == sha(A) and record(state)["text"] == A
            assert stat.S_IMODE((state / "last-good.json").stat().st_mode) == 0o600  # the text may hold write keys
            rules.write_text(B)
            status, body = await reload(client, first)
            assert (status, body["status"]) == (200, "success")
            assert record(state)["sha256"] == sha(B)
            rules.write_text(C)
            status, body = await reload(client, first)
            assert (status, body["status"], body["errors"]) == (400, "refused", [SALT_REFUSAL])
            assert record(state)["sha256"] == sha(B)  # a refused file is never the last good
    finally:
        assert await first.stop() == 0

    second = await launch(rules, env, tmp_path, state)
    try:
        started = second.events("started")[-1]
        assert started["rules_source"] == "last_good" and started["sha256"] == sha(B)[:12]
        [refused] = second.events("config_refused_at_start")
        assert refused["level"] == "error" and refused["errors"] == [SALT_REFUSAL]
        assert refused["sha256"] == sha(C)[:12] and refused["last_good_sha256"] == sha(B)[:12] and refused["path"] == str(rules)
        async with aiohttp.ClientSession() as client:
            assert (await get_json(client, second.admin + "/admin/config"))[1]["sha256"] == sha(B)
            status, ready = await get_json(client, second.admin + "/readyz")
            assert status == 200  # ready: the last good rules are the safe state; the kubelet reads only the status
            assert ready == {"status": "ready", "sha256": sha(B), "rules": "last_good", "file": str(rules), "file_sha256": sha(C),
                             "active_sha256": sha(B), "refused": [SALT_REFUSAL]}
            assert await metric(client, second, "splitter_config_file_refused") == 1
            await send_and_check_routing(client, second, upstreams, serving=B, other=C, tag="restart")

            rules.write_text(C_CONSENTED)
            status, body = await reload(client, second)
            assert (status, body["status"]) == (200, "success")
            assert await get_json(client, second.admin + "/readyz") == (200, {"status": "ready", "sha256": sha(C_CONSENTED)})
            assert await metric(client, second, "splitter_config_file_refused") == 0
            assert record(state)["sha256"] == sha(C_CONSENTED)
            await send_and_check_routing(client, second, upstreams, serving=C_CONSENTED, other=B, tag="consented")
    finally:
        assert await second.stop() == 0


async def test_a_fresh_state_dir_starts_on_the_file(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    rules, state = tmp_path / "rules.yaml", tmp_path / "state"
    LastGoodStore(state).save(compile_rules(B, env=env_for(upstreams)))
    rules.write_text(C)
    fresh = tmp_path / "fresh-state"
    splitter = await launch(rules, env_for(upstreams), tmp_path, fresh)
    try:
        assert "rules_source" not in splitter.events("started")[-1] and not splitter.events("config_refused_at_start")
        async with aiohttp.ClientSession() as client:
            assert await get_json(client, splitter.admin + "/readyz") == (200, {"status": "ready", "sha256": sha(C)})
            assert await metric(client, splitter, "splitter_config_file_refused") == 0
        assert record(fresh)["sha256"] == sha(C)
    finally:
        assert await splitter.stop() == 0


async def test_last_good_rules_that_no_longer_compile_are_logged_and_the_file_serves(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    rules, state = tmp_path / "rules.yaml", tmp_path / "state"
    gone = B.replace('url: "${SEGMENT_URL}"', 'url: "${GONE_SEGMENT_URL}"')
    LastGoodStore(state).save(compile_rules(gone, env={**env_for(upstreams), "GONE_SEGMENT_URL": "http://127.0.0.1:9"}))
    rules.write_text(C)  # refused against `gone`, if `gone` still compiled
    splitter = await launch(rules, env_for(upstreams), tmp_path, state)
    try:
        [unusable] = splitter.events("last_good_unusable")
        assert unusable["level"] == "error" and "GONE_SEGMENT_URL" in " ".join(unusable["errors"])  # type: ignore[arg-type]
        assert not splitter.events("config_refused_at_start")
        async with aiohttp.ClientSession() as client:
            assert await get_json(client, splitter.admin + "/readyz") == (200, {"status": "ready", "sha256": sha(C)})
        assert record(state)["sha256"] == sha(C)
    finally:
        assert await splitter.stop() == 0


async def test_a_damaged_record_is_logged_and_the_file_serves(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    rules, state = tmp_path / "rules.yaml", tmp_path / "state"
    LastGoodStore(state).save(compile_rules(B, env=env_for(upstreams)))
    damaged = record(state) | {"text": B.replace("50", "40")}  # the text edited by hand, the sha256 not
    (state / "last-good.json").write_bytes(orjson.dumps(damaged))
    rules.write_text(C)
    splitter = await launch(rules, env_for(upstreams), tmp_path, state)
    try:
        [unreadable] = splitter.events("last_good_unreadable")
        assert "sha256" in str(unreadable["error"]) and not splitter.events("config_refused_at_start")
        assert splitter.events("started")[-1]["sha256"] == sha(C)[:12]
    finally:
        assert await splitter.stop() == 0


async def test_the_file_watcher_ends_or_updates_the_refusal(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    """Put back as it was (reload `unchanged`): the file is fixed. Another refused edit: the detail follows it."""
    rules, state = tmp_path / "rules.yaml", tmp_path / "state"
    LastGoodStore(state).save(compile_rules(B, env=env_for(upstreams)))
    rules.write_text(C)
    splitter = await launch(rules, env_for(upstreams), tmp_path, state, "--reload-interval", "0.1")
    try:
        async with aiohttp.ClientSession() as client:
            await asyncio.sleep(0.5)  # several polls: the file refused at start is not reloaded again while it is unchanged
            assert not [e for e in splitter.log if str(e.get("event", "")).startswith("config_reload")]
            other = rules_text(50, salt="s3")
            rules.write_text(other)
            await splitter.wait_for_log("config_reload_refused")
            ready = await wait_ready(client, splitter, lambda body: body.get("file_sha256") == sha(other))
            assert ready["refused"] == [SALT_REFUSAL.replace("'s2'", "'s3'")] and ready["active_sha256"] == sha(B)
            rules.write_text(B)  # put back: the file gives the rules in effect
            await wait_ready(client, splitter, lambda body: "rules" not in body)
            assert await metric(client, splitter, "splitter_config_file_refused") == 0
            assert splitter.events("config_file_refusal_ended")
    finally:
        assert await splitter.stop() == 0


async def test_workers_start_on_the_last_good_rules_too(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    """`--workers 2`: the supervisor and both workers decide alike; only the supervisor writes the record."""
    rules, state = tmp_path / "rules.yaml", tmp_path / "state"
    LastGoodStore(state).save(compile_rules(B, env=env_for(upstreams)))
    before = (state / "last-good.json").read_bytes()
    rules.write_text(C)
    splitter = await launch(rules, env_for(upstreams), tmp_path, state, "--workers", "2")
    try:
        assert {str(e.get("process")) for e in splitter.events("config_refused_at_start")} == {"supervisor", "worker-0", "worker-1"}
        async with aiohttp.ClientSession() as client:
            status, ready = await get_json(client, splitter.admin + "/readyz")
            assert status == 200 and ready["rules"] == "last_good" and ready["file_sha256"] == sha(C)
            assert await metric(client, splitter, "splitter_config_file_refused") == 1  # the workers' own, merged (livemax)
            for round_ in range(3):  # connections spread over the workers
                await send_and_check_routing(client, splitter, upstreams, serving=B, other=C, tag=f"workers-{round_}")
        assert (state / "last-good.json").read_bytes() == before
    finally:
        assert await splitter.stop() == 0


async def wait_ready(client: aiohttp.ClientSession, splitter: SplitterProcess, condition: Any, timeout: float = 10.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status, body = await get_json(client, splitter.admin + "/readyz")
        if status == 200 and condition(body):
            return dict(body)
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- the store

def test_store_keeps_the_text_as_read_and_writes_only_a_new_one(tmp_path: Path) -> None:
    store = LastGoodStore(tmp_path / "state")
    assert store.load() is None
    rules = compile_rules(B, filename="/etc/splitter/rules.yaml", env={"SEGMENT_URL": "http://x", "RUDDERSTACK_DATA_PLANE_URL": "http://x"})
    assert store.save(rules) is True
    assert store.save(rules) is False  # a ramp step installs the same text: nothing is written
    loaded = LastGoodStore(tmp_path / "state").load()
    assert loaded is not None and (loaded.text, loaded.sha256, loaded.file) == (B, rules.sha256, "/etc/splitter/rules.yaml")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["last-good.json"]  # no temporary file left


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"format": 1}', b'{"format": 2, "text": "x", "sha256": "y"}'])
def test_store_refuses_what_is_not_its_record(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "last-good.json").write_bytes(content)
    with pytest.raises(LastGoodUnreadable):
        LastGoodStore(tmp_path).load()


# --------------------------------------------------------------------------- splitter check --against

def check(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = dict(os.environ, SEGMENT_URL="http://127.0.0.1:9", RUDDERSTACK_DATA_PLANE_URL="http://127.0.0.1:9")
    return subprocess.run(splitter_command("check", *args), capture_output=True, text=True, timeout=60, env={**base, **(env or {})})


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name, text in {"a": A, "b": B, "c": C, "consented": C_CONSENTED}.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(text)
    return paths


def test_check_against_refuses_what_a_reload_would_refuse(files: dict[str, Path]) -> None:
    result = check(str(files["c"]), "--against", str(files["b"]))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"{files['c']}: refused against {files['b']}: {SALT_REFUSAL}"]


def test_check_against_accepts_with_the_rollbacks_listed(files: dict[str, Path]) -> None:
    widening = check(str(files["b"]), "--against", str(files["a"]))
    assert widening.returncode == 0, widening.stderr
    assert widening.stdout.startswith(f"{files['b']}: ok: ") and widening.stdout.splitlines()[-1] == f"against {files['a']}: accepted, no rollback"
    back = check(str(files["a"]), "--against", str(files["b"]))
    assert back.returncode == 0, back.stderr
    assert back.stdout.splitlines()[-2:] == [
        f"against {files['b']}: accepted with 1 rollback(s), as a reload would log them (config_rollback):",
        "  rollback: rule 'rollout': 4000 of 10000 cohort buckets move back toward a later-listed destination",
    ]
    consented = check(str(files["consented"]), "--against", str(files["b"]))
    assert consented.returncode == 0 and consented.stdout.splitlines()[-1] == f"against {files['b']}: accepted, no rollback"
    same = check(str(files["b"]), "--against", str(files["b"]))
    assert same.returncode == 0 and same.stdout.splitlines()[-1] == f"against {files['b']}: the same rules (sha256 {sha(B)[:12]})"


def test_check_against_lists_every_kind_of_rollback_a_reload_would_log() -> None:
    """Phase 3 back to phase 2 of the runbook: a split lowered, and copies RudderStack stops receiving."""
    result = check(str(ROOT / "rules" / "migration-2-client-apps.yaml"), "--against", str(ROOT / "rules" / "migration-3-parallel.yaml"), env=RULES_ENV)
    assert result.returncode == 0, result.stderr
    rollbacks = [line for line in result.stdout.splitlines() if line.startswith("  rollback: ")]
    assert "  rollback: rule 'new-app-builds': 1500 of 10000 cohort buckets move back toward a later-listed destination" in rollbacks
    assert any("rudderstack no longer gets its mirror copy" in line for line in rollbacks), rollbacks


def test_check_against_state_gives_the_verdict_a_restart_would(files: dict[str, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    empty = check(str(files["c"]), "--against-state", str(state))
    assert empty.returncode == 0 and empty.stdout.splitlines()[-1] == f"against {state}: no last good rules recorded; `serve` would start on {files['c']}"
    LastGoodStore(state).save(compile_rules(B, env={"SEGMENT_URL": "http://x", "RUDDERSTACK_DATA_PLANE_URL": "http://x"}))
    refused = check(str(files["c"]), "--against-state", str(state))
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [f"{files['c']}: refused against {state / 'last-good.json'} (last good, sha256 {sha(B)[:12]}): {SALT_REFUSAL}"]
    assert check(str(files["consented"]), "--against-state", str(state)).returncode == 0


def test_check_against_needs_a_valid_old_file_and_one_option(files: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(B.replace("segment: 50", "segment: 40"))
    result = check(str(files["c"]), "--against", str(broken))
    assert result.returncode == 2 and f"{broken}:" in result.stderr and "percents sum to 90" in result.stderr
    both = check(str(files["c"]), "--against", str(files["b"]), "--against-state", str(tmp_path))
    assert both.returncode == 2 and "give --against or --against-state, not both" in both.stderr


# --------------------------------------------------------------------------- deploy

def test_deploy_files_keep_the_state_on_the_spool_volume_and_alert_on_a_refused_file() -> None:
    for name in ("deployment.yaml", "sidecar.yaml"):
        pod = next(iter(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / name).read_text())))["spec"]["template"]["spec"]
        splitter = next(c for c in pod["containers"] if c["name"] == "splitter")
        env = {e["name"]: e.get("value") for e in splitter["env"]}
        mounts = [m["mountPath"] for m in splitter["volumeMounts"]]
        assert env["SPLITTER_STATE_DIR"].startswith("/var/lib/splitter/") and "/var/lib/splitter" in mounts, name
    assert "SPLITTER_STATE_DIR=/var/lib/splitter/state" in (ROOT / "deploy" / "Dockerfile").read_text()
    assert "Environment=SPLITTER_STATE_DIR=/var/lib/splitter/state" in (ROOT / "deploy" / "systemd" / "splitter.service").read_text()
    alerts = [rule for group in yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())["groups"] for rule in group["rules"]]
    [alert] = [rule for rule in alerts if "splitter_config_file_refused" in rule["expr"]]
    assert "reshuffle: true" in alert["annotations"]["description"] and "/readyz" in alert["annotations"]["description"]
