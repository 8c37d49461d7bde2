"""`splitter catalog`: what the sources send, from running splitters or their snapshot files, as a
table, JSON or the CSV audit sheet a team shares, and against a tracking plan.

Reads `/admin/catalog` of one or several running splitters (`--from`, the admin base URL; repeat it
for the replicas of a tier: their catalogs are merged by adding, as a supervisor merges its workers)
or catalog files (`--snapshot`: a `catalog*.json` from a state directory, or a saved `/admin/catalog`
answer). `SPLITTER_ADMIN_TOKEN`, when set, goes with each request as the bearer token.

`--plan FILE` compares each source with a tracking plan: a rules file (each source with its own
`tracking_plan`) or one plan file (for `--source`, or for every source). What the plan would say of
what was seen: track events it does not list, events it lists that nobody sent, properties whose
types it does not allow, required properties missing from some samples.

Exit codes: 0, or 2 when a splitter, a file or the plan cannot be read (the message says which).
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

import click
import orjson
import yaml

from proxy.cli.admin_client import AdminReadError, fetch_admin_json, shown
from proxy.engine import PlanComparison, RulesError, TrackingPlan, compare_with_plan, compile_plan, load_rules
from proxy.exits import BAD_INPUT
from proxy.observe.catalog_view import View, merge_views, only_source, seen_events, view_of

CSV_COLUMNS = ("source", "type", "event", "total", "last_hour", "last_24h", "first_seen", "last_seen", "routed", "sampled",
               "path", "types", "seen_in", "mixed", "plan", "plan_detail")


def _fail(message: str) -> NoReturn:
    click.echo(f"splitter catalog: {message}", err=True)
    sys.exit(BAD_INPUT)


@click.command("catalog")
@click.option("--from", "urls", multiple=True, metavar="URL", help="A running splitter's admin address, e.g. http://10.0.0.7:9090; repeat for replicas.")
@click.option("--snapshot", "snapshots", multiple=True, metavar="FILE",
              help="A catalog file from --state-dir (catalog.json, catalog.worker-1.json) or a saved /admin/catalog answer; repeatable.")
@click.option("--source", "source", default=None, metavar="NAME", help="Only this source.")
@click.option("--plan", "plan_path", default=None, metavar="FILE", help="Compare with a tracking plan file, or with the plans of a rules file's sources.")
@click.option("--json", "as_json", is_flag=True, help="The merged catalog as JSON (with `plan` findings when --plan is given).")
@click.option("--csv", "as_csv", is_flag=True, help="One row per event property (the audit sheet), as CSV.")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for each splitter.")
def catalog(urls: tuple[str, ...], snapshots: tuple[str, ...], source: str | None, plan_path: str | None, as_json: bool, as_csv: bool,
            timeout: float) -> None:
    """Every event the sources sent: volume, routes, property paths and their types; merged over replicas."""
    if not urls and not snapshots:
        _fail("give --from URL (a running splitter's admin address) or --snapshot FILE")
    if as_json and as_csv:
        _fail("give --json or --csv, not both")
    views = [_fetch(url, source, timeout) for url in urls] + [_read(path) for path in snapshots]
    view = merge_views(views)
    if source is not None:
        view = only_source(view, source)
    findings = _compare(view, _plans(plan_path, source, view)) if plan_path is not None else None
    out = sys.stdout
    if as_json:
        body: dict[str, Any] = dict(view)
        if findings is not None:
            body["plan"] = {name: {"plan": origin, **found.as_dict()} for name, (origin, found) in findings.items()}
        out.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif as_csv:
        out.write(csv_sheet(view, findings))
    else:
        out.write(table(view, findings))


def _fetch(url: str, source: str | None, timeout: float) -> View:
    try:
        view = fetch_admin_json(url, "/admin/catalog", timeout, urllib.parse.urlencode({"source": source}) if source else "")
    except AdminReadError as exc:
        _fail(str(exc))
    if not isinstance(view, dict) or "sources" not in view:
        _fail(f"{shown(url)}: /admin/catalog did not answer a catalog")
    return view


def _read(path: str) -> View:
    """A state directory's snapshot (made a view now) or a saved view."""
    try:
        with open(path, "rb") as handle:
            found = orjson.loads(handle.read())
    except OSError as exc:
        _fail(f"{path}: cannot read: {exc.strerror or exc}")
    except orjson.JSONDecodeError:
        _fail(f"{path}: not JSON")
    if isinstance(found, dict) and found.get("kind") == "splitter-catalog":
        try:
            return view_of(found, time.time())
        except (KeyError, TypeError, ValueError) as exc:
            _fail(f"{path}: a damaged catalog snapshot ({exc!r})")
    if isinstance(found, dict) and isinstance(found.get("sources"), dict):
        return found
    _fail(f"{path}: neither a catalog snapshot nor an /admin/catalog answer")


