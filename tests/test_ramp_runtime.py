"""Ramp steps taking effect in a running proxy, without a reload.

In-process: the real lifecycle (tests/proxy_harness.py) with its `RampScheduler` on a clock the
test moves by hand; what changes is observed at the stand-in receivers and on the metrics. Then
once with the real `splitter serve` process and the wall clock.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from loadtest.process import launch_splitter
from proxy.control.install import RulesInstaller
from proxy.control.ramps import RampScheduler
from proxy.control.reload import Reloader
from proxy.control.state import ActiveRules
from proxy.engine import EventContext, bucket, decide, effective_rules, load_rules
from proxy.metrics import Metrics
from tests.proxy_harness import DEFAULT_RULES, Stack, proxy_stack
from tests.test_serve_lifecycle import AUTH, batch, metric, rules_text, settled, splitter_env, upstreams  # noqa: F401 (fixture)

STEP = datetime(2026, 12, 1, tzinfo=UTC)
RAMPED = DEFAULT_RULES.replace(
    "route: {split: {rudderstack: 50, segment: 50}}",
    "route: {split: {rudderstack: 10, segment: 90}, ramp: [{at: 2026-12-01T00:00:00Z, rudderstack: 60}]}",
)
assert RAMPED != DEFAULT_RULES


class ManualClock:
    """A `Clock` that only moves when the test says so."""

    def __init__(self, now: datetime) -> None:
        self._now = now
        self._moved = asyncio.Condition()

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, when: datetime) -> None:
        async with self._moved:
            await self._moved.wait_for(lambda: self._now >= when)

    async def set(self, now: datetime) -> None:
        async with self._moved:
            self._now = now
            self._moved.notify_all()


@pytest.fixture
async def ramped() -> AsyncIterator[tuple[Stack, ManualClock, RampScheduler]]:
    clock = ManualClock(STEP - timedelta(days=1))
    async with proxy_stack(RAMPED, clock=clock) as stack:  # start-up applies what is due and starts the scheduler
        yield stack, clock, stack.ramps


def users(count: int) -> list[dict[str, object]]:
    return [{"type": "track", "event": "Split A", "anonymousId": f"user-{i}", "messageId": f"m-{i}"} for i in range(count)]


async def destinations_of(stack: Stack, events: list[dict[str, object]], tag: str) -> dict[str, str]:
    """Send `events` (tagged so each send is told apart) and return user -> the receiver that got it."""
    stack.segment.clear()
    stack.rudder.clear()
    sent = [{**e, "messageId": f"{e['messageId']}-{tag}"} for e in events]
    status, _, _ = await stack.post("/v1/batch", {"batch": sent})
    assert status == 200
    where = {str(r.event["anonymousId"]): "segment" for r in stack.segment.events}
    where.update({str(r.event["anonymousId"]): "rudderstack" for r in stack.rudder.events})
    assert len(where) == len(events) and len(stack.segment.events) + len(stack.rudder.events) == len(events)
    return where


async def test_advancing_the_clock_past_a_step_moves_users_forward_without_a_reload(ramped) -> None:  # type: ignore[no-untyped-def]
    stack, clock, _ = ramped
    events = users(300)
    percent = {"name": "splitter_rollout_percent", "rule": "split"}
    assert stack.metric(**percent, destination="rudderstack") == 10.0

    before = await destinations_of(stack, events, "before")
    expected_before = {f"user-{i}": "rudderstack" if bucket("t", f"user-{i}") < 1000 else "segment" for i in range(300)}
    assert before == expected_before

    with capture_logs() as logs:
        await clock.set(STEP + timedelta(seconds=1))
        await stack.wait_metric("splitter_rollout_percent", 60.0, rule="split", destination="rudderstack")
    assert stack.metric(**percent, destination="segment") == 40.0
    assert [(r["event"], r["rule"], r["step"], r["percents"]) for r in logs if r["event"] == "ramp_step_applied"] == [
        ("ramp_step_applied", "split", 0, {"rudderstack": 60.0, "segment": 40.0}),
    ]

    after = await destinations_of(stack, events, "after")
    assert after == {user: "rudderstack" if bucket("t", user) < 6000 else "segment" for user in after}
    assert all(after[user] == "rudderstack" for user, dest in before.items() if dest == "rudderstack")  # nobody moved back
    assert 0 < sum(before[u] != after[u] for u in after) < 300
    assert stack.metric("splitter_config_reloads_total", result="success") == 0.0


async def test_a_step_already_due_at_start_is_applied_before_traffic() -> None:
    async with proxy_stack(RAMPED, clock=ManualClock(STEP + timedelta(days=3))) as stack:
        assert stack.metric("splitter_rollout_percent", rule="split", destination="rudderstack") == 60.0
        live = stack.active.current
        assert decide(live, users(1)[0], EventContext("web")) == decide(effective_rules(stack.rules, STEP), users(1)[0], EventContext("web"))


LOOPBACK_ENV = {"SEGMENT_URL": "http://127.0.0.1:9", "RUDDERSTACK_DATA_PLANE_URL": "http://127.0.0.1:9"}


class TickingClock(ManualClock):
    """A clock that moves on by `tick` at every reading, as a busy machine's clock does between two
    readings close together; sleeping just yields (the sleeper reads the clock again)."""

    def __init__(self, now: datetime, tick: timedelta) -> None:
        super().__init__(now)
        self.tick = tick

    def now(self) -> datetime:
        now, self._now = self._now, self._now + self.tick
        return now

    async def sleep_until(self, when: datetime) -> None:
        await asyncio.sleep(0)


async def test_a_step_falling_between_two_readings_of_the_clock_is_still_applied(tmp_path: Path) -> None:
    """The scheduler reads the clock once per pass: read twice, a step between the readings was neither
    applied (the first was before it) nor waited for (the second was after it), and never taken."""
    path = tmp_path / "rules.yaml"
    path.write_text(ramp_rules(10, (STEP, 60)))
    active = ActiveRules(load_rules(str(path), LOOPBACK_ENV))
    metrics = Metrics()
    installer = RulesInstaller(active, metrics, clock=TickingClock(STEP - timedelta(seconds=0.5), timedelta(seconds=1)))
    installer.ramps.start()
    try:
        deadline = time.monotonic() + 5
        while metrics.registry.get_sample_value("splitter_rollout_percent", {"rule": "rollout", "destination": "rudderstack"}) != 60.0:
            assert time.monotonic() < deadline, "the step between two readings was never applied"
            await asyncio.sleep(0.01)
    finally:
        await installer.ramps.stop()


def reload_setup(path: Path, text: str, clock: ManualClock) -> tuple[ActiveRules, Metrics, RampScheduler, Reloader]:
    path.write_text(text)
    active = ActiveRules(load_rules(str(path), LOOPBACK_ENV))
    metrics = Metrics()
    installer = RulesInstaller(active, metrics, clock=clock)
    installer.ramps.apply_due()
    return active, metrics, installer.ramps, Reloader(str(path), active, metrics, LOOPBACK_ENV, installer)


def ramp_rules(percent: int, *steps: tuple[datetime, int]) -> str:
    """The lifecycle test's one split rule, ramped by `steps` of (time, rudderstack percent)."""
    written = ", ".join(f"{{at: {when.isoformat()}, rudderstack: {step}}}" for when, step in steps)
    return rules_text(percent) + f"      ramp: [{written}]\n"


