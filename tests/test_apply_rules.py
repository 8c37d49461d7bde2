"""A reload applies a destination's delivery settings whole, through a real `splitter serve`.

The bug these reproduce: a reload updated a destination's options but not its circuit breaker
(built once) nor its concurrency (read once when its sender started), so `breaker_failures`,
`breaker_cooldown`, `retry_max` and `max_in_flight` kept their start-up values until a restart.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from loadtest.process import SplitterProcess, launch_splitter
from proxy.delivery import Delivery
from proxy.engine import compile_rules
from proxy.metrics import Metrics

WRITE_KEY = "apply-web-key-0123"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode(), "Content-Type": "application/json"}
TIMEOUT = 20.0  # generous: these wait for processes and retries, never measure them


class StandIn:
    """An upstream that answers `status` after `delay`, counting requests and the most at once."""

    def __init__(self, status: int, delay: float = 0.0) -> None:
        self.status, self.delay = status, delay
        self.requests = self.now = self.most_at_once = 0
        self.events: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.now += 1
        self.most_at_once = max(self.most_at_once, self.now)
        try:
            body = await request.json()
            await asyncio.sleep(self.delay)
            if self.status == 200:
                self.events.extend(event["messageId"] for event in body["batch"])
            return web.json_response({"success": self.status == 200}, status=self.status)
        finally:
            self.now -= 1


@pytest.fixture
async def start_stand_in() -> AsyncIterator[Callable[[StandIn], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(stand_in: StandIn) -> str:
        app = web.Application()
        app.router.add_post("/v1/batch", stand_in.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def rules_text(url: str, delivery: str) -> str:
    return f"""\
version: 1
destinations:
  rudderstack: {{kind: rudderstack, url: "{url}", delivery: {{{delivery}}}}}
sources:
  - name: web
    write_keys: ["{WRITE_KEY}"]
    credentials: {{rudderstack: "apply-rs-key"}}
rules:
  - name: all
    route: rudderstack
"""


async def eventually(check: Callable[[], Awaitable[bool]], what: str, splitter: SplitterProcess) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {TIMEOUT} s: {what}; last log lines: {splitter.log[-8:]}")
        await asyncio.sleep(0.05)


async def breaker_state(splitter: SplitterProcess) -> float:
    async with aiohttp.ClientSession() as client, client.get(splitter.admin + "/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith('splitter_breaker_state{destination="rudderstack"}'):
                return float(line.rpartition(" ")[2])
    raise AssertionError("no splitter_breaker_state series for rudderstack")


async def reload(splitter: SplitterProcess, path: Path, text: str) -> None:
    reloads = len(splitter.events("config_reloaded"))
    path.write_text(text)
    splitter.signal(signal.SIGHUP)

    async def reloaded() -> bool:
        return len(splitter.events("config_reloaded")) > reloads

    await eventually(reloaded, "the reload", splitter)


async def send(splitter: SplitterProcess, ids: list[str]) -> None:
    async with aiohttp.ClientSession() as client:
        for message_id in ids:
            body = {"type": "track", "event": "E", "userId": message_id, "messageId": message_id}
            async with client.post(splitter.ingress + "/v1/track", data=orjson.dumps(body), headers=AUTH) as response:
                assert response.status == 200, await response.text()


async def test_a_reload_of_breaker_failures_opens_the_breaker_at_the_new_threshold(tmp_path: Path, start_stand_in) -> None:  # type: ignore[no-untyped-def]
    down = StandIn(503)
    url = await start_stand_in(down)
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(url, "breaker_failures: 1000, breaker_cooldown: 60, retry_base: 0.01, retry_max: 120"))
    splitter = await launch_splitter(str(path), dict(os.environ), ["--spool-dir", str(tmp_path / "spool"), "--dead-letter-dir", str(tmp_path / "dead"),
                                                                   "--reload-interval", "60"])
    try:
        await send(splitter, ["held-1"])

        async def retried() -> bool:
            return down.requests >= 5

        await eventually(retried, "retries against the down upstream", splitter)
        assert await breaker_state(splitter) == 0  # 1000 failures needed: still closed
        await reload(splitter, path, rules_text(url, "breaker_failures: 2, breaker_cooldown: 60, retry_base: 0.01, retry_max: 120"))

        async def opened() -> bool:
            return await breaker_state(splitter) == 2

        await eventually(opened, "the breaker opening at the reloaded threshold of 2 failures", splitter)
        seen = down.requests
        await asyncio.sleep(1.0)
        assert down.requests == seen, "an open breaker with a 60 s cool-down sends nothing"
    finally:
        assert await splitter.stop(timeout=30) == 0


async def test_a_reload_of_max_in_flight_changes_how_many_batches_go_at_once(tmp_path: Path, start_stand_in) -> None:  # type: ignore[no-untyped-def]
    slow = StandIn(200, delay=0.4)
    url = await start_stand_in(slow)
    path = tmp_path / "rules.yaml"
    delivery = "batch_max_events: 1, flush_interval: 0.001, max_in_flight: {}"
    path.write_text(rules_text(url, delivery.format(1)))
    splitter = await launch_splitter(str(path), dict(os.environ), ["--spool-dir", str(tmp_path / "spool"), "--dead-letter-dir", str(tmp_path / "dead"),
                                                                   "--reload-interval", "60"])
    try:
        await send(splitter, [f"before-{i}" for i in range(3)])

        async def first_delivered() -> bool:
            return len(slow.events) == 3

        await eventually(first_delivered, "3 events, one batch at a time", splitter)
        assert slow.most_at_once == 1
        await reload(splitter, path, rules_text(url, delivery.format(4)))
        ids = [f"after-{i}" for i in range(12)]
        await send(splitter, ids)

        async def all_delivered() -> bool:
            return len(slow.events) == 15

        await eventually(all_delivered, "12 more events", splitter)
        assert sorted(slow.events) == sorted([f"before-{i}" for i in range(3)] + ids)
        assert slow.most_at_once == 4, f"max_in_flight reloaded to 4, yet at most {slow.most_at_once} batches went at once"
    finally:
        assert await splitter.stop(timeout=30) == 0


async def test_a_rule_set_whose_new_spool_cannot_open_changes_no_running_destination(tmp_path: Path) -> None:
    """apply() does what can fail first: a reload that adds a destination whose spool cannot be
    opened (its path is taken by a file) fails whole, and the running destination keeps its settings."""
    def rules(extra: str, in_flight: int) -> str:
        return rules_text("http://127.0.0.1:9", f"max_in_flight: {in_flight}").replace(
            "sources:", f"  {extra}\nsources:" if extra else "sources:")

    delivery = Delivery(Metrics(), spool_dir=tmp_path / "spool", dead_letter_dir=tmp_path / "dead")
    delivery.start(compile_rules(rules("", 1)))
    try:
        (tmp_path / "spool" / "segment").write_text("not a directory")
        with pytest.raises(OSError):
            delivery.apply(compile_rules(rules('segment: {kind: segment, url: "http://127.0.0.1:9"}', 4)))
        assert delivery._pipelines["rudderstack"].options.max_in_flight == 1
    finally:
        await delivery.close(drain_timeout=0)
