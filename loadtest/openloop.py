"""Open-loop load at a fixed rate, with latency measured from each request's *scheduled* send time.

wrk is closed loop: when the server slows down wrk sends less, so the slow stretch hides from its
percentiles (coordinated omission), and wrk2 is not packaged. Here request i is due at
start + i/rate whatever the answers do; a due request waits for a free keep-alive connection if
all are busy, and that wait counts in its latency. Requests are encoded once before the clock
starts, sent over raw asyncio Protocols (uvloop) with no client library in the way.

If the server cannot keep up (achieved < 95 % of offered, or work piles up by the end of the
schedule), the result says `saturated` and the percentiles only describe a growing queue.
Run: `python -m loadtest.openloop --url URL --path /v1/t --bodies FILE --auth HEADER --rate N
--seconds S`; prints one JSON line. Bounded: the schedule lasts `--seconds`, then at most `--grace`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter
from urllib.parse import urlsplit

SATURATED_BELOW = 0.95  # achieved / offered under this: the offered load was not sustained
BACKLOG_SECONDS = 0.2  # more than this much scheduled work outstanding at the end: the queue grows
TICK = 0.001  # seconds between send rounds at most; requests due meanwhile go out together, late by up to this


@dataclass
class OpenLoopResult:
    offered_per_s: float
    achieved_per_s: float
    scheduled: int
    answered: int  # 2xx
    errors: int  # non-2xx, broken connections, and requests unanswered when the grace ran out
    outstanding_at_end: int  # scheduled but not yet answered when the schedule ended
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    saturated: bool


def encode_requests(host: str, path: str, bodies: list[bytes], auth: str) -> list[bytes]:
    """Whole HTTP/1.1 keep-alive requests, one per body; X-User varies per body (nginx splits on it)."""
    return [
        (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nAuthorization: {auth}\r\n"
         f"X-User: {index + 1}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        for index, body in enumerate(bodies)
    ]


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time; parses just enough of the answer."""

    def __init__(self, ready: Callable[[_Connection], None], done: Callable[[_Connection, int | None, float], None]) -> None:
        self._ready = ready
        self._done = done
        self._buffer = bytearray()
        self._scheduled: float | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ready(self)

    def send(self, request: bytes, scheduled: float) -> None:
        assert self.transport is not None
        self._scheduled = scheduled
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0 or self._scheduled is None:
            return
        head = bytes(self._buffer[:head_end]).lower()
        status = int(head[9:12])
        if b"transfer-encoding: chunked" in head:
            end = self._buffer.find(b"0\r\n\r\n", head_end + 4)
            if end < 0:
                return
            end += 5
        else:
            marker = head.find(b"content-length:")
            length = 0
            if marker >= 0:
                line_end = head.find(b"\r\n", marker)
                length = int(head[marker + 15:line_end if line_end >= 0 else len(head)])
            end = head_end + 4 + length
            if len(self._buffer) < end:
                return
        del self._buffer[:end]
        scheduled, self._scheduled = self._scheduled, None
        self._done(self, status, scheduled)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._scheduled is not None:
            scheduled, self._scheduled = self._scheduled, None
            self._done(self, None, scheduled)


