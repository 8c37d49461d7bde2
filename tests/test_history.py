"""The change history (issue 19): every rule set that takes effect and every failed reload, on disk,
at `GET /admin/history` and in `splitter history`.

Real `splitter serve` processes with real files and signals (a start, a SIGHUP reload, a refused
POST, a ramp step on the wall clock, a restart on a refused file, a consented reshuffle), the
in-process lifecycle (tests/proxy_harness.py) for the finer kinds of change, and the history file
itself on real disks, full ones included. The rules hold literal write keys and destination URLs
with credentials in their query: none of them may reach the file, the endpoint or the command.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from loadtest.process import SplitterProcess, launch_splitter
from proxy.engine import RulesDiff, compare, compile_rules, diff_rules
from proxy.observe.history_file import HistoryFile
from tests.conftest import ROOT, RULES_ENV, splitter_command
from tests.proxy_harness import DEFAULT_RULES, proxy_stack
from tests.test_disk_full import fill, tiny_tmpfs
from tests.test_ramp_runtime import ManualClock

WRITE_KEY = "history-web-key-0123"
RUDDER_KEY = "history-rs-key-0123"
SECRETS = (WRITE_KEY, RUDDER_KEY, "url-secret-0123", "query-secret-0123", "history-admin-token-0123")
TOKEN = "history-admin-token-0123"
RULES = """\
version: 1
destinations:
  segment:     {{kind: segment,     url: "http://127.0.0.1:9/?auth=url-secret-0123"}}
  rudderstack: {{kind: rudderstack, url: "http://127.0.0.1:9/?token=query-secret-0123", timeout: 5}}
sources:
  - name: web
    write_keys: ["{key}"]
    credentials: {{rudderstack: "{rudder}"}}
cohort: {{key: [anonymousId, userId], salt: {salt}}}
rules:
  - name: rollout{reshuffle}
    route:
      split: {{rudderstack: {percent}, segment: {rest}}}
