"""What de-duplication costs: bench_delivery's batch load with `dedup` off, on in memory, and shared on Redis.

One bounded run per mode, loopback only: the proxy (pinned to core 1) on `rules/bench.yaml` plus a
`dedup:` line, count-only receivers, wrk and (for the Redis mode) a `redis-server` of its own, all on
core 0, batches of 50 events (~30 KB) fanning out to 65 (destination, messageId) pairs. wrk rewrites
every messageId per request, so no event is a duplicate: what is measured is the price of checking
and remembering, not of dropping. Per mode: requests/s, latency, splitter's CPU per request and
per event, and with Redis its round trips (socket reads) and commands per request and its own CPU.
Run: `python -m loadtest.bench_dedup [--seconds 5] [--modes off,memory,redis] [--rounds 1] [--connections 32]`;
fewer connections (4) measure the cost per request below saturation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from loadtest.bench_delivery import RULES, metric_total, prepare_load
from loadtest.harness import LOAD_CORE, PROXY_CORE, WrkResult, cpu_seconds, pin, pinning_available
from loadtest.payloads import BATCH, RUDDER_SHARE
from loadtest.process import launch_splitter

CONNECTIONS = 32
DEDUP = {
    "off": "dedup: off\n",
    "memory": "dedup: {window: 10m}\n",
    "redis": 'dedup: {window: 10m, store: "redis://127.0.0.1:%(port)d/0"}\n',
}
# bench.lua of loadtest/harness.py, with every messageId of a body made unique per request (a run tag and a counter).
LUA = """
local bodies = {}
local n = 0
local index = 0
local sent = 0
for line in io.lines("%(bodies)s") do n = n + 1; bodies[n] = line end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "%(auth)s"
request = function()
  index = index %% n + 1
  sent = sent + 1
  local body = bodies[index]:gsub('"messageId":"', '"messageId":"%(tag)s' .. sent .. '-')
  return wrk.format(nil, "/v1/batch", nil, body)
