"""The real `@segment/analytics-node` (npm, tests/clients/) sends through a real `splitter serve`.

The SDK is configured as docs/sdk-setup.md says (`host` = splitter's base URL, `path: '/v1/batch'`),
run by the machine's `node` in a subprocess with a bounded timeout; tests/clients/send-node.js
prints every HTTP answer the SDK got and every event it built. Also: splitter's `429` +
`Retry-After: 1` (its `--max-in-flight` guard) is honoured by the SDK, which retries after the
delay and delivers everything.

Needs `npm ci --prefix tests/clients` (`make test` runs it); skipped only when node or npm is missing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from loadtest.process import SplitterProcess
from tests.system_tools import find, needs
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
SCRIPT = CLIENTS_DIR / "send-node.js"
NODE, NPM = find("node"), find("npm")

pytestmark = needs("node", "npm")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """tests/clients/node_modules, installed from the committed lock file when CI has not done it yet."""
    installed = CLIENTS_DIR / "node_modules" / "@segment" / "analytics-node"
    if not installed.is_dir():
        import subprocess

        subprocess.run([NPM or "npm", "ci", "--prefix", str(CLIENTS_DIR), "--no-audit", "--no-fund"], check=True, timeout=300,
                       stdout=subprocess.DEVNULL)
    return installed


async def metric(client: aiohttp.ClientSession, splitter: SplitterProcess, name: str, **labels: str) -> float | None:
    """Sum of the samples of `name` on splitter's admin /metrics whose labels include `labels`; None if there is none."""
    async with client.get(splitter.admin + "/metrics") as response:
        text = await response.text()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if re.match(rf"{name}(\{{|\s)", line) and all(f'{k}="{v}"' in line.partition(" ")[0] for k, v in labels.items())]
    return sum(values) if values else None


async def run_node(config: dict[str, Any], on_line: Any = None, timeout: float = 40.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run send-node.js; returns (the HTTP answers it saw, its final report). `on_line` sees each answer as it comes."""
    process = await asyncio.create_subprocess_exec(NODE or "node", str(SCRIPT), json.dumps(config), cwd=str(CLIENTS_DIR),
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    responses: list[dict[str, Any]] = []
    report: dict[str, Any] | None = None
    try:
        async with asyncio.timeout(timeout):
            while line := await process.stdout.readline():
                record = orjson.loads(line)
                if record["kind"] == "response":
                    responses.append(record)
                    if on_line is not None:
                        await on_line(record)
                else:
                    report = record
            code = await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"node did not finish within {timeout} s; answers so far {responses}") from None
    stderr = (await process.stderr.read()).decode("utf-8", "replace")
    assert code == 0 and report is not None, f"node exited {code}: {stderr[-2000:]}"
    return responses, report


async def test_node_sdk_every_call_through_splitter(tmp_path: Path, upstreams: Upstreams, node_modules: Path) -> None:
    splitter, rules = await start_splitter(tmp_path, upstreams)
    try:
        users = [user_routed_to(rules, "rudderstack", "node-r"), user_routed_to(rules, "segment", "node-s")]
        responses, report = await run_node({"host": splitter.ingress, "writeKey": CLIENT_KEY, "users": users, "flushAt": 1})
        assert report["errors"] == []
        events = report["events"]
        assert len(events) == 12 and len({e["messageId"] for e in events}) == 12
        assert all(e["messageId"].startswith("node-next-") for e in events)
        assert all(e["context"]["library"]["name"] == "@segment/analytics-node" for e in events)
        assert {e["type"] for e in events} == {"identify", "track", "page", "screen", "group", "alias"}
        assert any(e.get("properties", {}).get("title") == UNICODE for e in events)
        assert responses and {r["status"] for r in responses} == {200}
        await check_delivery(upstreams, rules, events)
    finally:
        assert await splitter.stop() == 0


class HeldRequest:
    """A POST /v1/batch whose body is only half sent, so splitter counts it in flight until `release()`."""

    def __init__(self, splitter: SplitterProcess, user: str) -> None:
        self.url = splitter.ingress
        self.body = orjson.dumps({"batch": [{"type": "track", "event": "Held", "userId": user, "messageId": f"held-{user}"}]})
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self.reader, self.writer = await asyncio.open_connection(host, int(port))
        auth = base64.b64encode(f"{CLIENT_KEY}:".encode()).decode()
        head = (f"POST /v1/batch HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Basic {auth}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(self.body)}\r\n\r\n").encode()
        self.writer.write(head + self.body[:10])
        await self.writer.drain()

    async def release(self) -> int:
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.body[10:])
        await self.writer.drain()
        status_line = await asyncio.wait_for(self.reader.readline(), 10)
        self.writer.close()
        return int(status_line.split()[1])


async def test_node_sdk_honours_429_retry_after(tmp_path: Path, upstreams: Upstreams, node_modules: Path) -> None:
    """`--max-in-flight 1` plus one request held open: the SDK's first attempt gets 429 + Retry-After: 1.

    The held request is released as soon as the SDK reports the 429; the SDK must wait out the
    Retry-After (>= 1 s, not its 0.5 s backoff) and then deliver every event, with no error.
    """
    splitter, rules = await start_splitter(tmp_path, upstreams, ["--max-in-flight", "1"])
    held = HeldRequest(splitter, "held-user")
    released: list[float] = []
    try:
        async with aiohttp.ClientSession() as admin:
            await held.open()
            async with asyncio.timeout(10):
                while await metric(admin, splitter, "splitter_requests_in_flight") != 1:
                    await asyncio.sleep(0.02)

            async def on_response(record: dict[str, Any]) -> None:
                if record["status"] == 429 and not released:
                    released.append(time.monotonic())
                    assert await held.release() == 200

            users = [user_routed_to(rules, "rudderstack", "node429-r"), user_routed_to(rules, "segment", "node429-s")]
            responses, report = await run_node({"host": splitter.ingress, "writeKey": CLIENT_KEY, "users": users, "flushAt": 20},
                                               on_response)
            assert report["errors"] == []
            assert responses[0]["status"] == 429 and responses[0]["retryAfter"] == "1", responses
            assert responses[-1]["status"] == 200, responses
            first_ok = next(r for r in responses if r["status"] == 200)
            assert first_ok["ms"] - responses[0]["ms"] >= 950, f"the SDK retried before Retry-After elapsed: {responses}"
            assert (await metric(admin, splitter, "splitter_requests_total", code="429") or 0) >= 1
            await check_delivery(upstreams, rules, report["events"], others=frozenset({"held-held-user"}))
            segment, _ = upstreams
            await segment.receiver.wait_for(len(report["events"]) + 1)
            assert "held-held-user" in segment.receiver.message_ids()  # the held request was answered 200, so it is delivered too
    finally:
        if held.writer is not None:
            held.writer.close()
        assert await splitter.stop() == 0