"""


def rules_text(percent: int, *, salt: str = "history", reshuffle: bool = False, ramp: tuple[datetime, int] | None = None) -> str:
    text = RULES.format(key=WRITE_KEY, rudder=RUDDER_KEY, salt=salt, reshuffle="\n    reshuffle: true" if reshuffle else "",
                        percent=percent, rest=100 - percent)
    if ramp is not None:
        text += f"      ramp: [{{at: {ramp[0].isoformat()}, rudderstack: {ramp[1]}}}]\n"
    return text


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def serve_flags(tmp_path: Path, state: Path | None = None) -> list[str]:
    return ["--reload-interval", "60", "--spool-dir", str(tmp_path / "spool"), "--dead-letter-dir", str(tmp_path / "dead-letter"),
            "--state-dir", str(state or tmp_path / "state")]


async def get_json(client: aiohttp.ClientSession, url: str, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with client.get(url, headers=headers) as response:
        return response.status, await response.json()


async def post_reload(client: aiohttp.ClientSession, splitter: SplitterProcess) -> tuple[int, Any]:
    async with client.post(splitter.admin + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        return response.status, await response.json()


def run_history(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "SPLITTER_ADMIN_TOKEN"}
    if token:
        env["SPLITTER_ADMIN_TOKEN"] = token
    return subprocess.run(splitter_command("history", *args), capture_output=True, text=True, timeout=60, env=env)


def no_secret_in(*texts: str | bytes) -> None:
    for text in texts:
        shown = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        for secret in SECRETS:
            assert secret not in shown, f"{secret!r} leaked"
        assert "write_keys" not in shown and "version: 1" not in shown  # nothing of the rules text


async def test_a_real_process_records_start_reload_refusal_ramp_step_restart_and_consent(tmp_path: Path) -> None:
    env = dict(os.environ, SPLITTER_ADMIN_TOKEN=TOKEN)
    path = tmp_path / "rules.yaml"
    start = rules_text(10)
    path.write_text(start)
    splitter = await launch_splitter(str(path), env, serve_flags(tmp_path))
    step_at = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
    widened = rules_text(30, ramp=(step_at, 60))
    salted = rules_text(30, ramp=(step_at, 60), salt="other")
    consented = rules_text(30, ramp=(step_at, 60), salt="other", reshuffle=True)
    try:
        async with aiohttp.ClientSession() as client:
            path.write_text(widened)
            splitter.signal(signal.SIGHUP)
            await splitter.wait_for_log("config_reloaded")
            path.write_text(salted)
            status, answer = await post_reload(client, splitter)
            assert (status, answer["status"]) == (400, "refused")
            assert datetime.now(UTC) < step_at, "too slow: the step was due before the refusal"
            await splitter.wait_for_log("ramp_step_applied", timeout=20)
    finally:
        assert await splitter.stop() == 0

    splitter = await launch_splitter(str(path), env, serve_flags(tmp_path))  # the salted file is refused at start: the last good serve
    try:
        async with aiohttp.ClientSession() as client:
            path.write_text(consented)
            status, answer = await post_reload(client, splitter)
            assert (status, answer["status"]) == (200, "success")

            status, _ = await get_json(client, splitter.admin + "/admin/history", token=None)
            assert status == 401  # the same auth as /admin/*
            status, body = await get_json(client, splitter.admin + "/admin/history")
            assert status == 200
            status, newest = await get_json(client, splitter.admin + "/admin/history?limit=2")
            assert (status, newest["count"], newest["entries"]) == (200, 2, body["entries"][:2])
            assert (await get_json(client, splitter.admin + "/admin/history?limit=0"))[0] == 400
            assert (await get_json(client, splitter.admin + "/admin/history?limit=x"))[0] == 400

            from_admin = run_history("--from", splitter.admin)
            as_json = run_history("--from", splitter.admin, "--json", "--limit", "3")
            without_token = run_history("--from", splitter.admin, token=None)
    finally:
        assert await splitter.stop() == 0

    entries = body["entries"]
    assert [(e["trigger"], e["status"]) for e in entries] == [
        ("admin", "success"), ("start", "refused"), ("ramp", "success"), ("admin", "refused"), ("sighup", "success"), ("start", "success"),
    ]
    assert [e["time"] for e in entries] == sorted((e["time"] for e in entries), reverse=True)
    assert all(e["time"].endswith("Z") for e in entries)
    consent, restart, ramp, refused, reload, first = entries

    assert (first["sha256"], first["active_sha256"]) == (sha(start), sha(start))
    assert "previous_sha256" not in first and "changes" not in first  # a fresh state directory: nothing before it

    assert (reload["sha256"], reload["previous_sha256"]) == (sha(widened), sha(start))
    assert reload["changes"]["splits"] == [{"rule": "rollout", "before": {"rudderstack": 10.0, "segment": 90.0},
                                            "after": {"rudderstack": 30.0, "segment": 70.0}, "buckets_forward": 2000, "buckets_back": 0}]
    assert reload["changes"]["rules"] == {"added": [], "removed": [], "edited": [{"rule": "rollout", "what": ["split", "ramp"]}]}
    assert reload["changes"]["rollbacks"] == [] and reload["changes"]["reshuffles"] == []

    assert (refused["sha256"], refused["active_sha256"]) == (sha(salted), sha(widened))
    assert len(refused["errors"]) == 1 and "cohort salt changed from 'history' to 'other'" in refused["errors"][0]
    assert "changes" not in refused

    assert (ramp["sha256"], ramp["previous_sha256"], ramp["active_sha256"]) == (sha(widened), sha(widened), sha(widened))
    assert ramp["changes"]["splits"] == [{"rule": "rollout", "before": {"rudderstack": 30.0, "segment": 70.0},
                                          "after": {"rudderstack": 60.0, "segment": 40.0}, "buckets_forward": 3000, "buckets_back": 0}]

    assert (restart["sha256"], restart["active_sha256"], restart["serving"]) == (sha(salted), sha(widened), "last_good")
    assert "cohort salt changed from 'history' to 'other'" in restart["errors"][0]

    assert (consent["sha256"], consent["previous_sha256"]) == (sha(consented), sha(widened))
    assert consent["changes"]["reshuffles"] == [{"rule": "rollout", "reason": "cohort salt changed from 'history' to 'other'"}]
    assert consent["changes"]["rules"]["edited"] == [{"rule": "rollout", "what": ["cohort", "reshuffle"]}]
    assert consent["changes"]["splits"] == []  # 60/40 before and after: the ramp's step is live on both sides

    # The command, from the running process and from the state directory after it stopped.
    assert from_admin.returncode == 0, from_admin.stderr
    lines = from_admin.stdout.splitlines()
    assert lines[0].split() == ["TIME", "TRIGGER", "STATUS", "SHA256", "CHANGES"]
    assert [line.split()[1:4] for line in lines[1:]] == [[e["trigger"], e["status"], e["sha256"][:12]] for e in entries]
    assert len({line.index(entry["sha256"][:12]) for line, entry in zip(lines[1:], entries)} | {lines[0].index("SHA256")}) == 1  # aligned
    assert "rollout: rudderstack/segment 10/90 -> 30/70 (2000 buckets forward)" in lines[5]
    assert "rollout: rudderstack/segment 30/70 -> 60/40 (3000 buckets forward)" in lines[3]
    assert "cohort salt changed" in lines[4] and "serving the last good rules" in lines[2]
    assert "reshuffle consented: rollout (cohort salt changed from 'history' to 'other')" in lines[1]
    assert as_json.returncode == 0 and orjson.loads(as_json.stdout) == {"count": 3, "entries": entries[:3]}
    assert without_token.returncode == 2 and "401" in without_token.stderr and "SPLITTER_ADMIN_TOKEN" in without_token.stderr

    from_state = run_history("--state-dir", str(tmp_path / "state"), "--json", token=None)
    assert orjson.loads(from_state.stdout)["entries"] == entries  # survives the restarts: one file

    history_file = (tmp_path / "state" / "history.ndjson").read_bytes()
    assert len(history_file.splitlines()) == 6
    assert oct((tmp_path / "state" / "history.ndjson").stat().st_mode & 0o777) == "0o600"
    no_secret_in(history_file, orjson.dumps(body), from_admin.stdout, from_admin.stderr, as_json.stdout, without_token.stderr,
                 from_state.stdout, *(orjson.dumps(record) for record in splitter.events("history_write_failed")))


HEAD = DEFAULT_RULES[:DEFAULT_RULES.index("rules:\n")]
BEFORE = HEAD + """rules:
  - name: legacy
    when: {type: track, event: ["Legacy *"]}
    route: {to: [segment]}
  - name: mirrored
    when: {type: track, event: ["Mirror *"]}
    route: {to: [segment], mirror: [rudderstack]}
  - name: split
    when: {type: track, event: ["Split *"]}
    route: {split: {rudderstack: 50, segment: 50}}
  - name: everyone
    route: {to: [segment, rudderstack]}