end
done = function(summary, latency, requests)
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "errors": %%d, "non_2xx": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(url: str, bodies: list[bytes], auth: str, seconds: float, connections: int = CONNECTIONS) -> WrkResult:
    scratch = Path(tempfile.mkdtemp(prefix="splitter-wrk-"))
    try:
        (scratch / "bodies.txt").write_bytes(b"\n".join(bodies) + b"\n")
        script = scratch / "bench.lua"
        script.write_text(LUA % {"bodies": scratch / "bodies.txt", "auth": auth, "tag": uuid.uuid4().hex[:8]})
        command = [*pin(LOAD_CORE), "wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds:g}s", "--latency", "-s", str(script), url]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    line = next((line for line in finished.stdout.splitlines() if line.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result (exit {finished.returncode}): {finished.stdout[-500:]} {finished.stderr[-500:]}")
    data = json.loads(line[len("WRKJSON "):])
    return WrkResult(data["requests"], data["duration_us"] / 1e6, data["errors"], data["p50_us"] / 1000, data["p99_us"] / 1000, data["non_2xx"])


class Redis:
    """A throwaway redis-server on a free loopback port, on the load core, without persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"]))
        if binary is None:
            raise RuntimeError("needs redis-server (Debian package redis-server)")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.directory = tempfile.mkdtemp(prefix="splitter-redis-")
        self.process = subprocess.Popen([*pin(LOAD_CORE), binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", self.directory, "--loglevel", "warning"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def ready(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                async with aioredis.Redis(port=self.port) as client:
                    await client.ping()
                return
            except (OSError, aioredis.RedisError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def stats(self) -> dict[str, Any]:
        async with aioredis.Redis(port=self.port) as client:
            info = await client.info("stats")
            memory = await client.info("memory")
            keys = await client.dbsize()
        return {"reads": int(info["total_reads_processed"]), "commands": int(info["total_commands_processed"]),
                "used_memory": int(memory["used_memory"]), "keys": int(keys)}

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


async def store_errors(admin: str) -> dict[str, int]:
    """splitter_dedup_store_errors_total by reason (requests that went without the store; warm-up included)."""
    async with aiohttp.ClientSession() as client, client.get(admin + "/metrics") as response:
        text = await response.text()
    return {reason: int(float(value)) for reason, value in re.findall(r'^splitter_dedup_store_errors_total\{reason="(\w+)"\} (\S+)$', text, re.M)}


async def measure(mode: str, seconds: float, redis: Redis | None, connections: int = CONNECTIONS) -> dict[str, Any]:
    receivers, env, _, bodies, auth = prepare_load()
    scratch = Path(tempfile.mkdtemp(prefix="splitter-bench-dedup-"))
    rules = scratch / "rules.yaml"
    rules.write_text(RULES.read_text() + DEDUP[mode] % {"port": redis.port if redis else 0})
    splitter = await launch_splitter(str(rules), env, prefix=pin(PROXY_CORE))
    try:
        run_wrk(splitter.ingress, bodies, auth, seconds=2)  # warm-up (and Redis connections)
        before_cpu = cpu_seconds([splitter.process.pid])
        before_redis = await redis.stats() if redis else None
        redis_cpu = cpu_seconds([redis.process.pid]) if redis else 0.0
        run = run_wrk(splitter.ingress, bodies, auth, seconds=seconds, connections=connections)
        cpu = cpu_seconds([splitter.process.pid]) - before_cpu
        result: dict[str, Any] = {
            "requests_per_s": round(run.requests / run.seconds), "events_per_s": round(run.requests * BATCH / run.seconds),
            "cpu_us_per_request": round(1e6 * cpu / run.requests, 1), "cpu_us_per_event": round(1e6 * cpu / run.requests / BATCH, 2),
            "p50_ms": run.p50_ms, "p99_ms": run.p99_ms, "non_200": run.non_2xx + run.errors,
            "dedup_hits": await metric_total(splitter.admin, "splitter_dedup_hits_total"),
        }
        if redis is not None and before_redis is not None:
            after = await redis.stats()
            result.update({
                # (stats() itself adds a few reads and commands: noise next to thousands of requests)
                "redis_reads_per_request": round((after["reads"] - before_redis["reads"]) / run.requests, 3),
                "redis_commands_per_request": round((after["commands"] - before_redis["commands"]) / run.requests, 1),
                "redis_cpu_us_per_request": round(1e6 * (cpu_seconds([redis.process.pid]) - redis_cpu) / run.requests, 1),
                "redis_bytes_per_key": round(after["used_memory"] / max(after["keys"], 1)),
                "store_errors": await store_errors(splitter.admin),
            })
        return result
    finally:
        await splitter.stop()
        receivers.stop()
        shutil.rmtree(scratch, ignore_errors=True)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--modes", default="off,memory,redis")
    parser.add_argument("--rounds", type=int, default=1, help="run the modes in turn this many times (the table shows each run)")
    parser.add_argument("--connections", type=int, default=CONNECTIONS, help="wrk's connections (closed loop): 32 saturate the proxy")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    modes = args.modes.split(",")
    redis = Redis() if "redis" in modes else None
    runs: list[dict[str, Any]] = []
    try:
        if redis is not None:
            await redis.ready()
        for _ in range(args.rounds):
            for mode in modes:
                runs.append({"mode": mode, **await measure(mode, args.seconds, redis if mode == "redis" else None, args.connections)})
    finally:
        if redis is not None:
            redis.stop()
    pinned = f"proxy on core {PROXY_CORE}; wrk, receivers and redis-server on core {LOAD_CORE}" if pinning_available() else "not pinned"
    print(f"dedup benchmark: batches of {BATCH} events ({BATCH} + {RUDDER_SHARE} destination pairs), {args.seconds:g} s per run, "
          f"{args.connections} connections, {pinned}, git {_revision()}")
    print(f"{'mode':<8}{'req/s':>7}{'events/s':>10}{'CPU µs/req':>12}{'µs/event':>10}{'p50 ms':>8}{'p99 ms':>8}{'non-200':>9}"
          f"{'redis reads/req':>17}{'cmds/req':>10}{'redis µs/req':>14}  requests without the store")
    for run in runs:
        redis_columns = (f"{run['redis_reads_per_request']:>17}{run['redis_commands_per_request']:>10}{run['redis_cpu_us_per_request']:>14}"
                         f"  {run['store_errors']}" if "redis_reads_per_request" in run else "")
        print(f"{run['mode']:<8}{run['requests_per_s']:>7}{run['events_per_s']:>10}{run['cpu_us_per_request']:>12}{run['cpu_us_per_event']:>10}"
              f"{run['p50_ms']:>8.1f}{run['p99_ms']:>8.1f}{run['non_200']:>9}{redis_columns}")
    print(json.dumps(runs))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    return 0 if all(run["non_200"] == 0 and run["dedup_hits"] == 0 for run in runs) else 1


def _revision() -> str:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__), check=False)
    return found.stdout.strip() or "?"


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