async def run_open_loop(url: str, requests: list[bytes], rate: float, seconds: float, connections: int = 64,
                        grace: float = 5.0) -> OpenLoopResult:
    """Send `rate` requests/s for `seconds`, cycling through `requests`, over a pool of connections."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    idle: deque[_Connection] = deque()
    backlog: deque[float] = deque()  # scheduled times of due requests waiting for a connection
    latencies: list[float] = []
    counts = {"sent": 0, "errors": 0, "in_flight": 0}
    last_answer = perf_counter()

    def dispatch() -> None:
        while backlog and idle:
            connection = idle.popleft()
            connection.send(requests[counts["sent"] % len(requests)], backlog.popleft())
            counts["sent"] += 1
            counts["in_flight"] += 1

    def ready(connection: _Connection) -> None:
        idle.append(connection)
        dispatch()

    def done(connection: _Connection, status: int | None, scheduled: float) -> None:
        nonlocal last_answer
        last_answer = perf_counter()
        counts["in_flight"] -= 1
        if status is not None and 200 <= status < 300:
            latencies.append(last_answer - scheduled)
        else:
            counts["errors"] += 1
        if connection.transport is not None:
            ready(connection)
        else:
            reconnects.add(loop.create_task(connect()))

    async def connect() -> None:
        try:
            await loop.create_connection(lambda: _Connection(ready, done), host, port)
        except OSError:
            counts["errors"] += 1

    reconnects: set[asyncio.Task[None]] = set()
    for _ in range(connections):
        await connect()
    total = max(1, int(rate * seconds))
    start = perf_counter() + 0.01
    due = 0
    while due < total:
        now = perf_counter()
        now_due = min(total, int((now - start) * rate) + 1)
        while due < now_due:
            backlog.append(start + due / rate)
            due += 1
        dispatch()
        # at least a millisecond: uvloop timers have that resolution, and a shorter sleep would spin
        await asyncio.sleep(max(TICK, start + due / rate - perf_counter()))
    outstanding = len(backlog) + counts["in_flight"]
    deadline = perf_counter() + grace
    while (backlog or counts["in_flight"]) and perf_counter() < deadline:
        await asyncio.sleep(0.01)
    unanswered = len(backlog) + counts["in_flight"]
    for connection in idle:
        if connection.transport is not None:
            connection.transport.close()
    answered = len(latencies)
    achieved = answered / max(1e-9, last_answer - start)
    latencies.sort()

    def percentile(p: float) -> float | None:
        return round(1000 * latencies[min(answered - 1, int(p * answered))], 3) if answered else None

    saturated = achieved < SATURATED_BELOW * rate or outstanding > max(connections, rate * BACKLOG_SECONDS) or unanswered > 0
    return OpenLoopResult(round(rate, 1), round(achieved, 1), total, answered, counts["errors"] + unanswered, outstanding,
                          percentile(0.5), percentile(0.99), percentile(1.0), saturated)


def launch(url: str, path: str, bodies: list[bytes], auth: str, *, rate: float, seconds: float, grace: float = 5.0) -> OpenLoopResult:
    """Run the generator in its own process pinned to the load core; bounded by `seconds` + `grace`."""
    from loadtest.harness import LOAD_CORE, pin  # here, so the generator's own process does not import the engine

    scratch = Path(tempfile.mkdtemp(prefix="splitter-openloop-"))
    try:
        (scratch / "bodies.txt").write_bytes(b"\n".join(bodies) + b"\n")
        command = [*pin(LOAD_CORE), sys.executable, "-m", "loadtest.openloop", "--url", url, "--path", path, "--bodies", str(scratch / "bodies.txt"),
                   "--auth", auth, "--rate", f"{rate:.1f}", "--seconds", f"{seconds:g}", "--grace", f"{grace:g}"]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=seconds + grace + 30)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if finished.returncode != 0 or not finished.stdout.strip():
        raise RuntimeError(f"open-loop generator failed (exit {finished.returncode}): {finished.stderr[-500:]}")
    return OpenLoopResult(**json.loads(finished.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--bodies", type=Path, required=True, help="one request body per line")
    parser.add_argument("--auth", default="")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--grace", type=float, default=5.0, help="seconds to wait for answers after the schedule")
    args = parser.parse_args()
    if urlsplit(args.url).hostname != "127.0.0.1":
        parser.error("only 127.0.0.1 is allowed")
    bodies = [line for line in args.bodies.read_bytes().split(b"\n") if line]
    requests = encode_requests(urlsplit(args.url).netloc, args.path, bodies, args.auth)
    work = run_open_loop(args.url, requests, args.rate, args.seconds, args.connections, args.grace)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        result = asyncio.run(work)
    else:
        result = uvloop.run(work)
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
