"""The console: one page on the admin port (`GET /`) to watch the migration.

Server-rendered by Jinja2 with autoescape (templates/console.html), so it reads without JavaScript;
a small script (static/console.js, served from the package: no build step, no CDN) refreshes it
every few seconds from `GET /admin/console` and builds what it changes with DOM text nodes only.
Everything the catalog and the ledger show came from clients (event names, property paths), so it
is always text: escaped by the template, `textContent` in the script, and a Content-Security-Policy
that runs no inline script, loads nothing from elsewhere and cannot be framed.

Auth is the admin port's (`proxy.admin.authorized`): with a token set, `/` without it answers 401
with an empty page that asks for the token; the script keeps it in the tab's session storage and
sends it as `Authorization: Bearer` on every request (never in a URL). A reverse proxy that sets
the header works too, with or without JavaScript. The page has no write action: its only form that
posts is the explain box, which reads (`POST /admin/explain`, proxy/console/explain.py).

`add_console(app, ...)` mounts it on an admin app built by `proxy.admin.build_admin_app`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import jinja2
import orjson
from aiohttp import web

from proxy.admin import ACTIVE, CATALOG, HISTORY, LEDGER, REGISTRY, authorized, describe, guarded
from proxy.console.explain import MAX_BODY, ExplainError, explain, id_fields
from proxy.console.model import (
    HISTORY_SHOWN,
    RateWindow,
    catalog_events,
    health,
    history_rows,
    metric_names,
    parity,
    percents_text,
    read_samples,
    rules_view,
)
from proxy.engine import iso, ramp_views

RATES = web.AppKey("console_rates", RateWindow)
REGION = web.AppKey[str | None]("console_region")
STATIC = {"console.js": "text/javascript", "console.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


_ENV = jinja2.Environment(loader=jinja2.PackageLoader("proxy.console", "templates"), autoescape=True, undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True)
_ENV.filters["percents"] = percents_text
_FILES = {name: (resources.files("proxy.console") / "static" / name).read_bytes() for name in STATIC}


def add_console(app: web.Application, *, region: str | None = None) -> None:
    """Mount the console on an admin app: `/`, its two static files, `/admin/console` and `/admin/explain`.
    It shows what the app's sources give (the catalog, the change history, the delivery ledger), where it has them."""
    app[RATES] = RateWindow()
    app[REGION] = region
    app.router.add_get("/", page)
    for name in STATIC:
        app.router.add_get(f"/console/{name}", _static(name))
    app.router.add_get("/admin/console", guarded(console_handler))
    app.router.add_post("/admin/explain", guarded(explain_handler))


async def page(request: web.Request) -> web.Response:
    """The page: whole for an authorized request; without the token, 401 and only the form that asks for it."""
    query = request.query.get("q", "")[:200]
    sort = "name" if request.query.get("sort") == "name" else "volume"
    if not authorized(request):
        html = _ENV.get_template("console.html").render(model=None, catalog=None, locked=True, query=query, sort=sort, id_fields=[], sources=[], region=None)
        return web.Response(text=html, content_type="text/html", status=401, headers={**SECURITY_HEADERS, "WWW-Authenticate": 'Bearer realm="splitter-admin"'})
    model = await page_model(request.app)
    catalog = await _catalog(request.app)
    html = _ENV.get_template("console.html").render(
        model=model, catalog=catalog_events(catalog, query, sort) if catalog is not None else None, locked=False, query=query, sort=sort,
        id_fields=model["explain"]["id_fields"], sources=model["explain"]["sources"], region=model["explain"]["region"])
    return web.Response(text=html, content_type="text/html", headers=SECURITY_HEADERS)


async def console_handler(request: web.Request) -> web.Response:
    """The page's data as JSON, for its script: everything but the catalog, or `?part=catalog` the catalog's events."""
    if request.query.get("part") == "catalog":
        catalog = await _catalog(request.app)
        body: Mapping[str, Any] = {"catalog": catalog_events(catalog) if catalog is not None else None}
    else:
        body = await page_model(request.app)
    return web.Response(body=orjson.dumps(body), content_type="application/json", headers=SECURITY_HEADERS)


async def explain_handler(request: web.Request) -> web.Response:
    """The explain box: a JSON question, or the form's fields when the page runs without JavaScript. Reads only."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _error(413, "too_large", f"the question is larger than {MAX_BODY // 1024} KiB")
    try:
        if request.content_type == "application/json":
            question = orjson.loads(await request.read())
            if not isinstance(question, dict):
                raise ExplainError("expected a JSON object")
        else:
            question = {key: value for key, value in (await request.post()).items() if isinstance(value, str)}
        answer = explain(request.app[ACTIVE].current, question, request.app[REGION])
    except orjson.JSONDecodeError as exc:
        return _error(400, "bad_request", f"not JSON: {exc}")
    except ExplainError as exc:
        return _error(400, "bad_question", str(exc))
    return web.Response(body=orjson.dumps(answer), content_type="application/json", headers=SECURITY_HEADERS)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.Response(body=orjson.dumps({"success": False, "code": code, "message": message}), status=status,
                        content_type="application/json", headers=SECURITY_HEADERS)


async def page_model(app: web.Application) -> dict[str, Any]:
    """What the page shows (but the catalog): rules and ramps, traffic, delivery health, parity, history."""
    snapshot = app[ACTIVE].snapshot
    rules = snapshot.rules
    now = datetime.now(UTC)
    samples = read_samples(app[REGISTRY], metric_names())  # in the loop, as /metrics collects (a supervisor's: its workers' small files)
    model: dict[str, Any] = {
        "generated_at": iso(now.replace(microsecond=0)),
        "rules": rules_view(describe(rules), [view.as_dict() for view in ramp_views(rules, now)],
                            iso(datetime.fromtimestamp(snapshot.loaded_at, UTC).replace(microsecond=0))),
        "traffic": app[RATES].read(samples),
        "health": health(list(rules.destinations), samples),
        "parity": None,
        "history": None,
        "history_error": None,
        "explain": {"sources": list(rules.sources), "id_fields": id_fields(rules), "region": app[REGION]},
    }
    if LEDGER in app:
        model["parity"] = parity(await app[LEDGER](False))  # what /admin/ledger answers, without the hourly series
    if HISTORY in app:
        try:
            model["history"] = history_rows(list(await app[HISTORY](HISTORY_SHOWN)))
        except OSError as exc:
            model["history"], model["history_error"] = [], f"cannot read the change history: {exc.strerror or exc}"
    return model


async def _catalog(app: web.Application) -> Mapping[str, Any] | None:
    return await app[CATALOG](None) if CATALOG in app else None


def _static(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    body, content_type = _FILES[name], STATIC[name]

    async def static(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    return static