"""
AFTER = HEAD.replace("  rudderstack: {kind: rudderstack,", '  rudderstack-eu: {kind: rudderstack, url: "${RUDDERSTACK_URL}"}\n  rudderstack: {kind: rudderstack,') + """rules:
  - name: split
    when: {type: track, event: ["Split *"]}
    route: {split: {rudderstack: 40, segment: 60}}
  - name: mirrored
    when: {type: track, event: ["Mirror *", "Copy *"]}
    route: {to: [segment], mirror: [rudderstack]}
  - name: eu
    when: {type: track, event: ["EU *"]}
    route: {to: [rudderstack-eu]}
  - name: everyone
    route: {to: [segment, rudderstack]}
"""


async def test_rules_destinations_rollbacks_and_failures_in_process() -> None:
    """The finer kinds of change through the real lifecycle: a rule added, one removed, one moved up,
    a `when` edited, a split lowered (a rollback), a destination added; a file that does not
    compile (with its sha256), written once however many triggers see it; an unchanged reload not at all."""
    async with proxy_stack(BEFORE) as stack:
        history = stack.proxy.history
        assert history is not None
        config = Path(stack.proxy.settings.config)
        config.write_text(AFTER)
        assert (await stack.reloader.reload("admin")).status == "success"
        assert (await stack.reloader.reload("sighup")).status == "unchanged"
        config.write_text(AFTER + "  - {name: broken\n")
        assert (await stack.reloader.reload("admin")).status == "error"
        assert (await stack.reloader.reload("file_change")).status == "error"  # the same failure: written once
        entries = await history.entries(10)

    assert [(e["trigger"], e["status"]) for e in entries] == [("admin", "error"), ("admin", "success"), ("start", "success")]
    failed, reload, _ = entries
    assert failed["sha256"] == sha(AFTER + "  - {name: broken\n") and failed["active_sha256"] == sha(AFTER)
    assert failed["errors"] and all(line.startswith(str(config)) for line in failed["errors"])
    changes = reload["changes"]
    assert changes["rules"] == {"added": ["eu"], "removed": ["legacy"],
                                "edited": [{"rule": "split", "what": ["order", "split"]}, {"rule": "mirrored", "what": ["when"]}]}
    assert changes["destinations"] == {"added": ["rudderstack-eu"], "removed": [], "edited": []}
    assert changes["splits"] == [{"rule": "split", "before": {"rudderstack": 50.0, "segment": 50.0}, "after": {"rudderstack": 40.0, "segment": 60.0},
                                  "buckets_forward": 0, "buckets_back": 1000}]
    assert changes["reshuffles"] == []
    assert {"rule": "split", "buckets_back": 1000} in changes["rollbacks"]
    moves = {(m["from_rule"], m["rule"], m["kind"], m.get("destination"), m["direction"]) for m in changes["moves"]}
    assert ("legacy", "everyone", "primary", None, "forward") in moves  # Legacy events now reach RudderStack too
    assert ("everyone", "mirrored", "primary", None, "back") in moves  # Copy events: Segment primary now, RudderStack a mirror
    assert ("everyone", "eu", "copy_lost", "rudderstack", "back") in moves
    back = [m for m in changes["moves"] if m["direction"] == "back"]
    assert all({k: v for k, v in m.items() if k != "direction"} in changes["rollbacks"] for m in back)


async def test_a_refused_url_is_recorded_without_its_query() -> None:
    """The engine's message about a bad destination URL shows it as /admin/config would: no query."""
    async with proxy_stack(BEFORE) as stack:
        assert stack.proxy.history is not None
        Path(stack.proxy.settings.config).write_text(BEFORE.replace('url: "${RUDDERSTACK_URL}"', 'url: "http://127.0.0.1:9/v1?token=query-secret-0123"'))
        result = await stack.reloader.reload("admin")
        (failed, _) = await stack.proxy.history.entries(10)
    assert result.status == "error" and failed["errors"] == list(result.errors)
    assert failed["errors"][0].endswith("destinations.rudderstack.url: must not end in /v1 (splitter appends /v1/batch): 'http://127.0.0.1:9/v1?****'")
    no_secret_in(orjson.dumps(failed))


