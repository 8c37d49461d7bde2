"""`splitter history`: the change history (proxy/control/history.py) of running splitters or of a state directory.

A team matching a data anomaly to the change that caused it reads this: when each rule set took
effect, what triggered it, and what it changed. The entries come from

- `--from URL`, an admin address (`GET URL/admin/history`, with `SPLITTER_ADMIN_TOKEN` as the
  bearer token when it is set), repeatable: each replica keeps its own history, and several are
  merged newest first, each entry naming its replica (the URL without credentials);
- or `--state-dir DIR`, the file itself (a stopped proxy, a copy of its volume).

The default output is an aligned table, one change a line; `--json` prints `{"count", "entries"}`
as `/admin/history` answers. A replica that cannot be read is reported on stderr and the command
exits 2 after printing what the others gave.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import click
import orjson

from proxy.exits import BAD_INPUT
from proxy.observe.history_file import FILE, ROTATED, HistoryFile

TIMEOUT = 10.0  # seconds for one replica's answer
MAX_ERROR_SHOWN = 100  # characters of a refusal's first reason in the table


def public_url(url: str) -> str:
    """`url` as /admin/config shows one: no `user:pass@`, no query. Imported here, not at the top:
    the delivery layer imports prometheus_client, which `serve` must not have imported before it starts."""
    from proxy.delivery.upstream import public_url as shown

    return shown(url)


class Unavailable(Exception):
    """A history that could not be read; the message names where (credentials removed) and why."""


def admin_base(url: str) -> str:
    """`URL` as given, with http:// when it names no scheme (`127.0.0.1:9090`)."""
    return url if "://" in url else f"http://{url}"


def fetch(url: str, limit: int, token: str | None) -> list[dict[str, Any]]:
    """The newest `limit` entries of the splitter whose admin address is `url`."""
    base = admin_base(url)
    if not base.startswith(("http://", "https://")):
        raise Unavailable(f"{public_url(base)}: not an http(s) admin address")
    request = urllib.request.Request(f"{base.rstrip('/')}/admin/history?limit={limit}", headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            body = orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        hint = ": set SPLITTER_ADMIN_TOKEN to the admin token" if exc.code == 401 else ""
        raise Unavailable(f"{public_url(base)}: answered {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise Unavailable(f"{public_url(base)}: cannot be reached: {reason}") from None
    except orjson.JSONDecodeError:
        raise Unavailable(f"{public_url(base)}: did not answer with JSON (is it splitter's admin port?)") from None
    entries = body.get("entries") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        raise Unavailable(f"{public_url(base)}: the answer has no entries (is it splitter's admin port?)")
    return [entry for entry in entries if isinstance(entry, dict)]


def read_state(directory: str, limit: int) -> list[dict[str, Any]]:
    history = HistoryFile(directory)
    if not history.path.exists() and not history.rotated.exists():
        raise Unavailable(f"{directory}: no change history here ({FILE} or {ROTATED}); is it serve's --state-dir?")
    try:
        return history.read(limit)
    except OSError as exc:
        raise Unavailable(f"{history.path}: cannot read: {exc.strerror or exc}") from None


def merged(replicas: Mapping[str, Sequence[Mapping[str, Any]]], limit: int) -> list[dict[str, Any]]:
    """Every replica's entries, newest first, each naming its replica when there are several."""
    entries = [{**entry, "replica": name} if len(replicas) > 1 else dict(entry) for name, found in replicas.items() for entry in found]
    entries.sort(key=lambda entry: str(entry.get("time", "")), reverse=True)
    return entries[:limit]


def table_lines(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """One aligned line per entry, the summary of its changes last."""
    replicas = any("replica" in entry for entry in entries)
    header = ["TIME", "TRIGGER", "STATUS", "SHA256", *(["REPLICA"] if replicas else []), "CHANGES"]
    rows = [[str(entry.get("time", "")), str(entry.get("trigger", "")), str(entry.get("status", "")), str(entry.get("sha256") or "-")[:12],
             *([str(entry.get("replica", ""))] if replicas else []), summary(entry)] for entry in entries]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    return ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[-1]]) for row in [header, *rows]]


