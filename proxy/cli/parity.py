"""`splitter parity`: what became of the events per destination, and whether the events sent to
several destinations reached all of them, from running splitters or their ledger files.

Reads `/admin/ledger` of one or several running splitters (`--from`, the admin base URL; repeat it
for the replicas of a tier: their ledgers are merged by adding, as a supervisor merges its workers)
or ledger files (`--snapshot`: a `ledger*.json` from a state directory, a state directory itself,
or a saved `/admin/ledger` answer). `SPLITTER_ADMIN_TOKEN`, when set, goes with each request as the
bearer token.

Prints an aligned table: per source, event, destination and role the events accepted, delivered,
dead-lettered (with the reasons) and still pending, with a total per destination and role; then
the fan-out consistency check per event. `--window hour|day` shows the last hour's or day's counts
instead of those since the ledger began (pending is always what is pending now). `--json` prints
the merged ledger as `/admin/ledger` answers it; `--csv` one row per source, event, destination and
role with every count and window (`--consistency` with `--csv`: the fan-out rows instead).

Exit codes: 0, or 2 when a splitter or a file cannot be read (the message says which).
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson

from proxy.cli.admin_client import AdminReadError, fetch_admin_json, shown
from proxy.exits import BAD_INPUT
from proxy.observe.ledger_files import read_files
from proxy.observe.ledger_view import FANOUT_COLUMNS, ROW_KEY, WINDOW_COLUMNS, destinations, merge, view_of

View = dict[str, Any]
WINDOWS = {"total": None, "hour": "last_hour", "day": "last_24h"}
REASONS = ("rejected", "credential_refused", "redirected")
CSV_COLUMNS = (*ROW_KEY, "accepted", "delivered", "dead_lettered", *(f"dead_{reason}" for reason in REASONS), "dead_other", "dropped",
               "unrecorded", "pending", *(f"{w}_{c}" for w in ("last_hour", "last_24h") for c in WINDOW_COLUMNS))
CONSISTENCY_CSV_COLUMNS = ("source", "type", "event", *FANOUT_COLUMNS)


def _fail(message: str) -> NoReturn:
    click.echo(f"splitter parity: {message}", err=True)
    sys.exit(BAD_INPUT)


@click.command("parity")
@click.option("--from", "urls", multiple=True, metavar="URL", help="A running splitter's admin address, e.g. http://10.0.0.7:9090; repeat for replicas.")
@click.option("--snapshot", "snapshots", multiple=True, metavar="PATH",
              help="A ledger file from --state-dir (ledger.json, ledger.worker-1.json), a state directory, or a saved /admin/ledger answer; repeatable.")
@click.option("--source", default=None, metavar="NAME", help="Only this source.")
@click.option("--window", type=click.Choice(list(WINDOWS)), default="total", show_default=True,
              help="Counts since the ledger began, or over the last hour or day (pending is always now).")
@click.option("--json", "as_json", is_flag=True, help="The merged ledger as JSON, as /admin/ledger answers it.")
@click.option("--csv", "as_csv", is_flag=True, help="One row per source, event, destination and role, with every count, as CSV.")
@click.option("--consistency", is_flag=True, help="With --csv: the fan-out consistency rows instead.")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for each splitter.")
def parity(urls: tuple[str, ...], snapshots: tuple[str, ...], source: str | None, window: str, as_json: bool, as_csv: bool, consistency: bool,
           timeout: float) -> None:
    """Per destination: events accepted, delivered, dead-lettered, pending; and whether mirrored events reached every destination."""
    if not urls and not snapshots:
        _fail("give --from URL (a running splitter's admin address) or --snapshot PATH")
    if as_json and as_csv:
        _fail("give --json or --csv, not both")
    now = time.time()
    views = [_fetch(url, timeout) for url in urls] + [view for path in snapshots for view in _read(path, now)]
    ledger = merge(views)
    ledger["from"] = [shown(url) for url in urls] + list(snapshots)
    if source is not None:
        ledger["rows"] = [row for row in ledger["rows"] if row["source"] == source]
        ledger["fanout"]["rows"] = [row for row in ledger["fanout"]["rows"] if row["source"] == source]
    out = sys.stdout
    if as_json:
        out.write(orjson.dumps(ledger, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif as_csv:
        out.write(consistency_csv(ledger) if consistency else rows_csv(ledger))
    else:
        out.write(table(ledger, window))


def _fetch(url: str, timeout: float) -> View:
    try:
        view = fetch_admin_json(url, "/admin/ledger", timeout)
    except AdminReadError as exc:
        _fail(str(exc))
    if not _is_view(view):
        _fail(f"{shown(url)}: /admin/ledger did not answer a ledger")
    return view  # type: ignore[no-any-return]


def _read(path: str, now: float) -> list[View]:
    """A state directory's ledger files, one ledger file, or a saved /admin/ledger answer, as views."""
    if Path(path).is_dir():
        found = read_files(Path(path))
        if not found:
            _fail(f"{path}: no ledger file (ledger*.json) in this directory")
        return [_view(str(file), data, now) for file, data in found]
    try:
        data = orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        _fail(f"{path}: cannot read: {exc.strerror or exc}")
    except orjson.JSONDecodeError:
        _fail(f"{path}: not JSON")
    if _is_view(data):
        return [data]
    return [_view(path, data, now)]