async def test_a_ramp_step_in_process_is_one_entry_and_a_step_due_at_start_is_part_of_the_start(tmp_path: Path) -> None:
    step = datetime(2026, 12, 1, tzinfo=UTC)
    ramped = DEFAULT_RULES.replace("route: {split: {rudderstack: 50, segment: 50}}",
                                  "route: {split: {rudderstack: 10, segment: 90}, ramp: [{at: 2026-12-01T00:00:00Z, rudderstack: 60}]}")
    clock = ManualClock(step - timedelta(days=1))
    async with proxy_stack(ramped, clock=clock) as stack:
        assert stack.proxy.history is not None
        await clock.set(step + timedelta(seconds=1))
        await stack.wait_metric("splitter_rollout_percent", 60.0, rule="split", destination="rudderstack")
        entries = await stack.proxy.history.entries(10)
    assert [(e["trigger"], e["status"]) for e in entries] == [("ramp", "success"), ("start", "success")]
    assert entries[0]["changes"]["splits"][0]["buckets_forward"] == 5000
    assert entries[0]["changes"]["rules"]["edited"] == [{"rule": "split", "what": ["split"]}]

    async with proxy_stack(ramped, clock=ManualClock(step + timedelta(days=1))) as stack:  # the step is due at start
        assert stack.proxy.history is not None
        entries = await stack.proxy.history.entries(10)
    assert [(e["trigger"], e["status"]) for e in entries] == [("start", "success")]


