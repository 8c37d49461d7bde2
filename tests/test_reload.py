"""Reloading rules from a real file: swap or keep, metrics, logs, coalescing, and the file watcher.

Everything runs against files in tmp_path, including a Kubernetes-style ConfigMap directory whose
`..data` symlink is swapped atomically the way kubelet does it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from proxy.control.reload import Reloader, ReloadResult
from proxy.control.state import ActiveRules
from proxy.control.watch import RulesWatcher
from proxy.engine import load_rules
from proxy.metrics import Metrics

WRITE_KEY = "wk_live_web_0123456789abcdef"
RS_KEY = "rs_live_web_fedcba9876543210"


def rules_yaml(percent: int = 5, salt: str = "s1", reshuffle: bool = False, total: int = 100) -> str:
    """Two loopback destinations and one split rule sending `percent` % to rudderstack."""
    cohort_extra = "\n  reshuffle: true" if reshuffle else ""
    return f"""version: 1
destinations:
  rudderstack: {{kind: rudderstack, url: "http://127.0.0.1:9"}}
  segment: {{kind: segment, url: "http://127.0.0.1:9"}}
sources:
  - name: web
    write_keys: ["{WRITE_KEY}"]
    credentials: {{rudderstack: "{RS_KEY}"}}
cohort:
  key: [anonymousId, userId]
  salt: "{salt}"{cohort_extra}
rules:
  - name: rollout
    route:
      split: {{rudderstack: {percent}, segment: {total - percent}}}
