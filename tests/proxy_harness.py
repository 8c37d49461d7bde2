"""The real splitter process in-process, on real loopback sockets, no mocks.

`proxy_stack()` starts a stand-in Segment and RudderStack receiver (RudderStack validates the
credentials, so a wrong key is a 401 there), compiles a rules file pointing at them, and runs
`proxy.server.Server`, the lifecycle `splitter serve` runs (delivery, the ingress and admin ports on
127.0.0.1, the reloader, the ramp clock, the file watcher), in the test's event loop without signal
handlers; then it opens a client session. `Stack.post()` sends a call the way an SDK would (any of
Segment's auth forms, optionally gzipped) and returns (status, parsed JSON or None, response headers).
"""

from __future__ import annotations

import asyncio
import base64
import gzip as gzip_module
import ipaddress
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from loadtest.receivers import Receiver, RunningReceiver, start_receiver
from proxy.control.ramps import Clock, RampScheduler
from proxy.control.reload import Reloader
from proxy.control.state import ActiveRules
from proxy.delivery import Delivery
from proxy.engine import RuleSet, compile_rules
from proxy.ingress.cdn import DEFAULT_CDN_URL
from proxy.ingress.listener import IngressListener
from proxy.metrics import Metrics
from proxy.server import Server, addresses
from proxy.settings import DEFAULT_TRUSTED_PROXIES, IPNetwork, ServeSettings

WEB_KEY = "web-key-0123456789"
SERVER_KEY = "server-key-0123456789"
CREDENTIALS = {
    "web": {"segment": "seg-web-key-0123456789", "rudderstack": "rs-web-key-0123456789"},
    "server": {"segment": "seg-server-key-0123456789", "rudderstack": "rs-server-key-0123456789"},
}
RUDDER_KEYS = tuple(c["rudderstack"] for c in CREDENTIALS.values())
LOOPBACK: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in DEFAULT_TRUSTED_PROXIES)

# `Mirror *` tracks: Segment primary, RudderStack mirror. `Split *` tracks: 50/50 by cohort.
# Everything else (identify, page, unknown types, ...) goes to both as primaries, so a test sees
# both receivers' recordings as soon as the client has its answer.
DEFAULT_RULES = """\
version: 1
destinations:
  segment: {kind: segment, url: "${SEGMENT_URL}", timeout: 5, delivery: {FAST}}
  rudderstack: {kind: rudderstack, url: "${RUDDERSTACK_URL}", timeout: 5, delivery: {FAST}}
sources:
  - name: web
    write_keys: ["web-key-0123456789"]
    credentials: {segment: "seg-web-key-0123456789", rudderstack: "rs-web-key-0123456789"}
  - name: server
    write_keys: ["server-key-0123456789"]
    credentials: {segment: "seg-server-key-0123456789", rudderstack: "rs-server-key-0123456789"}
cohort: {key: [anonymousId, userId], salt: "t"}
rules:
  - name: mirrored
    when: {type: track, event: ["Mirror *"]}
    route: {to: [segment], mirror: [rudderstack]}
  - name: split
    when: {type: track, event: ["Split *"]}
    route: {split: {rudderstack: 50, segment: 50}}
  - name: everyone
    route: {to: [segment, rudderstack]}
"""

# Retries, breaker probes and batch lingering in milliseconds, so fault tests finish quickly.
FAST_DELIVERY = "retry_base: 0.02, retry_max: 0.2, breaker_failures: 3, breaker_cooldown: 0.1, flush_interval: 0.002"
DEFAULT_RULES = DEFAULT_RULES.replace("{FAST}", "{" + FAST_DELIVERY + "}")


def with_delivery(destination: str, options: str, rules: str = DEFAULT_RULES) -> str:
    """DEFAULT_RULES with more delivery options for one destination (e.g. `spool_quota_mb: 0.001`)."""
    marker = f'url: "${{{"SEGMENT_URL" if destination == "segment" else "RUDDERSTACK_URL"}}}", timeout: 5, delivery: {{'
    return rules.replace(marker, marker + options + ", ")


Auth = Literal["basic", "basic-nocolon", "body", "bearer"] | None


def basic(key: str, colon: bool = True) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode() if colon else key.encode()).decode()