def test_the_diff_sees_transforms_by_what_they_do_not_by_identity() -> None:
    """A transform's `when` compiles to closures: the same file compiled twice is no change, an edited
    condition or salt is one, and nothing of a salt or a key comes out."""
    text = (ROOT / "rules" / "transforms.yaml").read_text()
    once, again = compile_rules(text, env=RULES_ENV), compile_rules(text, env=RULES_ENV)
    assert diff_rules(once, again, compare(once, again)) == RulesDiff()
    for edited, env in ((text.replace('when: {event: "Order Completed"}', 'when: {event: "Order Placed"}'), RULES_ENV),
                        (text, {**RULES_ENV, "PII_SALT": "another-salt-0123"})):
        changed = compile_rules(edited, env=env)
        diff = diff_rules(once, changed, compare(once, changed))
        assert [(e.rule, e.what) for e in diff.rules_edited] == (
            [("legacy-ios-builds", ("transforms",))] if edited != text else [("legacy-ios-builds", ("transforms",)), ("everyone", ("transforms",))])
        assert "another-salt" not in orjson.dumps(diff.as_dict()).decode()


def test_the_file_rotates_at_its_bound_keeping_one_old_file(tmp_path: Path) -> None:
    history = HistoryFile(tmp_path, max_bytes=2000)
    for i in range(100):
        history.append({"time": f"t{i:03d}", "trigger": "admin", "status": "success", "pad": "x" * 60})
        assert history.path.stat().st_size <= 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.1.ndjson", "history.ndjson"]
    per_file = 2000 // len(history.path.read_bytes().splitlines(keepends=True)[0])
    assert len(history.rotated.read_bytes().splitlines()) == per_file  # rotated when the next line would not fit
    newest = history.read()
    assert [e["time"] for e in newest] == [f"t{i:03d}" for i in range(99, 99 - len(newest), -1)]  # newest first, nothing skipped
    assert per_file < len(newest) <= 2 * per_file  # the current file and one old one
    assert [e["time"] for e in history.read(3)] == ["t099", "t098", "t097"]
    assert history.rotated.stat().st_size <= 2000


def test_a_line_cut_short_by_a_crash_is_skipped_and_the_next_append_stands_alone(tmp_path: Path) -> None:
    history = HistoryFile(tmp_path)
    history.append({"time": "t1", "trigger": "start", "status": "success"})
    with history.path.open("ab") as handle:
        handle.write(b'{"time": "t2", "trig')  # a crash mid-append
    history.append({"time": "t3", "trigger": "sighup", "status": "success"})
    assert [e["time"] for e in history.read()] == ["t3", "t1"]


def test_a_full_disk_takes_the_partial_line_back(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "fs", "64k") as fs:
        history = HistoryFile(fs / "state")
        history.append({"time": "t1", "trigger": "start", "status": "success"})
        filler = fill(fs)
        with pytest.raises(OSError) as failure:
            history.append({"time": "t2", "trigger": "admin", "status": "success", "pad": "x" * 20_000})
        assert failure.value.errno == errno.ENOSPC
        assert [e["time"] for e in history.read()] == ["t1"] and history.path.read_bytes().endswith(b"\n")
        filler.unlink()
        history.append({"time": "t3", "trigger": "admin", "status": "success"})
        assert [e["time"] for e in history.read()] == ["t3", "t1"]


async def reload_by_sighup(splitter: SplitterProcess) -> dict[str, object]:
    count = len(splitter.events("config_reloaded"))
    splitter.signal(signal.SIGHUP)
    for _ in range(500):
        if len(splitter.events("config_reloaded")) > count:
            return splitter.events("config_reloaded")[-1]
        await asyncio.sleep(0.02)
    raise AssertionError("no reload")


