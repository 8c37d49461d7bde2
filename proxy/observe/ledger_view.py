"""The ledger as people read it: `/admin/ledger`'s JSON, built from snapshots and merged across processes.

A view is built from one process's snapshot (`Ledger.to_json()` and the file's own fields) at a
moment `now`: its rows with pending and the recent windows summed from the buckets, the fan-out
consistency rows, and where it came from and how old it is. Views merge by adding up: rows by
(source, type, event, destination, role), fan-out rows by (source, type, event), hourly series by
hour; `since` is the earliest. So the supervisor of `serve --workers N` merges its workers' files,
and `splitter parity` merges the views of several replicas, with the same function.

Windows: `last_hour` sums the five-minute buckets that started in the last hour (the current one
and the eleven before it: between 55 and 60 minutes), `last_24h` the hourly buckets that started in
the last 24 hours (between 23 and 24 hours); `hourly`, when asked for, lists those buckets. Each counts accepted,
delivered, dead-lettered and dropped events; pending has no window, it is what is in the spool.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from proxy.observe.fanout import TOTALS as FANOUT_TOTALS
from proxy.observe.ledger import COLUMNS
from proxy.observe.tier_views import covering

WINDOW_COLUMNS = COLUMNS[:4]
ROW_KEY = ("source", "type", "event", "destination", "role")
FANOUT_KEY = ("source", "type", "event")
FANOUT_COLUMNS = (*FANOUT_TOTALS, "in_flight_some", "in_flight_none")
VIEW_FORMAT = 1


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def view_of(snapshot: Mapping[str, Any], now: float, *, hourly: bool = False, fanout_rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The view of one process's snapshot at `now` (`fanout_rows`: a live ledger's, with its in-flight split)."""
    rows: list[dict[str, Any]] = []
    for raw in snapshot.get("rows", []):
        key = dict(zip(ROW_KEY, raw[:5]))
        counts = dict(zip(COLUMNS, (int(c) for c in raw[5:5 + len(COLUMNS)])))
        reasons = raw[5 + len(COLUMNS)] if len(raw) > 5 + len(COLUMNS) else {}
        row = {**key, **counts, "reasons": {str(k): int(v) for k, v in reasons.items()},
               "pending": counts["accepted"] - counts["delivered"] - counts["dead_lettered"] - counts["unrecorded"],
               "last_hour": dict.fromkeys(WINDOW_COLUMNS, 0), "last_24h": dict.fromkeys(WINDOW_COLUMNS, 0)}
        if hourly:
            row["hourly"] = {}
        rows.append(row)
    windows = snapshot.get("windows", {})
    for name, field, span in (("recent", "last_hour", 3600), ("hourly", "last_24h", 24 * 3600)):
        window = windows.get(name, {})
        width = int(window.get("width", 3600))
        oldest = int(now) // width * width - span + width
        for start, index, *counts in window.get("buckets", []):
            if not 0 <= index < len(rows) or start < oldest:
                continue
            _add(rows[index][field], dict(zip(WINDOW_COLUMNS, counts)))
            if hourly and name == "hourly":
                rows[index]["hourly"][iso(start)] = dict(zip(WINDOW_COLUMNS, counts))
    fanout = snapshot.get("fanout", {})
    if fanout_rows is None:
        fanout_rows = _fanout_rows(fanout)
    process = {
        "name": snapshot.get("process") or "serve",
        "pid": snapshot.get("pid"),
        "written_at": iso(float(snapshot.get("written_at", now))),
        "age_seconds": round(max(0.0, now - float(snapshot.get("written_at", now))), 1),
        "live": bool(snapshot.get("live", False)),
        "clean_stop": bool(snapshot.get("clean", False)),
        "restarts": int(snapshot.get("restarts", 0)),
        "unclean_restarts": int(snapshot.get("unclean_restarts", 0)),
    }
    return {
        "ledger": VIEW_FORMAT,
        "generated_at": iso(now),
        "since": iso(float(snapshot.get("since", now))),
        "processes": [process],
        "rows": rows,
        "fanout": {"cap": int(fanout.get("cap", 0)), "tracked": sum(r["in_flight_some"] + r["in_flight_none"] for r in fanout_rows), "rows": fanout_rows},
    }


def _fanout_rows(fanout: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Fan-out rows from a snapshot: totals per key, and the events of the groups in flight, by
    whether a copy was delivered so far (fanout.py `FanOut.rows` says the same of a live ledger)."""
    rows = [{**dict(zip(FANOUT_KEY, raw[:3])), **dict(zip(FANOUT_TOTALS, (int(c) for c in raw[3:3 + len(FANOUT_TOTALS)]))),
             "in_flight_some": 0, "in_flight_none": 0} for raw in fanout.get("keys", [])]
    for _, _, _, delivered, events, _ in fanout.get("groups", []):
        for index, count in events:
            if 0 <= index < len(rows):
                rows[index]["in_flight_some" if delivered else "in_flight_none"] += int(count)
    return rows


def merge(views: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Several views as one: counts added up, every process listed, the earliest `since`. Answers of
    replicas that each cover the whole tier are taken once (tier_views.py)."""
    views = covering(views)
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    fanout: dict[tuple[Any, ...], dict[str, Any]] = {}
    merged: dict[str, Any] = {"ledger": VIEW_FORMAT, "generated_at": max((v["generated_at"] for v in views), default=iso(0)),
                              "since": min((v["since"] for v in views), default=iso(0)), "processes": [], "rows": [],
                              "fanout": {"cap": 0, "tracked": 0, "rows": []}}
    for view in views:
        merged["processes"] += view.get("processes", [])
        for row in view.get("rows", []):
            _merge_into(rows, tuple(row[k] for k in ROW_KEY), row)
        merged["fanout"]["cap"] += view.get("fanout", {}).get("cap", 0)
        merged["fanout"]["tracked"] += view.get("fanout", {}).get("tracked", 0)
        for row in view.get("fanout", {}).get("rows", []):
            _merge_into(fanout, tuple(row[k] for k in FANOUT_KEY), row)
    merged["rows"] = [rows[k] for k in sorted(rows)]
    merged["fanout"]["rows"] = [fanout[k] for k in sorted(fanout)]
    return merged


def _merge_into(table: dict[tuple[Any, ...], dict[str, Any]], key: tuple[Any, ...], row: Mapping[str, Any]) -> None:
    found = table.get(key)
    if found is None:
        table[key] = _copy(row)
    else:
        _add(found, row)


def _copy(value: Any) -> Any:
    return {k: _copy(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def _add(into: dict[str, Any], more: Mapping[str, Any]) -> None:
    """Add `more`'s numbers into `into`, recursively (a key's strings are equal by construction)."""
    for name, value in more.items():
        if isinstance(value, Mapping):
            _add(into.setdefault(name, {}), value)
        elif isinstance(value, int) and not isinstance(value, bool):
            into[name] = into.get(name, 0) + value
        else:
            into.setdefault(name, value)


def destinations(view: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per destination and role, the rows' counts added up (the table's footer, the report's summary)."""
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for row in view.get("rows", []):
        key = (row["destination"], row["role"])
        into = totals.setdefault(key, {"destination": key[0], "role": key[1]})
        _add(into, {k: v for k, v in row.items() if k not in ROW_KEY and k != "hourly"})
    return [totals[k] for k in sorted(totals)]
