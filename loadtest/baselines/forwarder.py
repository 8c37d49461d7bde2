"""Baseline: the quick in-house forwarder a team would write instead of splitter.

aiohttp + uvloop; parses each batch (or single call) with orjson, hashes each event's cohort key with mmh3 (so it
pays for reading the body, as a splitter must), and forwards the body unchanged to one upstream
over a keep-alive session, answering with the upstream's status. No routing, no durability.
Run: `python -m loadtest.baselines.forwarder --upstream URL [--port 0]`; prints its URL as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import aiohttp
import mmh3
import orjson
from aiohttp import web


def _hash_events(body: bytes) -> int:
    """In a plain function, so the parsed batch is freed before the upstream await (the GC trap)."""
    parsed = orjson.loads(body)
    total = 0
    events = parsed.get("batch", [parsed]) if isinstance(parsed, dict) else ()  # a single call is its own event
    for event in events:
        key = event.get("anonymousId") or event.get("userId") or ""
        total += mmh3.hash(f"salt:{key}".encode(), signed=False) % 10000
    return total


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=30))

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        _hash_events(body)
        headers = {"Content-Type": "application/json"}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        async with session.post(args.upstream + request.path, data=body, headers=headers) as upstream:
            answer = await upstream.read()
            return web.Response(status=upstream.status, body=answer, content_type="application/json")

    app = web.Application(client_max_size=4 * 1024 * 1024, handler_args={"auto_decompress": False})
    for path in ("/v1/batch", "/v1/track"):
        app.router.add_post(path, forward)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = runner.addresses[0][1]
    print(json.dumps({"url": f"http://127.0.0.1:{port}"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await session.close()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover
        asyncio.run(main())
    sys.exit(0)
