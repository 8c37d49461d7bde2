"""The ingest port: the fast lane in front, aiohttp behind it, one socket (see fastlane.py for the split)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.ingress.app import FAST_INGRESS
from proxy.ingress.body import MAX_WIRE_BYTES
from proxy.ingress.fastlane import KEEPALIVE_TIMEOUT, Lane


class IngressListener:
    def __init__(self, server: asyncio.AbstractServer, lane: Lane, runner: web.AppRunner) -> None:
        self._server = server
        self.lane = lane
        self._runner = runner
        self._closed = False

    @property
    def addresses(self) -> list[str]:
        sockets = getattr(self._server, "sockets", None) or ()
        return [f"{host}:{port}" for host, port, *_ in (sock.getsockname() for sock in sockets)]

    @property
    def url(self) -> str:
        return f"http://{self.addresses[0]}"

    async def close(self, drain_timeout: float) -> None:
        """Stop accepting; in-flight requests finish (up to `drain_timeout`) on both lanes; then the app's cleanup."""
        if self._closed:
            return
        self._closed = True
        self._server.close()
        await asyncio.gather(self.lane.shutdown(drain_timeout), self._runner.cleanup())


async def listen(runner: web.AppRunner, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT) -> IngressListener:
    """Serve `runner` (set up, built by `build_ingress_app`) on host:port; raises OSError when it cannot bind."""
    assert runner.server is not None, "set the runner up first"
    lane = Lane(runner.server, runner.app[FAST_INGRESS], MAX_WIRE_BYTES, keepalive_timeout)
    server = await asyncio.get_running_loop().create_server(lane.protocol, host, port, reuse_port=reuse_port or None, backlog=backlog)
    return IngressListener(server, lane, runner)
