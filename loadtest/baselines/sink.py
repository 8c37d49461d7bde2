"""Measuring sticks for `loadtest.floor`: servers that read each request's body and answer 200, nothing else.

- `--kind aiohttp`: an aiohttp + uvloop application, as splitter's ingress is built (same body limit,
  no decompression): what aiohttp's request handling costs before any of splitter's work starts.
(splitter's own ingest port, with its timeouts, in-flight limit and metrics, is measured by
`python -m loadtest.floor --serve`, next to these.)
- `--kind bare`: a bare `asyncio.Protocol` on uvloop that frames requests by Content-Length only: the
  cost of moving the bytes through Python at all. A measuring stick, not an HTTP server (no chunked
  bodies, no header validation, no limits): never put it in front of traffic.

Run: `python -m loadtest.baselines.sink --kind aiohttp|bare [--port 0]`; prints its URL as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

from aiohttp import web

from proxy.ingress.body import read_body

ANSWER = b'{"success":true}'
BARE_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)


PATHS = ("/v1/batch", "/v1/track", "/v1/t")


async def _read_and_answer(request: web.Request) -> web.Response:
    await read_body(request)  # splitter's body reader
    return web.Response(body=ANSWER, content_type="application/json")


def _app() -> web.Application:
    app = web.Application(client_max_size=1024**2, handler_args={"auto_decompress": False})
    for path in PATHS:
        app.router.add_post(path, _read_and_answer)
    return app


async def _aiohttp_site(port: int) -> tuple[str, web.AppRunner]:
    runner = web.AppRunner(_app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}", runner


class BareProtocol(asyncio.Protocol):
    """Finds the end of the headers, skips Content-Length bytes of body, answers; keeps the connection."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in bytes(self.buffer[:end]).lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[:end + 4 + length]
            assert self.transport is not None
            self.transport.write(BARE_ANSWER)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=("aiohttp", "bare"), required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    runner: web.AppRunner | None = None
    if args.kind == "aiohttp":
        url, runner = await _aiohttp_site(args.port)
    else:
        server = await asyncio.get_running_loop().create_server(BareProtocol, "127.0.0.1", args.port)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    print(json.dumps({"url": url}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    if runner is not None:
        await runner.cleanup()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
