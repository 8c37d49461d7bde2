"""Compile `dedup.store` and `dedup.store_timeout`: the Redis server a tier's processes share their
de-duplication windows on (proxy/delivery/dedup_store.py connects to it; nothing here does I/O).

The URL may carry a password (`redis://:PASSWORD@host:6379/0`, usually from the environment:
`store: "${SPLITTER_DEDUP_STORE}"`), so it is shown only through `shown_store_url()`: in problems,
in `DedupSettings`' repr, in logs and in /admin/config. An empty value (`"${SPLITTER_DEDUP_STORE:-}"`
with the variable unset) means no store: one rules file can serve a shared tier and a sidecar.
"""

from __future__ import annotations

from decimal import Decimal
from urllib.parse import urlsplit

import yaml

from proxy.engine.yaml_reader import NodeReader

STORE_SCHEMES = ("redis", "rediss")
DEFAULT_STORE_TIMEOUT = 0.05  # seconds a request waits for the store before it de-duplicates in its own process alone
MAX_STORE_TIMEOUT = 5.0


def store_url(reader: NodeReader, node: yaml.Node) -> str | None:
    """redis://[[user]:password@]host[:port][/db] or rediss://...; None for an empty value or a problem."""
    url = reader.string(node, "dedup.store", allow_empty=True)
    if url is None or not url.strip():
        return None
    url = url.strip()
    shown = shown_store_url(url)
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in STORE_SCHEMES or not parts.hostname or port == -1:
        problem = f"must be a redis:// or rediss:// URL with a host (redis://host:6379/0), not {shown!r}"
    elif parts.path.strip("/") and not parts.path.strip("/").isdigit():
        problem = f"must name the database as a number after the host (redis://host:6379/0), not {shown!r}"
    elif parts.query or parts.fragment:
        problem = f"must not carry a query or fragment ({shown!r}): splitter sets the store's timeouts itself"
    else:
        return url
    reader.problem(node, "dedup.store", problem)
    return None


def store_timeout(reader: NodeReader, node: yaml.Node) -> float | None:
    """`50ms`, `0.2s` or plain seconds, more than 0 and at most 5 s."""
    seconds = reader.duration(node, "dedup.store_timeout")
    if seconds is None:
        return None
    if not 0 < seconds <= Decimal(int(MAX_STORE_TIMEOUT)):
        reader.problem(node, "dedup.store_timeout", f"must be more than 0 and at most 5s, not {reader.scalar(node, 'dedup.store_timeout')!r}")
        return None
    return float(seconds)


def shown_store_url(url: str) -> str:
    """The URL with its userinfo (`user:password@`, or `:password@`: all before the last `@`) shown as
    `****@`, and a query or fragment (redis-py reads `?password=` too; refused here) as `?****`."""
    cut = min((at for at in (url.find("?"), url.find("#")) if at >= 0), default=-1)
    if cut >= 0:
        url = f"{url[:cut]}{url[cut]}****"
    scheme, sep, rest = url.partition("://")
    if not sep:  # not a URL at all (refused): still nothing before an @ is shown
        scheme, rest = "", url
    if "@" in rest:  # everything before the last @: a password with an unencoded / or @ is masked whole too
        return f"{scheme}{sep}****@{rest.rpartition('@')[2]}"
    return url
