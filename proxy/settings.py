"""`splitter serve` settings: parsed and checked once, frozen, then passed to everything else.

Each default is written once, on `ServeSettings`: the CLI's flags take theirs from `flag_default()`,
which also shows them in `--help`. Every flag also reads a `SPLITTER_*` environment variable (click's
`auto_envvar_prefix`, set on the `serve` command); `from_flags()` parses what the flags give, and the
checks that involve several settings at once (a public admin port needs a token) live here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_TRUSTED_PROXIES = ("127.0.0.0/8", "::1")
LOG_LEVELS = ("debug", "info", "warning", "error")
DURABILITY_MODES = ("fsync", "interval")  # docs/configuration.md, Durability modes
# A name that stands in a store key as it is (the replica id; a destination's or a process's name in Redis keys).
KEY_SAFE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
KEY_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_.\-]")  # what a name made to fit KEY_SAFE has replaced


class SettingsError(ValueError):
    """A setting that cannot work; the message names the flag and the environment variable."""


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (all interfaces)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9090")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ServeSettings:
    config: str
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    admin: tuple[str, int] = ("127.0.0.1", 9090)
    region: str | None = None
    admin_token: str | None = None
    drain_timeout: float = 25.0
    reload_poll_interval: float = 1.0
    trusted_proxies: tuple[IPNetwork, ...] = field(default_factory=lambda: tuple(ipaddress.ip_network(n) for n in DEFAULT_TRUSTED_PROXIES))
    cors_origins: tuple[str, ...] = ("*",)
    spool_dir: str = "var/spool"  # one subdirectory per destination; must survive restarts (a volume)
    dead_letter_dir: str = "var/dead-letter"
    state_dir: str = "var/state"  # the last good rules (proxy/control/last_good.py); must survive restarts, like the spool
    max_in_flight: int = 2000  # client requests handled at once; past it, 429 with Retry-After
    header_timeout: float = 10.0  # seconds from a request's first byte to the end of its headers; past it, 408 and close
    body_timeout: float = 30.0  # seconds from a request's headers to the end of its body; past it, 408 and the slot is free
    reuse_port: bool = False
    workers: int = 1  # above 1, a supervisor runs this many worker processes sharing the ingress port (proxy/process/supervisor.py)
    process_name: str | None = None  # `worker-<i>` for a worker of --workers N (set by its supervisor): names its files in --state-dir
    log_level: str = "info"
    cdn_url: str = "https://cdn.segment.com"  # analytics.js settings and bundles are fetched from here
    public_url: str | None = None  # splitter's address as browsers see it; written into the settings' apiHost
    cdn_cache_seconds: float = 300.0  # 0 disables the CDN cache
    durability: str = "fsync"  # `fsync`: the 200 waits for the fsync; `interval`: for the write, fsynced every --sync-interval
    sync_interval: float = 0.5  # seconds between fsyncs with --durability interval
    geoip_db: str | None = None  # a MaxMind DB file for `country` conditions (proxy/geoip.py); None: CDN headers and the event's location only
    replica_id: str | None = None  # this replica in the tier view (proxy/observe/tier.py); None: the host's name
    tier_ttl: float = 86400.0  # seconds a process's snapshots stay in the tier view's store after its last publish

    @property
    def replica(self) -> str:
        """`replica_id`, or the host's name made fit for a key (a pod's name in Kubernetes)."""
        return self.replica_id or host_replica_id()

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], *, admin_token: str | None) -> ServeSettings:
        """Settings from `splitter serve`'s flags, as written on the command line or in SPLITTER_* variables.

        The admin token is never a flag (a command line is visible to every user of the machine):
        the CLI passes SPLITTER_ADMIN_TOKEN here itself."""
        public_url = flags["public_url"]
        return cls(
            config=flags["config"],
            listen=parse_address(flags["listen"], "--listen"),
            admin=parse_address(flags["admin"], "--admin"),
            region=flags["region"],
            admin_token=admin_token or None,
            drain_timeout=flags["drain_timeout"],
            reload_poll_interval=flags["reload_interval"],
            trusted_proxies=parse_networks(flags["trusted_proxies"]),
            cors_origins=tuple(o.strip() for o in flags["cors_origins"].split(",") if o.strip()),
            max_in_flight=flags["max_in_flight"],
            header_timeout=flags["header_timeout"],
            body_timeout=flags["body_timeout"],
            spool_dir=flags["spool_dir"],
            dead_letter_dir=flags["dead_letter_dir"],
            state_dir=flags["state_dir"],
            cdn_url=flags["cdn_url"].rstrip("/"),
            public_url=public_url.rstrip("/") if public_url else None,
            cdn_cache_seconds=flags["cdn_cache_seconds"],
            log_level=flags["log_level"],
            workers=flags["workers"],
            geoip_db=flags["geoip_db"] or None,
            durability=flags["durability"],
            sync_interval=flags["sync_interval"],
            replica_id=flags["replica_id"] or None,
            tier_ttl=flags["tier_ttl"],
        )

    def __post_init__(self) -> None:
        admin_host = self.admin[0]
        if not is_loopback(admin_host) and not self.admin_token:
            raise SettingsError(
                f"--admin {admin_host}:{self.admin[1]} is not a loopback address: set SPLITTER_ADMIN_TOKEN "
                "so that /admin/* requires a bearer token (or bind the admin port to 127.0.0.1)"
            )
        if self.drain_timeout < 0:
            raise SettingsError("--drain-timeout must be 0 or more seconds")
        check_http_url(self.cdn_url, "--cdn-url (SPLITTER_CDN_URL)")
        if self.public_url is not None:
            check_http_url(self.public_url, "--public-url (SPLITTER_PUBLIC_URL)")
        if self.workers < 1:
            raise SettingsError("--workers (SPLITTER_WORKERS) must be 1 or more")
        if not self.header_timeout > 0:
            raise SettingsError("--header-timeout (SPLITTER_HEADER_TIMEOUT) must be more than 0 seconds")
        if not self.body_timeout > 0:
            raise SettingsError("--body-timeout (SPLITTER_BODY_TIMEOUT) must be more than 0 seconds")
        if self.durability not in DURABILITY_MODES:
            raise SettingsError(f"--durability (SPLITTER_DURABILITY) {self.durability!r}: expected one of {', '.join(DURABILITY_MODES)}")
        if not self.sync_interval > 0:
            raise SettingsError("--sync-interval (SPLITTER_SYNC_INTERVAL) must be more than 0 seconds")
        if self.cdn_cache_seconds < 0:
            raise SettingsError("--cdn-cache-seconds (SPLITTER_CDN_CACHE_SECONDS) must be 0 or more seconds")
        if self.replica_id is not None and not KEY_SAFE.fullmatch(self.replica_id):
            raise SettingsError(f"--replica-id (SPLITTER_REPLICA_ID) {self.replica_id!r}: expected 1 to 64 letters, digits, '_', '.' or '-'")
        if not self.tier_ttl >= 1:
            raise SettingsError("--tier-ttl (SPLITTER_TIER_TTL) must be 1 second or more")


def host_replica_id() -> str:
    """The host's name when it fits a replica id (it does in Kubernetes and on most hosts), else made to fit."""
    name = socket.gethostname() or "localhost"
    if KEY_SAFE.fullmatch(name):
        return name
    return KEY_UNSAFE_CHAR.sub("-", name)[:64] or "localhost"


def flag_default(name: str) -> str | int | float | None:
    """The default of `ServeSettings.<name>` written as its flag is (`0.0.0.0:8080`, `127.0.0.0/8,::1`)."""
    spec = ServeSettings.__dataclass_fields__[name]
    value = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return f"{value[0]}:{value[1]}"
    if isinstance(value, tuple):
        return ",".join(_network_text(item) if isinstance(item, IPNetwork) else str(item) for item in value)
    assert value is None or isinstance(value, str | int | float)
    return value


def _network_text(network: IPNetwork) -> str:
    """`::1` for a single address, `127.0.0.0/8` for a range, as an operator writes them."""
    return str(network.network_address) if network.num_addresses == 1 else str(network)


def check_http_url(text: str, flag: str) -> None:
    """An absolute http(s) URL with a host, no query or fragment."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise SettingsError(f"{flag} {text!r}: expected an http(s) URL such as https://cdn.segment.com")


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """A comma-separated list of addresses or CIDR ranges, e.g. `10.0.0.0/8,127.0.0.1`."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise SettingsError(f"--trusted-proxies: {part!r} is not an IP address or CIDR range") from None
    return tuple(networks)
