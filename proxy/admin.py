"""The admin app: metrics and probes for the platform, reload and config for operators.

`/metrics`, `/healthz` and `/readyz` are open: Prometheus and the kubelet carry no credentials.
`/admin/*` changes or reveals configuration, so with a token set each of those handlers checks the
bearer token itself (constant-time), rather than a middleware matching path prefixes that a
differently spelled path could slip past. `/admin/config` describes the active rules from the
compiled `RuleSet`, never from the file's text, which may hold literal write keys: every key goes
through `mask()` and destination URLs lose their userinfo and query, where credentials can hide.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.control.reload import Reloader, ReloadResult
from proxy.control.state import ActiveRules
from proxy.delivery.upstream import public_url  # the one place a URL is made fit to show
from proxy.engine import MASK, Cohort, DedupSettings, RecordSettings, Rule, RuleSet, mask, ramp_views
from proxy.metrics import Metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACTIVE = web.AppKey("active", ActiveRules)
RELOADER = web.AppKey("reloader", Reloader)
METRICS = web.AppKey("metrics", Metrics)
TOKEN = web.AppKey("token", bytes)  # empty: /admin/* is open (settings allow that on loopback only)
IS_READY = web.AppKey[Callable[[], bool]]("is_ready")
REGISTRY = web.AppKey("registry", CollectorRegistry)
Detail = Callable[[], Mapping[str, Any] | None]
DETAIL = web.AppKey[Detail]("detail")
HistorySource = Callable[[int], Awaitable[Sequence[Mapping[str, Any]]]]  # limit -> the newest change history entries, newest first
HISTORY = web.AppKey[HistorySource]("history")
HISTORY_LIMIT = (100, 10_000)  # the default and the largest `?limit=` of /admin/history
CatalogSource = Callable[[str | None], Awaitable[Mapping[str, Any]]]  # ?source= or None -> the catalog document
CATALOG = web.AppKey[CatalogSource]("catalog")
LedgerSource = Callable[[bool], Awaitable[Mapping[str, Any]]]  # hourly series or not -> the delivery ledger document
LEDGER = web.AppKey[LedgerSource]("ledger")
ERROR_CODES = {"error": "invalid_rules", "refused": "reshuffle_refused"}


def build_admin_app(
    *, active: ActiveRules, reloader: Reloader, metrics: Metrics, token: str | None, is_ready: Callable[[], bool],
    registry: CollectorRegistry | None = None, detail: Detail | None = None, history: HistorySource | None = None, catalog: CatalogSource | None = None,
    ledger: LedgerSource | None = None,
) -> web.Application:
    """`registry`: what `/metrics` exposes when not `metrics.registry` (a supervisor's, merging its workers').
    `detail`: more fields for a ready `/readyz`, or None (the last good rules serving instead of a refused file).
    `history`: the change history (proxy/control/history.py) for `/admin/history`, where this process keeps it."""
    app = web.Application()
    app[ACTIVE], app[RELOADER], app[METRICS], app[IS_READY] = active, reloader, metrics, is_ready
    app[DETAIL] = detail or (lambda: None)
    app[REGISTRY] = registry or metrics.registry
    app[TOKEN] = _bytes(token) if token else b""
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/admin/reload", _guarded(reload_handler))
    app.router.add_get("/admin/config", _guarded(config_handler))
    if history is not None:
        app[HISTORY] = history
        app.router.add_get("/admin/history", _guarded(history_handler))
    if catalog is not None:
        app[CATALOG] = catalog
        app.router.add_get("/admin/catalog", _guarded(catalog_handler))
    if ledger is not None:
        app[LEDGER] = ledger
        app.router.add_get("/admin/ledger", _guarded(ledger_handler))
    return app


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when ready, 503 when not: the kubelet reads only the status. Serving the last good rules
    because the file was refused is ready (the safe state) and says so in the body."""
    if not request.app[IS_READY]():
        return web.json_response({"status": "not ready"}, status=503)
    return web.json_response({"status": "ready", "sha256": request.app[ACTIVE].current.sha256, **(request.app[DETAIL]() or {})})


async def reload_handler(request: web.Request) -> web.Response:
    result = await request.app[RELOADER].reload("admin")
    if result.ok:
        return web.json_response({"success": True, "status": result.status, "sha256": result.sha256, "rollbacks": list(result.rollbacks)})
    return web.json_response(_failure_body(result), status=400)


def _failure_body(result: ReloadResult) -> dict[str, Any]:
    if result.status == "refused":
        message = "the new rules would reshuffle users between destinations; the previous rules stay active"
    else:
        message = f"the rules file has {len(result.errors)} problem(s); the previous rules stay active"
    return {
        "success": False,
        "status": result.status,
        "code": ERROR_CODES.get(result.status, "reload_failed"),
        "message": message,
        "errors": list(result.errors),
        "sha256": result.sha256,
    }


