"""Real `@rudderstack/analytics-js` in headless Chromium, through a real `splitter serve`, on all three transports.

The SDK is loaded from its npm package's prebuilt "bundled" UMD build (its plugins inside: nothing
is fetched from RudderStack's CDN) and configured as docs/sdk-setup.md says: `dataPlaneUrl` =
splitter's base URL, the write key splitter lists for the source. It fetches its source config
from `configUrl`, here the page's own server: a stand-in control plane that serves a minimal
config and records what the SDK asked with. `loadIntegration: false` and `polyfillIfRequired:
false`; any request to a third origin fails the test.

Transports: XHR (one `POST /v1/<type>` per event, Basic auth, JSON), XHR batching (`queueOptions.batch`,
`POST /v1/batch`) and beacon (`useBeacon: true`: `navigator.sendBeacon` to
`/beacon/v1/batch?writeKey=KEY` as `text/plain`, no Authorization header). Two visitors, whose
anonymousIds the rules split to different sides, each send page, track, identify, track: every event
must land once, on the side `decide` (what `splitter explain` runs) picks, with that side's credential,
and the client's key must not show in splitter's log or metrics. And with a key the control plane
refuses, the SDK sends nothing at all (what docs/sdk-setup.md warns about).

Needs `npm ci --prefix tests/clients`, node and /usr/bin/chromium (Debian package `chromium`);
skipped only when one of those programs is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from loadtest.process import SplitterProcess, launch_splitter
from proxy.engine import EventContext, RuleSet, compile_rules, decide
from tests.system_tools import find, needs
from tests.test_clients_browser import BROWSER_DIR, CLIENTS_DIR, RULES, drive, wait_for_count
from tests.test_clients_node import metric
from tests.test_clients_python import (  # noqa: F401  (upstreams is a fixture)
    CLIENT_KEY,
    RUDDER_KEY,
    SEGMENT_KEY,
    Upstreams,
    splitter_env,
    upstreams,
)

NPM = find("npm")
SDK_VERSION = "3.34.1"  # tests/clients/package.json pins it; the SDK reports it as context.app.version

pytestmark = needs("node", "npm", "chromium")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """tests/clients/node_modules, installed from the committed lock file when CI has not done it yet."""
    needed = [CLIENTS_DIR / "node_modules" / "@rudderstack" / "analytics-js", CLIENTS_DIR / "node_modules" / "playwright-core"]
    if not all(p.is_dir() for p in needed):
        import subprocess

        subprocess.run([NPM or "npm", "ci", "--prefix", str(CLIENTS_DIR), "--no-audit", "--no-fund"], check=True, timeout=300,
                       stdout=subprocess.DEVNULL)
    return CLIENTS_DIR / "node_modules"


def source_config(write_key: str) -> dict[str, Any]:
    """The least a `/sourceConfig` answer needs for analytics-js 3.x: an enabled source with no device-mode destinations."""
    return {"isHosted": True, "source": {
        "id": "stand-in-source", "name": "web", "workspaceId": "stand-in-workspace", "writeKey": write_key, "enabled": True,
        "config": {"statsCollection": {"errors": {"enabled": False}, "metrics": {"enabled": False}}},
        "destinations": [],
    }}


class PageServer:
    """The test page, the SDK's bundled UMD build and a stand-in control plane, on one loopback port of their own."""

    def __init__(self, node_modules: Path) -> None:
        self.umd = node_modules / "@rudderstack" / "analytics-js" / "dist" / "npm" / "modern" / "bundled" / "umd"
        assert (self.umd / "index.js").is_file(), f"no prebuilt bundled UMD build in {self.umd}"
        self.config_requests: list[dict[str, Any]] = []
        self.unexpected: list[str] = []
        self.runner: web.AppRunner | None = None
        self.origin = ""

    async def start(self) -> None:
        async def page(request: web.Request) -> web.FileResponse:
            return web.FileResponse(BROWSER_DIR / "rudder.html")

        async def config(request: web.Request) -> web.Response:
            self.config_requests.append({"query": dict(request.query), "auth": request.headers.get("Authorization")})
            key = request.query.get("writeKey", "")
            if key != CLIENT_KEY:  # what RudderStack's control plane does with a key it does not know
                return web.json_response({"message": "Invalid write key"}, status=401)
            return web.json_response(source_config(key))

        async def anything_else(request: web.Request) -> web.Response:
            self.unexpected.append(f"{request.method} {request.path_qs}")
            return web.Response(status=404)

        app = web.Application()
        app.router.add_get("/", page)
        app.router.add_get("/sourceConfig/", config)
        app.router.add_static("/rjs", self.umd)
        app.router.add_route("*", "/{tail:.*}", anything_else)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.origin = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def visitor_routed_to(rules: RuleSet, destination: str, prefix: str) -> str:
    """An anonymousId the 50/50 split sends to `destination` (the cohort key reads anonymousId first)."""
    for n in range(1000):
        candidate = f"{prefix}-{n}"
        if decide(rules, {"type": "track", "anonymousId": candidate, "userId": "user-42"}, EventContext("web")).primary == (destination,):
            return candidate
    raise AssertionError(f"no anonymousId routed to {destination}")


