"""Real analytics.js (`@segment/analytics-next`'s prebuilt UMD bundle) in headless Chromium, through a real `splitter serve`.

The page (tests/clients/browser/index.html) is served by a small aiohttp app on its own port, so
every call to splitter is cross-origin and CORS is really exercised (analytics-next >= 1.84 also
sends `Authorization: Basic`, which forces a preflight). `cdnSettings` is handed to `load()`, so
no CDN is contacted; `Segment.io.apiHost` = `127.0.0.1:PORT/v1` + `protocol: 'http'` points the
SDK at splitter's ingress, as docs/sdk-setup.md describes. Both delivery strategies are run:
standard (`/v1/p`, `/v1/t`, `/v1/i`) and batching (`/v1/b`).

The calls are page, track, identify('user-42'), track: every event carries the same anonymousId,
so with a 50/50 split keyed `[anonymousId, userId]` all four must land on the same side.

Chromium is driven by `playwright-core` (tests/clients/browser/drive.js) using the machine's
/usr/bin/chromium (Debian package `chromium`); needs `npm ci --prefix tests/clients`. Skipped only
when Chromium or node/npm is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from loadtest.process import SplitterProcess, launch_splitter
from proxy.engine import EventContext, compile_rules, decide
from tests.system_tools import find, needs
from tests.test_clients_node import metric
from tests.test_clients_python import (  # noqa: F401  (upstreams is a fixture)
    CLIENT_KEY,
    RUDDER_KEY,
    SEGMENT_KEY,
    Upstreams,
    splitter_env,
    upstreams,
)

CLIENTS_DIR = Path(__file__).resolve().parent / "clients"
BROWSER_DIR = CLIENTS_DIR / "browser"
NODE, NPM = find("node"), find("npm")
CHROMIUM = os.environ.get("CHROMIUM") or find("chromium")

pytestmark = needs("node", "npm", "chromium")

RULES = f"""\
version: 1
destinations:
  segment:     {{kind: segment,     url: "${{SEGMENT_URL}}", delivery: {{flush_interval: 0.005}}}}
  rudderstack: {{kind: rudderstack, url: "${{RUDDERSTACK_DATA_PLANE_URL}}", delivery: {{flush_interval: 0.005}}}}
sources:
  - name: web
    write_keys: ["{CLIENT_KEY}"]
    credentials: {{segment: "{SEGMENT_KEY}", rudderstack: "{RUDDER_KEY}"}}
cohort: {{key: [anonymousId, userId], salt: browser-clients}}
rules:
  - name: rollout
    route:
      split: {{rudderstack: 50, segment: 50}}
"""


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """tests/clients/node_modules, installed from the committed lock file when CI has not done it yet."""
    needed = [CLIENTS_DIR / "node_modules" / "@segment" / "analytics-next", CLIENTS_DIR / "node_modules" / "playwright-core"]
    if not all(p.is_dir() for p in needed):
        import subprocess

        subprocess.run([NPM or "npm", "ci", "--prefix", str(CLIENTS_DIR), "--no-audit", "--no-fund"], check=True, timeout=300,
                       stdout=subprocess.DEVNULL)
    return CLIENTS_DIR / "node_modules"


async def serve_page(node_modules: Path) -> tuple[web.AppRunner, str]:
    """The test page and analytics-next's dist/umd (index.js + its lazily loaded chunks), on a port of its own."""
    umd = node_modules / "@segment" / "analytics-next" / "dist" / "umd"
    assert (umd / "index.js").is_file(), f"no prebuilt UMD bundle in {umd}"
    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(BROWSER_DIR / "index.html")

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_static("/umd", umd)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def drive(page_url: str, api_origin: str, timeout: float = 45.0) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        NODE or "node", str(BROWSER_DIR / "drive.js"), page_url, api_origin, cwd=str(CLIENTS_DIR),
        env=dict(os.environ, CHROMIUM=CHROMIUM or "/usr/bin/chromium"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"drive.js did not finish within {timeout} s") from None
    assert process.returncode == 0, f"drive.js exited {process.returncode}: {stderr.decode('utf-8', 'replace')[-3000:]}"
    return json.loads(stdout.decode().strip().splitlines()[-1])


async def wait_for_count(upstreams: Upstreams, count: int, timeout: float = 15.0) -> None:
    segment, rudder = upstreams
    async with asyncio.timeout(timeout):
        while len(segment.receiver.events) + len(rudder.receiver.events) < count:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # a duplicate or stray event would show up by now