def _view(path: str, data: Any, now: float) -> View:
    if isinstance(data, dict) and "windows" in data and "rows" in data:
        try:
            return view_of(data, now)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            _fail(f"{path}: a damaged ledger snapshot ({exc!r})")
    _fail(f"{path}: neither a ledger snapshot nor an /admin/ledger answer" + (f" ({data})" if isinstance(data, str) else ""))


def _is_view(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("rows"), list) and "processes" in data


# -- output -----------------------------------------------------------------------------------------------


def table(ledger: Mapping[str, Any], window: str = "total") -> str:
    """The aligned table: a header saying what was read and how fresh, the rows, totals, and the fan-out check."""
    field = WINDOWS[window]
    lines = [_header(ledger, window)]
    head: tuple[str, ...] = ("source", "type", "event", "destination", "role", "accepted", "delivered", "dead-lettered", "dropped", "pending")
    unrecorded = any(row.get("unrecorded") for row in ledger["rows"])
    if unrecorded:
        head = (*head, "unrecorded")
    body = [_table_row(row, field, unrecorded) for row in ledger["rows"]]
    totals = [_table_row({**total, "source": "total", "type": "", "event": ""}, field, unrecorded) for total in destinations(ledger)]
    lines += _aligned([head, *body, *(["-"] if totals else []), *totals], numeric_from=5)
    fan = ledger.get("fanout", {}).get("rows", [])
    lines.append("")
    if not fan:
        lines.append("fan-out consistency: no event was sent to more than one destination")
    else:
        lines.append("fan-out consistency (events sent to several destinations, since the ledger began):")
        fan_head = ("source", "type", "event", "fanned out", "reached all", "only some", "none", "in flight: some", "none yet", "untracked",
                    "unresolved")
        fan_rows = [(r["source"], r["type"], r["event"], *(str(r.get(c, 0)) for c in FANOUT_COLUMNS)) for r in fan]
        order = (0, 1, 2, 3, 4, 5, 6, 9, 10, 7, 8)
        lines += _aligned([fan_head, *[tuple(row[i] for i in order) for row in fan_rows]], numeric_from=3)
    return "\n".join(lines) + "\n"


def _header(ledger: Mapping[str, Any], window: str) -> str:
    processes = ledger.get("processes", [])
    ages = [float(p.get("age_seconds", 0)) for p in processes]
    where = ", ".join(ledger.get("from", [])) or "?"
    freshness = f"{len(processes)} process{'es' if len(processes) != 1 else ''}"
    if ages:
        freshness += f", data {max(ages):.0f} s old at most"
    counts = {"total": f"counts since {ledger.get('since', '?')}", "hour": "counts of the last hour", "day": "counts of the last 24 hours"}[window]
    return f"delivery ledger of {where} ({freshness}); {counts}; pending now"


def _table_row(row: Mapping[str, Any], field: str | None, unrecorded: bool) -> tuple[str, ...]:
    counts = row if field is None else row.get(field, {})
    dead = int(counts.get("dead_lettered", 0))
    reasons = row.get("reasons", {}) if field is None else {}
    dead_text = str(dead) + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()) if v) + ")" if dead and reasons else "")
    cells = (row["source"], row["type"], row["event"], row["destination"], row["role"], str(counts.get("accepted", 0)), str(counts.get("delivered", 0)),
             dead_text, str(counts.get("dropped", 0)), str(row.get("pending", 0)))
    return (*cells, str(row.get("unrecorded", 0))) if unrecorded else cells


def _aligned(rows: Sequence[Sequence[str]], numeric_from: int) -> list[str]:
    """Columns padded to their widest cell, numbers to the right; a row ["-"] is a rule."""
    real = [row for row in rows if list(row) != ["-"]]
    widths = [max(len(row[i]) for row in real) for i in range(len(real[0]))]
    lines = []
    for row in rows:
        if list(row) == ["-"]:
            lines.append("  ".join("-" * w for w in widths))
            continue
        cells = [cell.rjust(w) if i >= numeric_from else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def rows_csv(ledger: Mapping[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in ledger["rows"]:
        reasons = row.get("reasons", {})
        writer.writerow([*(row[k] for k in ROW_KEY), row["accepted"], row["delivered"], row["dead_lettered"], *(reasons.get(r, 0) for r in REASONS),
                         sum(v for k, v in reasons.items() if k not in REASONS), row["dropped"], row["unrecorded"], row["pending"],
                         *(row.get(w, {}).get(c, 0) for w in ("last_hour", "last_24h") for c in WINDOW_COLUMNS)])
    return out.getvalue()


def consistency_csv(ledger: Mapping[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CONSISTENCY_CSV_COLUMNS)
    for row in ledger.get("fanout", {}).get("rows", []):
        writer.writerow([row.get(column, 0) for column in CONSISTENCY_CSV_COLUMNS])
    return out.getvalue()