async def test_a_reload_mid_ramp_compares_at_now_and_is_not_a_rollback(tmp_path: Path) -> None:
    clock = ManualClock(STEP + timedelta(hours=1))
    active, metrics, _, reloader = reload_setup(tmp_path / "rules.yaml", ramp_rules(10, (STEP, 60)), clock)
    assert metrics.registry.get_sample_value("splitter_rollout_percent", {"rule": "rollout", "destination": "rudderstack"}) == 60.0

    # The same ramp with one more step: the base split (10) is below the live one (60), yet nobody moves.
    (tmp_path / "rules.yaml").write_text(ramp_rules(10, (STEP, 60), (STEP + timedelta(days=7), 80)))
    result = await reloader.reload("admin")
    assert (result.status, result.rollbacks) == ("success", ())
    assert dict(active.current.rules[0].route.split.percents) == {"rudderstack": 60.0, "segment": 40.0}  # type: ignore[union-attr]

    # A real rollback is still reported as one.
    (tmp_path / "rules.yaml").write_text(rules_text(20))
    result = await reloader.reload("admin")
    assert result.rollbacks == ({"rule": "rollout", "buckets_back": 4000},)


async def test_the_scheduler_replans_after_a_reload(tmp_path: Path) -> None:
    clock = ManualClock(STEP - timedelta(days=1))
    _active, metrics, scheduler, reloader = reload_setup(tmp_path / "rules.yaml", ramp_rules(10, (STEP + timedelta(days=30), 60)), clock)
    scheduler.start()
    try:
        (tmp_path / "rules.yaml").write_text(ramp_rules(10, (STEP, 30)))  # the step moved much closer
        assert (await reloader.reload("admin")).status == "success"
        await clock.set(STEP)
        deadline = time.monotonic() + 5
        while metrics.registry.get_sample_value("splitter_rollout_percent", {"rule": "rollout", "destination": "rudderstack"}) != 30.0:
            assert time.monotonic() < deadline, "the reloaded ramp's step was not applied"
            await asyncio.sleep(0.01)
    finally:
        await scheduler.stop()