@pytest.mark.parametrize("strategy", ["standard", "batching"])
async def test_analytics_js_in_chromium_through_splitter(tmp_path: Path, upstreams: Upstreams, node_modules: Path, strategy: str) -> None:
    segment, rudder = upstreams
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(RULES)
    env = splitter_env(segment, rudder)
    rules = compile_rules(RULES, env=env)
    splitter: SplitterProcess = await launch_splitter(
        str(rules_path), env, ["--spool-dir", str(tmp_path / "spool"), "--dead-letter-dir", str(tmp_path / "dead"), "--drain-timeout", "2"])
    runner, page_origin = await serve_page(node_modules)
    try:
        port = splitter.ingress.rsplit(":", 1)[1]
        assert page_origin != splitter.ingress  # a different origin: CORS is in play
        report = await drive(f"{page_origin}/?port={port}&writeKey={CLIENT_KEY}&strategy={strategy}", splitter.ingress)
        print(json.dumps(report, indent=1))  # shown by pytest only on failure (or with -s)
        result = report["result"]
        assert result["ok"], f"analytics.js failed: {result.get('error')}\nconsole: {report['console']}"
        assert result["userId"] == "user-42" and result["anonymousId"]
        assert not [line for line in report["console"] if line.startswith(("pageerror", "http ", "error"))], report["console"]
        requests = report["requests"]
        assert report["pending"] == 0 and requests, report
        assert all(r["status"] == 200 for r in requests), requests
        paths = {r["url"].removeprefix(splitter.ingress) for r in requests}
        assert paths == ({"/v1/b"} if strategy == "batching" else {"/v1/p", "/v1/t", "/v1/i"}), requests

        await wait_for_count(upstreams, 4)
        events = [(kind, rec) for kind, receiver in (("segment", segment), ("rudderstack", rudder)) for rec in receiver.receiver.events]
        assert len(events) == 4, events
        credentials = {"segment": SEGMENT_KEY, "rudderstack": RUDDER_KEY}
        for kind, rec in events:
            assert rec.write_key == credentials[kind], f"{kind} got {rec.write_key!r}"
            assert rec.event["context"]["library"]["name"] == "analytics.js"
            assert rec.event["context"].get("ip"), f"splitter did not fill context.ip: {rec.event['context']}"
            assert rec.event["anonymousId"] == result["anonymousId"]
        messages = [rec.event for _, rec in events]
        assert sorted(m["type"] for m in messages) == ["identify", "page", "track", "track"]
        assert {m.get("event") for m in messages if m["type"] == "track"} == {"Clicked", "After login"}
        assert next(m for m in messages if m.get("event") == "Clicked")["properties"] == {"n": 1}
        assert next(m for m in messages if m.get("event") == "Clicked").get("userId") is None  # still anonymous
        assert next(m for m in messages if m["type"] == "page").get("userId") is None
        assert next(m for m in messages if m["type"] == "identify")["userId"] == "user-42"
        assert next(m for m in messages if m["type"] == "identify")["traits"]["name"] == "Ada"
        assert next(m for m in messages if m.get("event") == "After login")["userId"] == "user-42"
        # The anonymous -> identified transition stays on one side: the split is keyed on anonymousId first.
        sides = {decide(rules, m, EventContext("web")).primary for m in messages}
        assert len(sides) == 1, sides
        (expected,) = sides
        other = "rudderstack" if expected == ("segment",) else "segment"
        assert {kind for kind, _ in events} == {expected[0]}
        assert len((rudder if other == "rudderstack" else segment).receiver.events) == 0

        async with aiohttp.ClientSession() as admin:
            for path in paths:
                assert (await metric(admin, splitter, "splitter_requests_total", path=path, code="200") or 0) >= 1, path
            if any(r["auth"] for r in requests):  # Basic auth (analytics-next >= 1.84) is not CORS-safelisted: preflights
                # Chromium preflights each distinct URL once (then caches it); splitter answers OPTIONS 204 before
                # routing, so the preflights are counted under path="unmatched" today (or under their route's label).
                preflights = sum([await metric(admin, splitter, "splitter_requests_total", path=label, code="204") or 0
                                  for label in (*paths, "unmatched")])
                assert preflights >= len(paths), f"{preflights} preflights answered 204 for {sorted(paths)}"
    finally:
        await runner.cleanup()
        assert await splitter.stop() == 0