async def test_an_unwritable_state_dir_or_a_full_disk_never_blocks_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(10))
    not_a_directory = tmp_path / "state-file"
    not_a_directory.write_text("")
    splitter = await launch_splitter(str(path), dict(os.environ), serve_flags(tmp_path, not_a_directory))
    try:
        path.write_text(rules_text(20))
        await reload_by_sighup(splitter)
        async with aiohttp.ClientSession() as client:
            status, config = await get_json(client, splitter.admin + "/admin/config", token=None)
            assert (status, config["sha256"]) == (200, sha(rules_text(20)))
            status, answer = await get_json(client, splitter.admin + "/admin/history", token=None)
            assert (status, answer["code"]) == (503, "history_unreadable")
        await asyncio.sleep(0.1)
        failures = splitter.events("history_write_failed")
        assert [(f["trigger"], f["status"]) for f in failures] == [("start", "success"), ("sighup", "success")]
        assert "File exists" in str(failures[0]["error"])  # mkdir of the state directory
    finally:
        assert await splitter.stop() == 0

    with tiny_tmpfs(tmp_path / "fs", "256k") as fs:
        state = fs / "state"
        state.mkdir()
        filler = fill(fs)  # not a page left: the start's entry and the next reload's cannot be written
        splitter = await launch_splitter(str(path), dict(os.environ), serve_flags(tmp_path, state))
        try:
            path.write_text(rules_text(30))
            await reload_by_sighup(splitter)
            async with aiohttp.ClientSession() as client:
                status, config = await get_json(client, splitter.admin + "/admin/config", token=None)
                assert (status, config["sha256"]) == (200, sha(rules_text(30)))
            await asyncio.sleep(0.1)
            failures = splitter.events("history_write_failed")
            assert [(f["trigger"], f["status"]) for f in failures] == [("start", "success"), ("sighup", "success")]
            assert all("No space left" in str(f["error"]) for f in failures)
            filler.unlink()
            path.write_text(rules_text(40))
            await reload_by_sighup(splitter)
        finally:
            assert await splitter.stop() == 0
        entries = HistoryFile(state).read()
        assert [(e["trigger"], e["changes"]["splits"][0]["after"]["rudderstack"]) for e in entries] == [("sighup", 40.0)]
        assert entries[0]["previous_sha256"] == sha(rules_text(30))  # the reload to 30 % happened; only its entry is missing


async def test_with_workers_only_the_supervisor_writes(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(10))
    splitter = await launch_splitter(str(path), dict(os.environ), [*serve_flags(tmp_path), "--workers", "2"], timeout=60)
    try:
        path.write_text(rules_text(20))
        await reload_by_sighup(splitter)
        await asyncio.sleep(1.0)  # the workers reload too, and must write nothing
    finally:
        assert await splitter.stop() == 0
    entries = HistoryFile(tmp_path / "state").read()
    assert [(e["trigger"], e["status"]) for e in entries] == [("sighup", "success"), ("start", "success")]


def test_the_command_needs_one_source_and_reports_what_it_cannot_read(tmp_path: Path) -> None:
    neither = run_history()
    assert neither.returncode == 2 and "--from URL" in neither.stderr
    missing = run_history("--state-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no change history here" in missing.stderr
    unreachable = run_history("--from", "http://127.0.0.1:9/?token=query-secret-0123")
    assert unreachable.returncode == 2 and "cannot be reached" in unreachable.stderr
    no_secret_in(unreachable.stderr)


async def test_the_command_merges_replicas_newest_first(tmp_path: Path) -> None:
    env = dict(os.environ, SPLITTER_ADMIN_TOKEN=TOKEN)
    replicas: list[SplitterProcess] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            path = tmp_path / name / "rules.yaml"
            path.write_text(rules_text(10))
            replicas.append(await launch_splitter(str(path), env, serve_flags(tmp_path / name)))
        for splitter, name in zip(replicas, ("a", "b")):
            (tmp_path / name / "rules.yaml").write_text(rules_text(20))
            await reload_by_sighup(splitter)
        both = run_history("--from", replicas[0].admin, "--from", replicas[1].admin.removeprefix("http://"), "--json")
        table = run_history("--from", replicas[0].admin, "--from", replicas[1].admin, "--limit", "3")
    finally:
        for splitter in replicas:
            assert await splitter.stop() == 0
    assert both.returncode == 0, both.stderr
    entries = orjson.loads(both.stdout)["entries"]
    assert [(e["replica"], e["trigger"]) for e in entries] == [(replicas[1].admin, "sighup"), (replicas[0].admin, "sighup"),
                                                               (replicas[1].admin, "start"), (replicas[0].admin, "start")]
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["TIME", "TRIGGER", "STATUS", "SHA256", "REPLICA", "CHANGES"] and len(lines) == 4
    assert replicas[1].admin in lines[1] and "10/90 -> 20/80 (1000 buckets forward)" in lines[1]