EXPECTED_PATHS = {
    "xhr": {"/v1/page", "/v1/track", "/v1/identify"},
    "batching": {"/v1/batch"},
    "beacon": {f"/beacon/v1/batch?writeKey={CLIENT_KEY}"},
}


@pytest.mark.parametrize("transport", ["xhr", "batching", "beacon"])
async def test_rudderstack_analytics_js_in_chromium_through_splitter(tmp_path: Path, upstreams: Upstreams, node_modules: Path,
                                                                     transport: str) -> None:
    segment, rudder = upstreams
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(RULES)
    env = splitter_env(segment, rudder)
    rules = compile_rules(RULES, env=env)
    splitter: SplitterProcess = await launch_splitter(
        str(rules_path), env, ["--spool-dir", str(tmp_path / "spool"), "--dead-letter-dir", str(tmp_path / "dead"), "--drain-timeout", "2"])
    pages = PageServer(node_modules)
    await pages.start()
    try:
        visitors = [visitor_routed_to(rules, "rudderstack", f"rs-{transport}"), visitor_routed_to(rules, "segment", f"seg-{transport}")]
        port = splitter.ingress.rsplit(":", 1)[1]
        report = await drive(f"{pages.origin}/?port={port}&writeKey={CLIENT_KEY}&transport={transport}&visitors={','.join(visitors)}",
                             splitter.ingress)
        print(json.dumps(report, indent=1))  # shown by pytest only on failure (or with -s)
        result = report["result"]
        assert result["ok"], f"analytics-js failed: {result.get('error')}\nconsole: {report['console']}"
        assert [v["anonymousId"] for v in result["visitors"]] == visitors and {v["userId"] for v in result["visitors"]} == {"user-42"}
        assert not [line for line in report["console"] if line.startswith(("pageerror", "http ", "error"))], report["console"]
        assert report["offsite"] == [] and pages.unexpected == [], (report["offsite"], pages.unexpected)  # no CDN, no polyfill service
        # The SDK asked the control plane for its config with the key it was given (query and Basic auth).
        assert pages.config_requests and all(r["query"]["writeKey"] == CLIENT_KEY for r in pages.config_requests), pages.config_requests

        requests = report["requests"]
        assert report["pending"] == 0 and requests and all(r["status"] == 200 for r in requests), requests
        assert {r["url"].removeprefix(splitter.ingress) for r in requests} == EXPECTED_PATHS[transport], requests
        if transport == "beacon":  # navigator.sendBeacon: text/plain, the key in the URL, no Authorization header
            assert all(r["type"] == "ping" and r["auth"] is None and r["contentType"].startswith("text/plain") for r in requests), requests
        else:
            assert all(r["auth"] and r["contentType"].startswith("application/json") for r in requests), requests

        await wait_for_count(upstreams, 8)
        events = [(kind, rec) for kind, receiver in (("segment", segment), ("rudderstack", rudder)) for rec in receiver.receiver.events]
        assert len(events) == 8, [(kind, rec.event.get("type"), rec.event.get("anonymousId")) for kind, rec in events]
        assert len({rec.event["messageId"] for _, rec in events}) == 8  # each event once
        credentials = {"segment": SEGMENT_KEY, "rudderstack": RUDDER_KEY}
        for kind, rec in events:
            assert rec.write_key == credentials[kind], f"{kind} got {rec.write_key!r}"
            assert decide(rules, rec.event, EventContext("web")).primary == (kind,), (kind, rec.event)  # where explain says
            assert "writeKey" not in rec.event
            context = rec.event["context"]
            assert context["library"]["name"] == "RudderLabs JavaScript SDK" and context.get("ip"), context
            assert context["app"]["version"] == SDK_VERSION, context["app"]  # the SDK's own version, not the site's
        for visitor, side in zip(visitors, ("rudderstack", "segment"), strict=True):
            mine = [rec.event for kind, rec in events if rec.event["anonymousId"] == visitor]
            assert {kind for kind, rec in events if rec.event["anonymousId"] == visitor} == {side}
            assert sorted(m["type"] for m in mine) == ["identify", "page", "track", "track"]
            assert {m.get("event") for m in mine if m["type"] == "track"} == {"Clicked", "After login"}
            assert next(m for m in mine if m.get("event") == "Clicked")["properties"] == {"n": 1}
            assert next(m for m in mine if m.get("event") == "Clicked").get("userId") in (None, "")  # still anonymous
            assert next(m for m in mine if m["type"] == "identify")["userId"] == "user-42"
            assert next(m for m in mine if m["type"] == "identify")["context"]["traits"]["name"] == "Ada"
            assert next(m for m in mine if m.get("event") == "After login")["userId"] == "user-42"

        async with aiohttp.ClientSession() as admin:
            for path in {p.partition("?")[0] for p in EXPECTED_PATHS[transport]}:
                assert (await metric(admin, splitter, "splitter_requests_total", path=path, code="200") or 0) >= 1, path
            async with admin.get(splitter.admin + "/metrics") as response:
                assert CLIENT_KEY not in await response.text()
        assert CLIENT_KEY not in json.dumps(splitter.log)
    finally:
        await pages.close()
        assert await splitter.stop() == 0


