"""What the side-by-side benchmark puts between the load and the receivers, one at a time.

Each subject is started pinned to the proxy core, offers a URL, names the processes whose CPU and
memory count as the proxy's, knows how to wait until what it accepted has reached the receivers,
and says what the receivers must then hold (`expect`):
- `forward`: every event of every request once, at Segment's receiver (direct, nginx, forwarder);
- `split-mirror`: every event twice in total, once at the primary nginx picked and once at the
  mirror (nginx split_clients + mirror);
- `splitter`: exactly what the rules promise for the bodies sent, in order (see payloads).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from loadtest.bench_delivery import RULES, drained
from loadtest.harness import PROXY_CORE, Receivers, pin, pinned_server, with_children
from loadtest.nginx import nginx_binary, start_nginx
from loadtest.process import SplitterProcess, launch_splitter

Expect = Literal["forward", "split-mirror", "splitter"]
Durability = Literal["interval", "fsync"]  # splitter serve --durability
SETTLE_SECONDS = 0.2  # synchronous proxies: requests in flight when the load stops finish within this
DRAIN_LIMIT = 60.0  # splitter: seconds for its spool to empty after a run


class Unavailable(Exception):
    """The subject cannot run on this machine (a tool is missing): its rows are skipped with this note."""


@dataclass
class Subject:
    name: str
    url: str
    expect: Expect
    pids: Callable[[], list[int]]
    settle: Callable[[], Awaitable[float | None]]  # seconds it took, None if it did not within the limit
    splitter: SplitterProcess | None = None


async def _pause() -> float:
    await asyncio.sleep(SETTLE_SECONDS)
    return SETTLE_SECONDS


@asynccontextmanager
async def direct(receivers: Receivers) -> AsyncIterator[Subject]:
    """No proxy: the floor. Nothing to measure on the proxy core."""
    yield Subject("direct", receivers.segment, "forward", list, _pause)


@asynccontextmanager
async def nginx(receivers: Receivers, shape: Literal["pass", "split"], rudder_key: str) -> AsyncIterator[Subject]:
    binary = nginx_binary()
    if binary is None:
        raise Unavailable("nginx not installed")
    server = await asyncio.to_thread(start_nginx, binary, shape, receivers.segment, receivers.rudderstack, rudder_key)
    try:
        name, expect = ("nginx", "forward") if shape == "pass" else ("nginx split+mirror", "split-mirror")
        yield Subject(name, server.url, expect, server.pids, _pause)  # type: ignore[arg-type]
    finally:
        await asyncio.to_thread(server.stop)


@asynccontextmanager
async def forwarder(receivers: Receivers) -> AsyncIterator[Subject]:
    with pinned_server("loadtest.baselines.forwarder", "--upstream", receivers.segment) as (url, pid):
        yield Subject("aiohttp forwarder", url, "forward", lambda: [pid], _pause)


def splitter_name(durability: Durability | None) -> str:
    """`splitter (interval)`, `splitter (fsync)`; plain `splitter` when the mode is left to serve's default or the environment."""
    return f"splitter ({durability})" if durability else "splitter"


@asynccontextmanager
async def splitter(env: dict[str, str], durability: Durability | None = None) -> AsyncIterator[Subject]:
    """splitter on the realistic rules file, with its durable spool in a temporary directory removed afterwards
    (a stalled-upstream run leaves hundreds of MB there); `durability` is passed as `--durability`."""
    with tempfile.TemporaryDirectory(prefix="splitter-bench-") as scratch:
        mode = ["--durability", durability] if durability else []
        running = await launch_splitter(str(RULES), env, ["--spool-dir", f"{scratch}/spool", "--dead-letter-dir", f"{scratch}/dead-letter", *mode],
                                        prefix=pin(PROXY_CORE))
        started = next((line for line in running.log if line.get("event") == "started"), {})
        print(f"{splitter_name(durability)} pid {running.process.pid}, {started.get('prepare', 'unknown')} prepare(): profile with "
              f"`py-spy record -o profile.svg --pid {running.process.pid}`", file=sys.stderr)
        try:
            yield Subject(splitter_name(durability), running.ingress, "splitter", lambda: with_children(running.process.pid),
                          lambda: drained(running.admin, DRAIN_LIMIT), running)
        finally:
            await running.stop()