def summary(entry: Mapping[str, Any]) -> str:
    """What an entry changed, in a few words."""
    parts: list[str] = []
    if entry.get("serving") == "last_good":
        parts.append(f"serving the last good rules {str(entry.get('active_sha256', ''))[:12]}")
    errors = entry.get("errors") or []
    if errors:
        first = str(errors[0])
        first = first if len(first) <= MAX_ERROR_SHOWN else first[:MAX_ERROR_SHOWN] + "…"
        parts.append(first + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
    changes = entry.get("changes")
    if isinstance(changes, dict):
        parts.extend(change_parts(changes) or ["no change to rules, splits or destinations"])
    elif entry.get("trigger") == "start" and entry.get("status") == "success":
        parts.append("the same rules as the last good ones" if entry.get("previous_sha256") else "no last good rules before")
    return "; ".join(parts) or "-"


def change_parts(changes: Mapping[str, Any]) -> list[str]:
    parts = [_split_words(split) for split in changes.get("splits", [])]
    rules = changes.get("rules", {})
    for kind in ("added", "removed"):
        if rules.get(kind):
            parts.append(f"rules {kind}: {', '.join(rules[kind])}")
    edited = [f"{edit['rule']} ({', '.join(edit['what'])})" for edit in rules.get("edited", []) if set(edit["what"]) - {"split"}]  # splits: above
    if edited:
        parts.append(f"edited: {'; '.join(edited)}")
    destinations = changes.get("destinations", {})
    marks = [f"{sign}{name}" for sign, kind in (("+", "added"), ("-", "removed"), ("~", "edited")) for name in destinations.get(kind, [])]
    if marks:
        parts.append(f"destinations {' '.join(marks)}")
    for reshuffle in changes.get("reshuffles", []):
        parts.append(f"reshuffle consented: {reshuffle['rule']} ({reshuffle['reason']})")
    if changes.get("rollbacks"):
        parts.append(f"{len(changes['rollbacks'])} rollback(s)")
    return parts


def _split_words(split: Mapping[str, Any]) -> str:
    before, after = split.get("before"), split.get("after")
    if before is None or after is None:
        shown = after if after is not None else before
        return f"{split['rule']}: split {'added' if after is not None else 'removed'} {_percents(shown or {})}"
    arms = "/".join(after)
    moved = [f"{split[key]} buckets {word}" for key, word in (("buckets_forward", "forward"), ("buckets_back", "back")) if split.get(key)]
    text = f"{split['rule']}: {arms} {_numbers(before)} -> {_numbers(after)}"
    return text + (f" ({', '.join(moved)})" if moved else "")


def _percents(percents: Mapping[str, Any]) -> str:
    return f"{'/'.join(percents)} {_numbers(percents)}"


def _numbers(percents: Mapping[str, Any]) -> str:
    return "/".join(f"{float(value):g}" for value in percents.values())


@click.command()
@click.option("--from", "urls", multiple=True, metavar="URL",
              help="A splitter's admin address (e.g. http://127.0.0.1:9090); repeat for every replica. SPLITTER_ADMIN_TOKEN is sent as the bearer token.")
@click.option("--state-dir", "state_dir", metavar="DIR", default=None, help="Read the history file in serve's --state-dir instead.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="The newest entries to show.")
@click.option("--json", "as_json", is_flag=True, help='Print {"count", "entries"} as GET /admin/history answers.')
def history(urls: tuple[str, ...], state_dir: str | None, limit: int, as_json: bool) -> None:
    """Show when each rule set took effect (start, reload, ramp step), each refused or failed reload, and what changed."""
    if bool(urls) == (state_dir is not None):
        click.echo("splitter: give --from URL (once per replica) or --state-dir DIR", err=True)
        sys.exit(BAD_INPUT)
    found: dict[str, list[dict[str, Any]]] = {}
    failed = False
    token = os.environ.get("SPLITTER_ADMIN_TOKEN") or None
    for source in urls or (str(state_dir),):
        try:
            found[public_url(admin_base(source)) if urls else source] = fetch(source, limit, token) if urls else read_state(source, limit)
        except Unavailable as exc:
            click.echo(f"splitter: {exc}", err=True)
            failed = True
    entries = merged(found, limit)
    if as_json:
        sys.stdout.buffer.write(orjson.dumps({"count": len(entries), "entries": entries}, option=orjson.OPT_INDENT_2) + b"\n")
    elif found:
        for line in table_lines(entries):
            click.echo(line)
    if failed:
        sys.exit(BAD_INPUT)

