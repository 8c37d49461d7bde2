"""The real `@rudderstack/rudder-sdk-node` (npm, tests/clients/) sends through a real `splitter serve`.

Configured as docs/sdk-setup.md says: `dataPlaneUrl` = splitter's base URL, the write key splitter
lists for the source. The SDK posts `/v1/batch` with HTTP Basic auth, gzip and axios'
`Content-Type: application/x-www-form-urlencoded` (a Buffer body); tests/clients/send-rudder-node.js
reports every request as it went on the wire. Every event must land where the rules (as `explain`
decides) send it, intact, with each destination's own credential, and the SDK must see no error.

Needs `npm ci --prefix tests/clients` (`make test` runs it); skipped only when node or npm is missing.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.system_tools import find, needs
from tests.test_clients_node import metric
from tests.test_clients_python import (  # noqa: F401  (upstreams is a fixture)
    CLIENT_KEY,
    UNICODE,
    Upstreams,
    check_delivery,
    start_splitter,
    upstreams,
    user_routed_to,
)

CLIENTS_DIR = Path(__file__).resolve().parent / "clients"
SCRIPT = CLIENTS_DIR / "send-rudder-node.js"
NODE, NPM = find("node"), find("npm")

pytestmark = needs("node", "npm")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """tests/clients/node_modules, installed from the committed lock file when CI has not done it yet."""
    installed = CLIENTS_DIR / "node_modules" / "@rudderstack" / "rudder-sdk-node"
    if not installed.is_dir():
        import subprocess

        subprocess.run([NPM or "npm", "ci", "--prefix", str(CLIENTS_DIR), "--no-audit", "--no-fund"], check=True, timeout=300,
                       stdout=subprocess.DEVNULL)
    return installed


async def run_rudder_node(config: dict[str, Any], timeout: float = 40.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run send-rudder-node.js; returns (the requests it made with their answers, its final report)."""
    process = await asyncio.create_subprocess_exec(NODE or "node", str(SCRIPT), json.dumps(config), cwd=str(CLIENTS_DIR),
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"node did not finish within {timeout} s") from None
    records = [orjson.loads(line) for line in stdout.splitlines() if line.strip()]
    assert process.returncode == 0 and records and records[-1]["kind"] == "done", \
        f"node exited {process.returncode}: {stderr.decode('utf-8', 'replace')[-2000:]} {records[-3:]}"
    return [r for r in records if r["kind"] == "response"], records[-1]


@pytest.mark.parametrize("flush_at", [1, 6])
async def test_rudder_sdk_node_every_call_through_splitter(tmp_path: Path, upstreams: Upstreams, node_modules: Path, flush_at: int) -> None:
    splitter, rules = await start_splitter(tmp_path, upstreams)
    try:
        users = [user_routed_to(rules, "rudderstack", f"rnode{flush_at}-r"), user_routed_to(rules, "segment", f"rnode{flush_at}-s")]
        requests, report = await run_rudder_node({"dataPlaneUrl": splitter.ingress, "writeKey": CLIENT_KEY, "users": users, "flushAt": flush_at})
        print(json.dumps([(r["status"], len(r["events"]), r["contentType"], r["contentEncoding"]) for r in requests]))  # on failure (or -s)
        assert report["errors"] == [] and report["callbacks"] == report["expected"] == 12, report
        assert requests and all(r["status"] == 200 and r["answer"] == {"success": True} for r in requests), requests
        assert {r["url"] for r in requests} == {f"{splitter.ingress}/v1/batch"}
        # The wire form the issue names: gzip, sent as a form (axios' default for a Buffer).
        assert {(r["contentType"], r["contentEncoding"]) for r in requests} == {("application/x-www-form-urlencoded", "gzip")}, requests
        if flush_at > 1:
            assert max(len(r["events"]) for r in requests) > 1  # real batches, not one event per request
        events = [event for r in requests for event in r["events"]]
        assert len(events) == 12 and len({e["messageId"] for e in events}) == 12
        assert all(e["context"]["library"]["name"] == "analytics-node" and e["channel"] == "server" for e in events)
        assert {e["type"] for e in events} == {"identify", "track", "page", "screen", "group", "alias"}
        assert any(e.get("properties", {}).get("title") == UNICODE for e in events)
        await check_delivery(upstreams, rules, events)  # where `decide` (explain) says, intact, each with its own credential

        async with aiohttp.ClientSession() as admin:
            assert await metric(admin, splitter, "splitter_requests_total", path="/v1/batch", code="200") == len(requests)
            async with admin.get(splitter.admin + "/metrics") as response:
                assert CLIENT_KEY not in await response.text()
        assert CLIENT_KEY not in json.dumps(splitter.log)
    finally:
        assert await splitter.stop() == 0