class Stack:
    def __init__(self, segment: RunningReceiver, rudder: RunningReceiver, rules: RuleSet, proxy: Server, session: aiohttp.ClientSession) -> None:
        assert proxy.delivery is not None and proxy.listener is not None and proxy.active is not None
        assert proxy.installer is not None and proxy.reloader is not None and proxy.admin is not None
        self.segment_running = segment
        self.rudder_running = rudder
        self.rules = rules  # as compiled, before a ramp step due at start-up was applied
        self.proxy = proxy
        self.metrics: Metrics = proxy.metrics
        self.delivery: Delivery = proxy.delivery
        self.server: IngressListener = proxy.listener
        self.active: ActiveRules = proxy.active  # the ingress reads its rules from here
        self.ramps: RampScheduler = proxy.installer.ramps
        self.reloader: Reloader = proxy.reloader
        self.session = session
        self.url = self.server.url
        self.admin_url = f"http://{addresses(proxy.admin)[0]}"

    @property
    def segment(self) -> Receiver:
        return self.segment_running.receiver

    @property
    def rudder(self) -> Receiver:
        return self.rudder_running.receiver

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value, 0.0 when the series does not exist (yet)."""
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def wait_metric(self, name: str, at_least: float, timeout: float = 3.0, **labels: str) -> float:
        """Poll a metric fed by background work until it reaches `at_least`."""
        deadline = time.monotonic() + timeout
        while (value := self.metric(name, **labels)) < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}{labels} = {value}, expected >= {at_least}")
            await asyncio.sleep(0.01)
        return value

    async def request(self, method: str, path: str, *, data: bytes | None = None,
                      headers: Mapping[str, str] | None = None) -> tuple[int, Any, CIMultiDictProxy[str]]:
        async with self.session.request(method, self.url + path, data=data, headers=dict(headers or {})) as response:
            raw = await response.read()
            try:
                parsed = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                parsed = raw.decode("utf-8", "replace")
            return response.status, parsed, response.headers

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until every destination's spool is empty: what was accepted has been delivered."""
        deadline = time.monotonic() + timeout
        names = list(self.rules.destinations)
        while any(self.metric("splitter_spool_records", destination=name) > 0 for name in names):
            if time.monotonic() > deadline:
                raise AssertionError(f"spools not empty after {timeout} s: {[self.metric('splitter_spool_records', destination=n) for n in names]}")
            await asyncio.sleep(0.005)

    async def post(self, path: str, body: Any, *, key: str | None = WEB_KEY, auth: Auth = "basic", gzip: bool = False,
                   headers: Mapping[str, str] | None = None, content_type: str = "application/json",
                   settle: bool = True) -> tuple[int, Any, CIMultiDictProxy[str]]:
        """POST a call. `body` is JSON-encoded unless it is bytes; `auth` picks how `key` travels:
        Basic `key:`, Basic `key` (no colon), top-level `writeKey` in the body, or `Bearer xyz`
        plus `writeKey` in the body. None sends no key at all. With `settle`, a 200 is followed by
        a wait until the spools are empty, so the receivers hold what the call delivered."""
        sent_headers: dict[str, str] = {"Content-Type": content_type}
        if auth in ("body", "bearer") and isinstance(body, dict) and key is not None:
            body = {**body, "writeKey": key}
        if auth == "basic" and key is not None:
            sent_headers["Authorization"] = basic(key)
        elif auth == "basic-nocolon" and key is not None:
            sent_headers["Authorization"] = basic(key, colon=False)
        elif auth == "bearer":
            sent_headers["Authorization"] = "Bearer xyz"
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        if gzip:
            data = gzip_module.compress(data)
            sent_headers["Content-Encoding"] = "gzip"
        sent_headers.update(headers or {})
        answer = await self.request("POST", path, data=data, headers=sent_headers)
        if settle and answer[0] == 200:
            await self.settle()
        return answer


@asynccontextmanager
async def proxy_stack(
    rules_text: str = DEFAULT_RULES,
    *,
    trusted_proxies: tuple[IPNetwork, ...] = LOOPBACK,
    cors_origins: tuple[str, ...] = ("*",),
    max_in_flight: int = 2000,
    region: str | None = None,
    drain_timeout: float = 0.5,
    cdn_url: str = DEFAULT_CDN_URL,
    public_url: str | None = None,
    cdn_cache_seconds: float = 300.0,
    keepalive_timeout: float = 75.0,
    clock: Clock | None = None,
    durability: Literal["fsync", "interval"] = "fsync",
) -> AsyncIterator[Stack]:
    """The default CDN is never contacted unless a test GETs a CDN route. `clock`: the ramp clock
    (tests move a manual one); `drain_timeout`: the time the stack has to stop, as `--drain-timeout`;
    `durability`: as `--durability` (`interval` with its default 0.5 s)."""
    segment = await start_receiver("segment", record=True)
    rudder = await start_receiver("rudderstack", valid_keys=RUDDER_KEYS, record=True)
    proxy: Server | None = None
    session: aiohttp.ClientSession | None = None
    scratch: Path | None = None
    try:
        env = {"SEGMENT_URL": segment.url, "RUDDERSTACK_URL": rudder.url}
        rules = compile_rules(rules_text, env=env)
        scratch = Path(tempfile.mkdtemp(prefix="splitter-test-"))
        (scratch / "rules.yaml").write_text(rules_text)  # what a reload reads (the watcher finds it unchanged)
        settings = ServeSettings(
            config=str(scratch / "rules.yaml"), listen=("127.0.0.1", 0), admin=("127.0.0.1", 0), region=region, drain_timeout=drain_timeout,
            trusted_proxies=trusted_proxies, cors_origins=cors_origins, max_in_flight=max_in_flight, spool_dir=str(scratch / "spool"),
            dead_letter_dir=str(scratch / "dead-letter"), state_dir=str(scratch / "state"), cdn_url=cdn_url, public_url=public_url, cdn_cache_seconds=cdn_cache_seconds,
            durability=durability,
        )
        proxy = Server(settings, env, rules=rules, clock=clock, handle_signals=False, keepalive_timeout=keepalive_timeout,
                       owns_interpreter=False)
        await proxy.startup()
        session = aiohttp.ClientSession(auto_decompress=False)
        yield Stack(segment, rudder, rules, proxy, session)
    finally:
        if session is not None:
            await session.close()
        if proxy is not None:
            await proxy.shutdown()
        segment.receiver.faults.delay = 0  # requests already sleeping are cut by the runner's short shutdown
        rudder.receiver.faults.delay = 0
        await rudder.close()
        await segment.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)  # the rules file, spool and dead letters of this stack