async def config_handler(request: web.Request) -> web.Response:
    snapshot = request.app[ACTIVE].snapshot
    body = describe(snapshot.rules)
    body["loaded_at"] = datetime.fromtimestamp(snapshot.loaded_at, UTC).isoformat()
    if ramps := ramp_views(snapshot.rules, datetime.now(UTC)):  # the step in effect and when the next one lands
        body["ramps"] = [view.as_dict() for view in ramps]
    return web.json_response(body)


async def catalog_handler(request: web.Request) -> web.Response:
    """The event catalog (proxy/observe/catalog_files.py): every source's events, or `?source=NAME`'s."""
    return web.json_response(await request.app[CATALOG](request.query.get("source")), dumps=_dumps)


async def ledger_handler(request: web.Request) -> web.Response:
    """The delivery ledger (proxy/observe/ledger_files.py); `?hourly=1` adds each row's hourly series."""
    return web.json_response(await request.app[LEDGER](request.query.get("hourly", "") in ("1", "true")), dumps=_dumps)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def history_handler(request: web.Request) -> web.Response:
    """The change history, newest first: `?limit=N` entries (100 by default). Entries hold sha256s,
    names, percents and the engine's masked messages, never the rules text."""
    default, largest = HISTORY_LIMIT
    raw = request.query.get("limit", "")
    limit = int(raw) if raw.isascii() and raw.isdigit() else -1 if raw else default
    if not 1 <= limit <= largest:
        return web.json_response({"success": False, "code": "bad_limit", "message": f"limit must be a whole number from 1 to {largest}"}, status=400)
    try:
        entries = list(await request.app[HISTORY](limit))
    except OSError as exc:  # a state directory gone or unreadable: say so, the proxy itself is fine
        return web.json_response({"success": False, "code": "history_unreadable", "message": f"cannot read the change history: {exc.strerror or exc}"},
                                 status=503)
    return web.json_response({"count": len(entries), "entries": entries})


def describe(rules: RuleSet) -> dict[str, Any]:
    """The active rules as JSON-ready data, with every credential masked."""
    return {
        "sha256": rules.sha256,
        "file": rules.filename,
        "version": rules.version,
        "destinations": {
            name: {"kind": dest.kind, "url": public_url(dest.url), "timeout": dest.timeout} for name, dest in rules.destinations.items()
        },
        "sources": [
            {
                "name": source.name,
                "write_keys": [mask(key) for key in source.write_keys],
                "credentials": {dest: mask(key) for dest, key in source.credentials.items()},
                **({"webhook": {"secret": MASK}} if source.webhook_secret else {}),  # not even a prefix of an HMAC key
            }
            for source in rules.sources.values()
        ],
        **({"dedup": _dedup(rules.dedup)} if rules.dedup else {}),
        "cohort": _cohort(rules.cohort),
        "country_headers": list(rules.country_headers),
        "rules": [_rule(rule) for rule in rules.rules],
        **({"record": _record(rules.recording)} if rules.recording else {}),
    }


def _record(settings: RecordSettings) -> dict[str, Any]:
    """What this replica records (recorded traffic): the hashed paths, never their salt."""
    return {"percent": settings.percent, "salt": settings.salt, "dir": settings.directory, "hash": list(settings.hashed),
            "file_bytes": settings.file_bytes, "file_seconds": settings.file_seconds, "max_bytes": settings.max_bytes, "queue": settings.queue}


def _dedup(dedup: DedupSettings) -> dict[str, Any]:
    shared = {"store": dedup.shown_store, "store_timeout": dedup.store_timeout} if dedup.store else {}  # the store's password masked
    return {"window": dedup.window, "max_ids": dedup.max_ids, **shared}


def _rule(rule: Rule) -> dict[str, Any]:
    split = rule.route.split
    return {
        "name": rule.name,
        "when": dict(rule.when_text),
        "route": {
            "to": list(rule.route.to),
            "split": dict(split.percents) if split else None,
            "mirror": list(rule.route.mirror),
        },
        "cohort": _cohort(rule.cohort),
    }


def _cohort(cohort: Cohort) -> dict[str, Any]:
    return {"key": list(cohort.fields), "salt": cohort.salt}


def authorized(request: web.Request) -> bool:
    """Whether `request` may see `/admin/*`: no token is set, or it carries the token as its bearer (constant-time)."""
    expected = request.app[TOKEN]
    return not expected or hmac.compare_digest(_bearer(request), expected)


def _guarded(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        if not authorized(request):
            return web.json_response(
                {"success": False, "code": "unauthorized", "message": "send Authorization: Bearer <admin token>"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="splitter-admin"'},
            )
        return await handler(request)

    return guarded


guarded = _guarded  # the console's routes (proxy/console) take the same check


def _bearer(request: web.Request) -> bytes:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return _bytes(value.strip()) if scheme.lower() == "bearer" else b""


def _bytes(text: str) -> bytes:
    # Header values arrive as surrogate-escaped UTF-8; compare_digest on str rejects non-ASCII.
    return text.encode("utf-8", "surrogateescape")
