"""A real `redis-server` for the tests that need one (de-duplication, the tier view): on a loopback
port, no persistence, with a password that must appear in no log line, metric or /admin answer.
The `redis_server` fixture (tests/conftest.py) starts one per test."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import redis.asyncio as aioredis

from tests.system_tools import find

PASSWORD = "redis-pass-7f3a9c2e51"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """`redis-server` on a loopback port, no persistence; kill it, stop it, start it again on the same port."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> aioredis.Redis:
        return aioredis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    async def start(self) -> None:
        binary = find("redis-server")
        assert binary is not None
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                "--daemonize", "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = await asyncio.create_subprocess_exec(binary, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                async with self.client() as client:
                    await client.ping()
                return
            except (OSError, aioredis.RedisError):
                if time.monotonic() > deadline or self.process.returncode is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                await asyncio.sleep(0.02)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    def pause(self) -> None:  # SIGSTOP: the socket stays open, nothing answers (a slow or hung server)
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def stats(self, client: aioredis.Redis) -> tuple[int, int, int]:
        """Commands sent (not counting those a script ran), SETs run, and socket reads done by the server so far."""
        commands = await client.info("commandstats")
        stats = await client.info("stats")
        calls = {name: int(entry["calls"]) for name, entry in commands.items()}
        sets = calls.get("cmdstat_set", 0)
        return sum(calls.values()) - sets, sets, int(stats["total_reads_processed"])