def _plans(path: str, source: str | None, view: View) -> dict[str, tuple[str, TrackingPlan]]:
    """Source name -> (where the plan is written, the plan): a rules file's per-source plans, or one plan for the sources asked."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        _fail(f"{path}: cannot read: {exc.strerror or exc}")
    try:
        top = yaml.safe_load(data)
    except yaml.YAMLError:
        top = None  # compile_plan reports where
    try:
        if isinstance(top, dict) and "rules" in top and "sources" in top:  # a rules file: each source's own plan
            rules = load_rules(path, os.environ)
            plans = {name: (plan.origin, plan) for name, plan in rules.tracking_plans.items() if source is None or name == source}
            if not plans:
                _fail(f"{path}: no source{f' {source!r}' if source else ''} of this rules file has a tracking_plan")
            return plans
        plan = compile_plan(data, path, os.environ)
    except RulesError as exc:
        for line in exc.lines:
            click.echo(line, err=True)
        sys.exit(BAD_INPUT)
    names = [source] if source is not None else list(view.get("sources", {}))
    return {name: (path, plan) for name in names}


def _compare(view: View, plans: Mapping[str, tuple[str, TrackingPlan]]) -> dict[str, tuple[str, PlanComparison]]:
    sources = view.get("sources", {})
    return {name: (origin, compare_with_plan(seen_events(sources.get(name, {})), plan)) for name, (origin, plan) in sorted(plans.items())}


# ---- rendering ------------------------------------------------------------------------------------

def routed_text(routed: Mapping[str, Mapping[str, int]]) -> str:
    """`segment 90, rudderstack 30, segment (mirror) 30`: primaries first."""
    parts = [f"{destination} {roles['primary']}" for destination, roles in sorted(routed.items()) if roles.get("primary")]
    parts += [f"{destination} (mirror) {roles['mirror']}" for destination, roles in sorted(routed.items()) if roles.get("mirror")]
    return ", ".join(parts)


def types_text(types: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in types.items())


def _aligned(rows: Sequence[tuple[str, ...]], numeric: Iterable[int] = ()) -> list[str]:
    right = set(numeric)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def _processes_line(view: View) -> str:
    processes = view.get("processes", [])
    described = ", ".join(f"{p.get('process')} {'live' if p.get('live') else 'as of ' + str(p.get('written_at'))}" for p in processes)
    return f"catalog at {view.get('generated_at')} from {len(processes)} process{'es' if len(processes) != 1 else ''}" + (
        f": {described}" if described else "")


def table(view: View, findings: Mapping[str, tuple[str, PlanComparison]] | None = None) -> str:
    lines = [_processes_line(view), ""]
    sources = view.get("sources", {})
    events = [(name, e) for name, body in sources.items() for e in body.get("events", ())]
    if not events:
        lines.append("no events seen")
    else:
        rows = [("SOURCE", "TYPE", "EVENT", "TOTAL", "LAST 1H", "LAST 24H", "FIRST SEEN", "LAST SEEN", "ROUTED")]
        rows += [(name, e["type"], e["name"], str(e["total"]), str(e["last_hour"]), str(e["last_24h"]), e["first_seen"] or "-", e["last_seen"] or "-",
                  routed_text(e["routed"])) for name, e in events]
        lines += _aligned(rows, numeric=(3, 4, 5))
        path_rows = [("SOURCE", "EVENT", "PATH", "TYPES", "SEEN IN")]
        for name, e in events:
            for path, cell in e["paths"].items():
                mixed = "  (mixed types)" if cell["mixed"] else ""
                path_rows.append((name, e["name"], path, types_text(cell["types"]) + mixed, f"{cell['seen']} of {e['sampled']} sampled"))
        if len(path_rows) > 1:
            lines += ["", "PROPERTIES", *_aligned(path_rows)]
    for name, (origin, found) in (findings or {}).items():
        lines += ["", f"PLAN {name} ({origin})", *plan_lines(found)]
    return "\n".join(lines) + "\n"


def plan_lines(found: PlanComparison) -> list[str]:
    lines = [f"  not in the plan: {e.name} ({e.total} event{'s' if e.total != 1 else ''})" for e in found.unplanned]
    lines += [f"  planned, never seen: {name}" for name in found.unseen]
    lines += [f"  type breaks the plan: {b.event} {b.path} is {types_text(b.observed)} of {b.sampled} sampled (plan: {' or '.join(b.expected)})"
              for b in found.type_breaks]
    lines += [f"  required, missing: {m.event} {m.path} in {m.sampled - m.seen} of {m.sampled} sampled" for m in found.missing_required]
    return lines or ["  everything seen is planned, and has the planned types"]


def csv_sheet(view: View, findings: Mapping[str, tuple[str, PlanComparison]] | None = None) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for name, body in view.get("sources", {}).items():
        found = findings.get(name) if findings is not None else None
        comparison = found[1] if found is not None else None
        breaks = {(b.event, b.path): b for b in comparison.type_breaks} if comparison is not None else {}
        missing = {(m.event, m.path): m for m in comparison.missing_required} if comparison is not None else {}
        for e in body.get("events", ()):
            status = comparison.status(e["type"], e["name"]) if comparison is not None else ""
            head = [name, e["type"], e["name"], e["total"], e["last_hour"], e["last_24h"], e["first_seen"] or "", e["last_seen"] or "",
                    routed_text(e["routed"]), e["sampled"]]
            if not e["paths"]:
                writer.writerow([*head, "", "", "", "", status, ""])
            never = [gone for (event, path), gone in missing.items() if event == e["name"] and path not in e["paths"]]
            for gone in never:  # a required property no sample had
                writer.writerow([*head, gone.path, "", 0, "", status, f"required, missing in {gone.sampled} of {gone.sampled} sampled"])
            for path, cell in e["paths"].items():
                detail = []
                if (b := breaks.get((e["name"], path))) is not None:
                    detail.append(f"type breaks the plan (plan: {' or '.join(b.expected)})")
                if (m := missing.get((e["name"], path))) is not None:
                    detail.append(f"required, missing in {m.sampled - m.seen} of {m.sampled} sampled")
                writer.writerow([*head, path, types_text(cell["types"]), cell["seen"], "yes" if cell["mixed"] else "", status, "; ".join(detail)])
        for event in comparison.unseen if comparison is not None else ():
            writer.writerow([name, "identify" if event == "identify" else "track", event, 0, 0, 0, "", "", "", 0, "", "", "", "", "never seen", ""])
    if findings is not None:  # plans for sources the catalog has not seen at all
        for name, (_, comparison) in findings.items():
            if name not in view.get("sources", {}):
                for event in comparison.unseen:
                    writer.writerow([name, "identify" if event == "identify" else "track", event, 0, 0, 0, "", "", "", 0, "", "", "", "", "never seen", ""])
    return buffer.getvalue()