"""


class Setup:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text(rules_yaml())
        rules = load_rules(str(path), {})
        self.first = rules
        self.active = ActiveRules(rules)
        self.metrics = Metrics()
        self.metrics.show_rules(rules)
        self.reloader = Reloader(str(path), self.active, self.metrics, {})

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def reloads(self, result: str) -> float:
        return self.sample("splitter_config_reloads_total", result=result) or 0.0


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path / "rules.yaml")


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_valid_edit_swaps_and_publishes_the_new_split(setup: Setup) -> None:
    old_sha = setup.first.sha256
    setup.path.write_text(rules_yaml(percent=10))

    with capture_logs() as logs:
        result = await setup.reloader.reload("sighup")

    new = setup.active.current
    assert result == ReloadResult("success", "sighup", new.sha256)
    assert result.ok and new is not setup.first and new.sha256 != old_sha
    assert setup.reloads("success") == 1
    assert setup.sample("splitter_config_info", sha256=new.sha256) == 1
    assert setup.sample("splitter_config_info", sha256=old_sha) is None
    assert setup.sample("splitter_rollout_percent", rule="rollout", destination="rudderstack") == 10
    assert setup.sample("splitter_rollout_percent", rule="rollout", destination="segment") == 90
    assert logs == [
        {"event": "config_reloaded", "log_level": "info", "trigger": "sighup", "old_sha256": old_sha[:12], "new_sha256": new.sha256[:12]}
    ]


async def test_bad_file_keeps_the_old_rules(setup: Setup) -> None:
    text = rules_yaml(percent=5, total=95)
    setup.path.write_text(text)
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "split:" in row)

    with capture_logs() as logs:
        result = await setup.reloader.reload("admin")

    expected = f"{setup.path}:{line}: rules[0].route.split: percents sum to 95, must be 100"
    assert result == ReloadResult("error", "admin", setup.first.sha256, (expected,))
    assert not result.ok
    assert setup.active.current is setup.first
    assert setup.reloads("error") == 1 and setup.reloads("success") == 0
    assert setup.sample("splitter_config_info", sha256=setup.first.sha256) == 1
    assert logs == [{"event": "config_reload_failed", "log_level": "error", "trigger": "admin", "path": str(setup.path), "errors": [expected]}]


async def test_missing_file_is_an_error_not_a_crash(setup: Setup) -> None:
    setup.path.unlink()
    result = await setup.reloader.reload("sighup")
    assert result.status == "error" and result.errors == (f"{setup.path}: cannot read the rules file: No such file or directory",)
    assert setup.active.current is setup.first


async def test_error_lines_never_carry_url_credentials(setup: Setup) -> None:
    # The engine quotes a rejected URL verbatim; its userinfo may be a password.
    setup.path.write_text(rules_yaml().replace("http://127.0.0.1:9", "https://user:pw-secret-123@127.0.0.1:9/v1", 1))
    with capture_logs() as logs:
        result = await setup.reloader.reload("admin")
    assert result.status == "error"
    assert result.errors == (f"{setup.path}:3: destinations.rudderstack.url: must not end in /v1 (splitter appends /v1/batch): 'https://****@127.0.0.1:9/v1'",)
    assert "pw-secret-123" not in repr(logs)


async def test_non_utf8_file_is_an_error(setup: Setup) -> None:
    setup.path.write_bytes(rules_yaml().encode() + b"# caf\xe9\n")
    result = await setup.reloader.reload("admin")
    assert result.status == "error" and setup.active.current is setup.first
    line = rules_yaml().count("\n") + 1
    assert result.errors == (f"{setup.path}:{line}: the file is not UTF-8 text (byte 0xe9 at offset {len(rules_yaml()) + 5})",)


async def test_same_content_is_unchanged(setup: Setup) -> None:
    result = await setup.reloader.reload("sighup")
    assert result == ReloadResult("unchanged", "sighup", setup.first.sha256)
    assert result.ok and setup.active.current is setup.first
    assert setup.reloads("unchanged") == 1


async def test_salt_change_is_refused_without_reshuffle(setup: Setup) -> None:
    setup.path.write_text(rules_yaml(salt="s2"))
    with capture_logs() as logs:
        result = await setup.reloader.reload("watch")
    assert result.status == "refused" and not result.ok
    assert result.errors == (
        "rule 'rollout': cohort salt changed from 's1' to 's2'; this reshuffles users between destinations. "
        "Set `reshuffle: true` on the rule (or on the cohort) to do it anyway",
    )
    assert "reshuffle: true" in result.errors[0]
    assert setup.active.current is setup.first and result.sha256 == setup.first.sha256
    assert setup.reloads("refused") == 1
    assert [entry["event"] for entry in logs] == ["config_reload_refused"]
    assert logs[0]["log_level"] == "error" and logs[0]["errors"] == list(result.errors)


async def test_salt_change_with_reshuffle_is_accepted(setup: Setup) -> None:
    setup.path.write_text(rules_yaml(salt="s2", reshuffle=True))
    result = await setup.reloader.reload("watch")
    assert result.status == "success" and result.rollbacks == ()
    assert setup.active.current.cohort.salt == "s2"


async def test_lowering_a_percent_is_a_logged_rollback(setup: Setup) -> None:
    setup.path.write_text(rules_yaml(percent=10))
    assert (await setup.reloader.reload("sighup")).status == "success"
    setup.path.write_text(rules_yaml(percent=5))

    with capture_logs() as logs:
        result = await setup.reloader.reload("sighup")

    assert result.status == "success"
    assert result.rollbacks == ({"rule": "rollout", "buckets_back": 500},)
    assert setup.sample("splitter_rollout_percent", rule="rollout", destination="rudderstack") == 5
    rollbacks = [entry for entry in logs if entry["event"] == "config_rollback"]
    assert rollbacks == [{"event": "config_rollback", "log_level": "warning", "trigger": "sighup", "rule": "rollout", "buckets_back": 500}]


async def test_concurrent_reloads_serialize(setup: Setup) -> None:
    # Unserialized, every call would compare against the same old rules and all five would swap.
    setup.path.write_text(rules_yaml(percent=10))
    results = await asyncio.gather(*(setup.reloader.reload(f"t{i}") for i in range(5)))
    assert sorted(r.status for r in results) == ["success", "unchanged", "unchanged", "unchanged", "unchanged"]
    assert setup.reloads("success") == 1 and setup.reloads("unchanged") == 4
    assert {r.sha256 for r in results} == {setup.active.current.sha256}


async def test_request_bursts_coalesce_into_one_reload(setup: Setup) -> None:
    setup.path.write_text(rules_yaml(percent=10))
    setup.reloader.start()
    try:
        with capture_logs() as logs:
            for trigger in ("sighup", "sighup", "watch", "sighup"):
                setup.reloader.request(trigger)
            await eventually(lambda: setup.reloads("success") == 1)
            await asyncio.sleep(0.05)  # room for a wrongly queued second pass to show up
        assert setup.reloads("success") + setup.reloads("unchanged") == 1
        assert [(e["event"], e["trigger"]) for e in logs] == [("config_reloaded", "sighup,watch")]

        setup.reloader.request("sighup")  # a later request is a new burst
        await eventually(lambda: setup.reloads("unchanged") == 1)
    finally:
        await setup.reloader.stop()


class Changes:
    """An on_change callback that reloads and counts how often the watcher called it."""

    def __init__(self, reloader: Reloader) -> None:
        self.reloader = reloader
        self.results: list[ReloadResult] = []

    async def __call__(self) -> ReloadResult:
        result = await self.reloader.reload("watch")
        self.results.append(result)
        return result


@pytest.fixture
async def watched(setup: Setup) -> AsyncIterator[tuple[Setup, Changes]]:
    changes = Changes(setup.reloader)
    watcher = RulesWatcher(str(setup.path), changes, interval=0.05, baseline=setup.first.sha256)
    watcher.start()
    yield setup, changes
    await watcher.stop()


async def test_watcher_sees_an_in_place_edit_once(watched: tuple[Setup, Changes]) -> None:
    setup, changes = watched
    await asyncio.sleep(0.12)
    assert changes.results == []  # the loaded file is the baseline, not a change
    setup.path.write_text(rules_yaml(percent=10))
    await eventually(lambda: len(changes.results) == 1)
    await asyncio.sleep(0.15)
    assert [r.status for r in changes.results] == ["success"]
    assert setup.active.current.rule_named("rollout").route.split.percents[0] == ("rudderstack", 10.0)  # type: ignore[union-attr]


async def test_watcher_survives_the_file_disappearing(watched: tuple[Setup, Changes]) -> None:
    setup, changes = watched
    with capture_logs() as logs:
        setup.path.unlink()
        await asyncio.sleep(0.25)  # several polls while missing
        setup.path.write_text(rules_yaml(percent=20))
        await eventually(lambda: len(changes.results) == 1)
    assert changes.results[0].status == "success"
    events = [entry["event"] for entry in logs if entry["event"].startswith("rules_watch")]
    assert events == ["rules_watch_unreadable", "rules_watch_readable"]  # warned once, not per poll
    assert logs[0]["log_level"] == "warning" and "No such file" in logs[0]["error"]


async def test_watcher_callback_errors_do_not_stop_it(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("one")
    calls: list[int] = []

    async def failing() -> None:
        calls.append(1)
        raise RuntimeError("boom")

    watcher = RulesWatcher(str(path), failing, interval=0.05, baseline=None)
    watcher.start()
    try:
        with capture_logs() as logs:
            await asyncio.sleep(0.1)  # first read becomes the baseline
            path.write_text("two")
            await eventually(lambda: len(calls) == 1)
            path.write_text("three")
            await eventually(lambda: len(calls) == 2)
        assert [e["event"] for e in logs] == ["rules_watch_callback_failed"] * 2
    finally:
        await watcher.stop()


async def test_watcher_follows_a_configmap_symlink_swap(tmp_path: Path) -> None:
    mount = tmp_path / "config"
    (mount / "..2026_11_23_1").mkdir(parents=True)
    (mount / "..2026_11_23_1" / "rules.yaml").write_text(rules_yaml(percent=5))
    os.symlink("..2026_11_23_1", mount / "..data")
    os.symlink("..data/rules.yaml", mount / "rules.yaml")
    path = mount / "rules.yaml"
    rules = load_rules(str(path), {})
    active, metrics = ActiveRules(rules), Metrics()
    changes = Changes(Reloader(str(path), active, metrics, {}))
    watcher = RulesWatcher(str(path), changes, interval=0.05, baseline=rules.sha256)
    watcher.start()
    try:
        await asyncio.sleep(0.1)
        (mount / "..2026_11_23_2").mkdir()
        (mount / "..2026_11_23_2" / "rules.yaml").write_text(rules_yaml(percent=30))
        os.symlink("..2026_11_23_2", mount / "..data_tmp")
        os.replace(mount / "..data_tmp", mount / "..data")
        shutil.rmtree(mount / "..2026_11_23_1")  # kubelet removes the old generation
        await eventually(lambda: len(changes.results) == 1)
    finally:
        await watcher.stop()
    assert changes.results[0].status == "success"
    assert active.current.sha256 != rules.sha256
    assert metrics.registry.get_sample_value("splitter_rollout_percent", {"rule": "rollout", "destination": "rudderstack"}) == 30


async def test_a_failing_file_is_counted_once_whichever_triggers_see_it(setup: Setup) -> None:
    """An operator's POST and the file watcher both see one edit: one refusal on the dashboard."""
    from proxy.control.reload import FILE_CHANGE

    setup.path.write_text(rules_yaml(salt="changed"))
    with capture_logs() as logs:
        first = await setup.reloader.reload("admin")
        again = await setup.reloader.reload(FILE_CHANGE)
    assert (first.status, again.status) == ("refused", "refused") and first.errors == again.errors
    assert (first.repeated, again.repeated) == (False, True)
    assert setup.reloads("refused") == 1
    assert [entry["event"] for entry in logs] == ["config_reload_refused"]  # the watcher's repeat is not logged again
    await setup.reloader.reload("admin")  # an operator asking again is answered and logged, still not counted
    assert setup.reloads("refused") == 1

    setup.path.write_text(rules_yaml(salt="another"))  # another refused file is another refusal
    assert (await setup.reloader.reload(FILE_CHANGE)).status == "refused"
    assert setup.reloads("refused") == 2

    setup.path.write_text(rules_yaml(percent=5, total=95))  # a file that does not compile: the same, once
    assert (await setup.reloader.reload(FILE_CHANGE)).status == "error"
    assert (await setup.reloader.reload("admin")).status == "error"
    assert setup.reloads("error") == 1

    setup.path.write_text(rules_yaml())  # back to the active file; the next failure counts again
    assert (await setup.reloader.reload("admin")).status == "unchanged"
    setup.path.write_text(rules_yaml(salt="changed"))
    assert (await setup.reloader.reload("admin")).status == "refused"
    assert setup.reloads("refused") == 3