async def test_splitter_serve_applies_a_step_at_its_time(tmp_path: Path, upstreams) -> None:  # type: ignore[no-untyped-def]
    segment, rudder = upstreams
    path = tmp_path / "rules.yaml"
    step_at = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
    path.write_text(ramp_rules(10, (step_at, 60)))
    splitter = await launch_splitter(str(path), splitter_env(segment, rudder), ["--reload-interval", "60"])
    try:
        async with aiohttp.ClientSession() as client:
            deadline = time.monotonic() + 30
            while await metric(client, splitter, "splitter_rollout_percent", rule="rollout", destination="rudderstack") != 60.0:
                assert time.monotonic() < deadline, "the ramp step never took effect"
                await asyncio.sleep(0.1)
            applied = await splitter.wait_for_log("ramp_step_applied")
            assert (applied["rule"], applied["step"], applied["percents"]) == ("rollout", 0, {"rudderstack": 60.0, "segment": 40.0})
            assert await metric(client, splitter, "splitter_config_reloads_total", result="success") == 0.0  # a ramp step is not a reload

            probe = batch("after-step", 200)
            async with client.post(splitter.ingress + "/v1/batch", data=orjson.dumps(probe), headers=AUTH) as response:
                assert response.status == 200
            await settled(client, splitter)
            live = effective_rules(load_rules(str(path), splitter_env(segment, rudder)), step_at)
            assert rudder.receiver.count == sum(decide(live, e, EventContext("web")).primary == ("rudderstack",) for e in probe["batch"])

            async with client.get(splitter.admin + "/admin/config") as response:
                (ramp,) = (await response.json())["ramps"]
            assert (ramp["rule"], ramp["current_step"], ramp["next_step_at"]) == ("rollout", 0, None)
    finally:
        assert await splitter.stop() == 0


async def test_a_step_landing_while_a_reload_compiles_is_what_the_reload_compares_against(tmp_path: Path) -> None:
    """The rules file is a FIFO, so the reload is held inside its read while the step lands; the
    rollback it then finds must be measured from the step that is live (60), not from before it (10)."""
    clock = ManualClock(STEP - timedelta(hours=1))
    path = tmp_path / "rules.yaml"
    _active, metrics, scheduler, reloader = reload_setup(path, ramp_rules(10, (STEP, 60)), clock)
    scheduler.start()
    try:
        path.unlink()
        os.mkfifo(path)
        reload = asyncio.ensure_future(reloader.reload("admin"))  # blocks reading the FIFO until the text is written
        deadline = time.monotonic() + 5
        while True:  # a writer can open the FIFO without blocking once the reload's read has opened it
            try:
                writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert time.monotonic() < deadline, "the reload never opened the rules file"
                await asyncio.sleep(0.01)
        await clock.set(STEP)
        deadline = time.monotonic() + 5
        while metrics.registry.get_sample_value("splitter_rollout_percent", {"rule": "rollout", "destination": "rudderstack"}) != 60.0:
            assert time.monotonic() < deadline, "the step was not applied"
            await asyncio.sleep(0.01)
        assert not reload.done()
        os.write(writer, rules_text(30).encode())  # an operator's rollback: 60 -> 30
        os.close(writer)
        result = await asyncio.wait_for(reload, 5)
        assert (result.status, result.rollbacks) == ("success", ({"rule": "rollout", "buckets_back": 3000},))
    finally:
        await scheduler.stop()


async def test_a_wall_clock_stepped_back_never_moves_users_back(tmp_path: Path) -> None:
    """NTP stepping the clock back across a step that is already applied must not undo it: the
    scheduler (it re-reads the clock at least once a minute) and a reload both keep the step."""
    clock = ManualClock(STEP + timedelta(seconds=1))
    path = tmp_path / "rules.yaml"
    active, metrics, scheduler, reloader = reload_setup(path, ramp_rules(10, (STEP, 60)), clock)
    percent = {"rule": "rollout", "destination": "rudderstack"}
    assert metrics.registry.get_sample_value("splitter_rollout_percent", percent) == 60.0

    await clock.set(STEP - timedelta(seconds=5))  # the clock is stepped back 6 s
    scheduler.apply_due()
    assert metrics.registry.get_sample_value("splitter_rollout_percent", percent) == 60.0
    path.write_text(ramp_rules(10, (STEP, 60)) + "# a comment: a new sha256, the same rules\n")
    result = await reloader.reload("admin")
    assert (result.status, result.rollbacks) == ("success", ())
    assert dict(active.current.rules[0].route.split.percents) == {"rudderstack": 60.0, "segment": 40.0}  # type: ignore[union-attr]