async def test_analytics_js_sends_nothing_when_the_control_plane_does_not_know_its_key(tmp_path: Path, upstreams: Upstreams,
                                                                                        node_modules: Path) -> None:
    """What docs/sdk-setup.md warns about: the SDK asks the control plane for its source config with
    the key it was given, and with no valid config it never sends an event, even one splitter would accept."""
    segment, rudder = upstreams
    other_key = "listed-but-unknown-to-rudderstack"
    rules_text = RULES.replace(f'write_keys: ["{CLIENT_KEY}"]', f'write_keys: ["{CLIENT_KEY}", "{other_key}"]')
    (tmp_path / "rules.yaml").write_text(rules_text)
    splitter = await launch_splitter(str(tmp_path / "rules.yaml"), splitter_env(segment, rudder),
                                     ["--spool-dir", str(tmp_path / "spool"), "--dead-letter-dir", str(tmp_path / "dead"), "--drain-timeout", "2"])
    pages = PageServer(node_modules)
    await pages.start()
    try:
        port = splitter.ingress.rsplit(":", 1)[1]
        report = await drive(f"{pages.origin}/?port={port}&writeKey={other_key}&transport=xhr&visitors=v&early=1&readyTimeout=3000",
                             splitter.ingress)
        assert not report["result"]["ok"] and "never became ready" in report["result"]["error"], report
        assert [r["query"]["writeKey"] for r in pages.config_requests] == [other_key]  # refused by the stand-in control plane
        assert report["requests"] == [] and report["offsite"] == [], report
        assert segment.receiver.events == [] and rudder.receiver.events == []
    finally:
        await pages.close()
        assert await splitter.stop() == 0
