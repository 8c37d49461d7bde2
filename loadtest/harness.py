"""Building blocks for benchmarks: pinned processes, CPU from /proc, wrk runs, realistic bodies.

Everything binds to 127.0.0.1, every run has a fixed duration, and every child is stopped at the
end. On this 2-core machine the proxy is pinned to core 1 and the load generator and receivers to
core 0 (when `taskset` is present), so the proxy's CPU per event is measured on its own core.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from proxy.engine import EventContext, RuleSet, decide

PROXY_CORE, LOAD_CORE = "1", "0"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
EVENT_PAD = "x" * 380  # brings a track call to ~600 B, a batch of 50 to ~30 KB


def pinning_available() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pin(core: str) -> list[str]:
    return ["taskset", "-c", core] if pinning_available() else []


@contextmanager
def pinned_server(module: str, *args: str) -> Iterator[tuple[str, int]]:
    """`python -m module args` on the proxy core, which prints its URL as JSON on its first line: (url, pid)."""
    process = subprocess.Popen([*pin(PROXY_CORE), sys.executable, "-m", module, *args], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        yield json.loads(process.stdout.readline())["url"], process.pid
    finally:
        process.terminate()
        process.wait(10)


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes, from /proc: survives the noise of a shared machine."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory now (VmRSS), or its peak over the process's life with field="VmHWM"."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def memory_mb(pids: list[int], field: str = "VmRSS") -> float:
    """Memory of a proxy made of several processes (nginx's master and worker): the sum."""
    return sum(rss_mb(pid, field) for pid in pids)


def with_children(pid: int) -> list[int]:
    """The process and its direct children (nginx's worker, splitter's workers), from /proc."""
    found = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return found


@dataclass
class Receivers:
    process: subprocess.Popen[bytes]
    segment: str
    rudderstack: str

    async def stats(self, kind: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as client, client.get(getattr(self, kind) + "/_control/stats") as response:
            return await response.json()  # type: ignore[no-any-return]

    async def faults(self, kind: str, **changes: Any) -> None:
        async with aiohttp.ClientSession() as client, client.post(getattr(self, kind) + "/_control/faults", json=changes) as response:
            response.raise_for_status()

    async def reset(self) -> None:
        async with aiohttp.ClientSession() as client:
            for kind in ("segment", "rudderstack"):
                async with client.post(getattr(self, kind) + "/_control/reset") as response:
                    response.raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_receivers(rudder_keys: list[str]) -> Receivers:
    """Both stand-ins in one count-only process on the load core."""
    process = subprocess.Popen(
        [*pin(LOAD_CORE), sys.executable, "-m", "loadtest.receivers", "--no-record", "--rudder-keys", ",".join(rudder_keys)],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    urls = json.loads(process.stdout.readline())
    return Receivers(process, urls["segment"], urls["rudderstack"])


def event(user: str, i: int, version: str = "4.3.0") -> dict[str, Any]:
    return {
        "type": "track", "event": "Product Viewed", "anonymousId": user, "messageId": f"bench-{user}-{i}",
        "timestamp": "2026-11-23T12:00:00.000Z",
        "properties": {"product_id": f"p-{i}", "price": 19.99, "note": EVENT_PAD},
        "context": {"app": {"version": version}, "library": {"name": "analytics-python", "version": "2.3.4"}, "os": {"name": "iOS"}},
    }


def balanced_batches(rules: RuleSet, count: int, size: int, first_share: int, source: str, seed: int = 11) -> list[list[dict[str, Any]]]:
    """Batches of `size` events from distinct users where exactly `first_share` go to the rules'
    first-listed split destination: every request then fans out identically, so what the receivers
    must hold is known exactly from the number of requests answered 200."""
    rng = random.Random(seed)
    ctx = EventContext(source)
    split_rule = next(r for r in rules.rules if r.route.split)
    first = split_rule.route.split.arms[0][0]  # type: ignore[union-attr]
    batches = []
    for b in range(count):
        chosen: list[dict[str, Any]] = []
        want_first, want_rest = first_share, size - first_share
        while want_first or want_rest:
            candidate = event(f"u{b}-{rng.getrandbits(48):x}", len(chosen))
            to_first = first in decide(rules, candidate, ctx).primary
            if to_first and want_first:
                want_first -= 1
            elif not to_first and want_rest:
                want_rest -= 1
            else:
                continue
            chosen.append(candidate)
        batches.append(chosen)
    return batches


LUA = """
local bodies = {}
local n = 0
local index = 0
for line in io.lines("%(bodies)s") do n = n + 1; bodies[n] = line end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "%(auth)s"
request = function()
  index = index %% n + 1
  -- a per-body user for proxies that cannot read the body (nginx's split_clients hashes it)
  wrk.headers["X-User"] = tostring(index)
  return wrk.format(nil, "%(path)s", nil, bodies[index])
end
done = function(summary, latency, requests)
  -- summary.errors.status counts answers that are not 2xx/3xx (splitter's success is always 200)
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "errors": %%d, "non_2xx": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    non_2xx: int

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx - self.errors


def run_wrk(url: str, path: str, bodies: list[bytes], auth: str, *, seconds: float, connections: int = 32, threads: int = 1,
            rate: int | None = None) -> WrkResult:
    """A bounded wrk run (closed loop; with `rate`, wrk2-style pacing is not available, so `rate` is unused)."""
    scratch = Path(tempfile.mkdtemp(prefix="splitter-wrk-"))
    (scratch / "bodies.txt").write_bytes(b"\n".join(bodies) + b"\n")
    script = scratch / "bench.lua"
    script.write_text(LUA % {"bodies": scratch / "bodies.txt", "auth": auth, "path": path})
    command = [*pin(LOAD_CORE), "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--latency", "-s", str(script), url]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    line = next((line for line in finished.stdout.splitlines() if line.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result (exit {finished.returncode}): {finished.stdout[-500:]} {finished.stderr[-500:]}")
    data = json.loads(line[len("WRKJSON "):])
    shutil.rmtree(scratch, ignore_errors=True)
    return WrkResult(data["requests"], data["duration_us"] / 1e6, data["errors"], data["p50_us"] / 1000, data["p99_us"] / 1000, data["non_2xx"])
