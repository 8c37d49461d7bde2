"""Reading a running splitter's admin port from a command (`catalog`, `parity`): one GET, one answer.

The address an operator gives is fetched with SPLITTER_ADMIN_TOKEN as the bearer token when set;
what goes wrong is raised as `AdminReadError` with a message naming the address without its
credentials, for the command to print and exit on.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import Any

import orjson


class AdminReadError(Exception):
    """The admin port could not be read, or did not answer JSON; the message is ready to print."""


def shown(url: str) -> str:
    """`url` as a message may show it: without user, password or query."""
    # Imported here, not at the top: proxy.delivery imports prometheus_client, which must not be
    # imported before `serve` has dropped an inherited PROMETHEUS_MULTIPROC_DIR (every command shares this package).
    from proxy.delivery.upstream import public_url

    return public_url(url.rstrip("/"))


def fetch_admin_json(base: str, path: str, timeout: float, query: str = "") -> Any:
    """GET `base` + `path` (+ `?query`) and its parsed JSON body."""
    base = base.rstrip("/")
    request = urllib.request.Request(base + path + (f"?{query}" if query else ""), headers={"Accept": "application/json"})
    token = os.environ.get("SPLITTER_ADMIN_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # an operator's own admin URL
            data = response.read()
    except urllib.error.HTTPError as exc:
        hint = " (set SPLITTER_ADMIN_TOKEN to the admin token)" if exc.code == 401 else ""
        raise AdminReadError(f"{shown(base)}: the admin port answered {exc.code}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise AdminReadError(f"{shown(base)}: cannot read {path}: {getattr(exc, 'reason', exc)}") from None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise AdminReadError(f"{shown(base)}: {path} did not answer JSON") from None
