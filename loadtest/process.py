"""Run `splitter serve` as a real child process and learn its addresses from its `started` line.

Shared by `make demo`, the lifecycle tests and the benchmarks, so all three exercise the proxy the
way an operator runs it: its own process, its own signals, ports chosen by the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson


@dataclass
class SplitterProcess:
    process: asyncio.subprocess.Process
    ingress: str  # http://127.0.0.1:PORT
    admin: str
    log: list[dict[str, object]] = field(default_factory=list)  # every JSON log line, as it arrives
    _reader: asyncio.Task[None] | None = None
    _terminated: bool = False
    scratch: Path | None = None  # the spool, dead letters and state launch_splitter made up; removed once stopped

    def events(self, name: str) -> list[dict[str, object]]:
        return [record for record in self.log if record.get("event") == name]

    async def wait_for_log(self, name: str, timeout: float = 10.0) -> dict[str, object]:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            found = self.events(name)
            if found:
                return found[-1]
            await asyncio.sleep(0.02)
        raise TimeoutError(f"no {name!r} log line within {timeout} s")

    def signal(self, sig: signal.Signals) -> None:
        self._terminated = self._terminated or sig in (signal.SIGTERM, signal.SIGINT)
        self.process.send_signal(sig)

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in time (the test then fails on the code)."""
        if self.process.returncode is None and not self._terminated:
            self.signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 2)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        return code


async def _collect(stream: asyncio.StreamReader, log: list[dict[str, object]]) -> None:
    while line := await stream.readline():
        try:
            log.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            log.append({"event": "unparsed", "text": line.decode("utf-8", "replace")})


async def launch_splitter(rules: str, env: Mapping[str, str], extra: Sequence[str] = (), timeout: float = 20.0,
                          prefix: Sequence[str] = ()) -> SplitterProcess:
    """Start `splitter serve` on loopback with kernel-chosen ports; `prefix` e.g. ("taskset", "-c", "1").

    Without `--spool-dir` in `extra`, the spool, dead letters and state go to a fresh temporary
    directory. Without `--state-dir`, the state (the last good rules) goes beside the spool, in
    `<spool-dir>-state`: one per spool, kept across a restart on the same spool, as on a volume.
    """
    scratch: Path | None = None
    if "--spool-dir" not in extra:
        scratch = Path(tempfile.mkdtemp(prefix="splitter-"))
        extra = [*extra, "--spool-dir", str(scratch / "spool"), "--dead-letter-dir", str(scratch / "dead-letter")]
    if "--state-dir" not in extra:
        spool = list(extra)[list(extra).index("--spool-dir") + 1]
        extra = [*extra, "--state-dir", f"{spool}-state"]
    process = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-m", "proxy", "serve", "--config", rules, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", *extra,
        env=dict(env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    log: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            line = await asyncio.wait_for(process.stdout.readline(), max(0.1, deadline - loop.time()))
        except TimeoutError:
            break
        if not line:
            error = (await process.stderr.read()).decode("utf-8", "replace")
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            raise RuntimeError(f"splitter exited during start-up with code {await process.wait()}: {log[-3:]} {error}")
        record = orjson.loads(line)
        log.append(record)
        if record.get("event") == "started":
            listen, admin = record["listen"], record["admin"]
            running = SplitterProcess(process, f"http://{listen[0]}", f"http://{admin[0]}", log, scratch=scratch)  # type: ignore[index]
            running._reader = asyncio.ensure_future(_collect(process.stdout, log))
            return running
    process.kill()
    await process.wait()
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    raise RuntimeError(f"splitter did not start within {timeout} s: {log[-3:]}")
