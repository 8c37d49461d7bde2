"""Tracking plans in the running proxy, a reload and `splitter simulate`.

Through the real in-process stack (tests/proxy_harness.py) with real receivers: an observing plan
counts violations while every event is still delivered; a blocking plan rejects the violating
event of a batch (400 for a single call) and delivers the rest. The check queue and the sampled
log are tested on a real `PlanChecks`, with a clock the test moves.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from proxy.control.reload import Reloader
from proxy.control.state import ActiveRules
from proxy.engine import EventContext, RulesError, Violation, compile_rules, load_rules
from proxy.ingress.plan_checks import PlanChecks
from proxy.ingress.prepare import CallShape, prepare
from proxy.metrics import Metrics
from tests.conftest import RULES_DIR, splitter_command
from tests.proxy_harness import DEFAULT_RULES, SERVER_KEY, Stack, proxy_stack

WEB_CREDENTIALS = '    credentials: {segment: "seg-web-key-0123456789", rudderstack: "rs-web-key-0123456789"}\n'
SERVER_CREDENTIALS = '    credentials: {segment: "seg-server-key-0123456789", rudderstack: "rs-server-key-0123456789"}\n'
WEB_PLAN = """\
    tracking_plan:
      allow_unplanned_events: false
      events:
        Order Completed:
          required: [order_id]
          properties:
            total: {type: number}
"""
SERVER_PLAN = """\
    tracking_plan:
      mode: block
      events:
        Order Completed:
          json_schema: {required: [properties], properties: {properties: {required: [order_id]}}}
"""
PLANNED = DEFAULT_RULES.replace(WEB_CREDENTIALS, WEB_CREDENTIALS + WEB_PLAN).replace(SERVER_CREDENTIALS, SERVER_CREDENTIALS + SERVER_PLAN)
assert PLANNED.count("tracking_plan:") == 2
VIOLATIONS = "splitter_tracking_plan_violations_total"


def order(user: str, **properties: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Order Completed", "userId": user, "messageId": f"m-{user}", "properties": properties}


def received(stack: Stack) -> list[str]:
    return sorted(r.event["messageId"] for r in stack.segment.events)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with proxy_stack(PLANNED) as running:
        yield running


async def test_observe_mode_counts_violations_and_delivers_every_event(stack: Stack) -> None:
    batch = [
        order("u1", order_id="o-1", total=3),
        order("u2", total="3"),  # missing order_id, and total is a string
        {"type": "track", "event": "Cart Viewed", "userId": "u3", "messageId": "m-u3"},  # not in the plan
        {"type": "page", "name": "Home", "userId": "u4", "messageId": "m-u4"},  # pages are not planned
    ]
    status, body, _ = await stack.post("/v1/batch", {"batch": batch})
    assert (status, body) == (200, {"success": True})
    assert received(stack) == ["m-u1", "m-u2", "m-u3", "m-u4"]
    for kind in ("missing_property", "wrong_type", "unplanned_event"):
        assert await stack.wait_metric(VIOLATIONS, 1, source="web", kind=kind) == 1
    assert stack.metric(VIOLATIONS, source="web", kind="not_allowed_value") == 0
    assert stack.metric("splitter_tracking_plan_unchecked_total", source="web") == 0
    assert stack.metric("splitter_events_rejected_total", source="web", code="tracking_plan_violation") == 0


async def test_block_mode_rejects_the_violating_event_and_delivers_the_rest(stack: Stack) -> None:
    batch = [order("u1", order_id="o-1"), order("u2", total=3), order("u3", order_id="o-3")]
    status, body, _ = await stack.post("/v1/batch", {"batch": batch}, key=SERVER_KEY)
    assert status == 200
    assert body["rejected"] == [{
        "index": 1, "code": "tracking_plan_violation",
        "message": "'Order Completed' fails its JSON Schema at properties: 'order_id' is a required property",
    }]
    assert received(stack) == ["m-u1", "m-u3"]
    assert stack.metric("splitter_events_rejected_total", source="server", code="tracking_plan_violation") == 1
    assert stack.metric(VIOLATIONS, source="server", kind="schema") == 1
    assert stack.metric(VIOLATIONS, source="web", kind="schema") == 0


async def test_block_mode_single_call_gets_400(stack: Stack) -> None:
    status, body, _ = await stack.post("/v1/track", order("u1", total=3), key=SERVER_KEY)
    assert (status, body) == (400, {
        "success": False, "code": "tracking_plan_violation",
        "message": "'Order Completed' fails its JSON Schema at properties: 'order_id' is a required property",
    })
    assert stack.segment.events == []
    assert stack.metric(VIOLATIONS, source="server", kind="schema") == 1


async def test_sources_without_a_plan_are_not_checked() -> None:
    async with proxy_stack() as running:
        status, _, _ = await running.post("/v1/batch", {"batch": [order("u1", total="x")]})
        assert status == 200 and received(running) == ["m-u1"]
        assert running.metrics.registry.get_sample_value(VIOLATIONS, {"source": "web", "kind": "wrong_type"}) is None


# --- the check queue and the sampled log, on a real PlanChecks --------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def checks_with(capacity: int = 10, clock: Clock | None = None) -> tuple[PlanChecks, Metrics]:
    metrics = Metrics()
    checks = PlanChecks(capacity, clock or Clock())
    checks.register(web.Application(), metrics)
    return checks, metrics


def test_a_full_queue_skips_and_counts_events() -> None:
    rules = compile_rules(PLANNED, env={"SEGMENT_URL": "http://127.0.0.1:9", "RUDDERSTACK_URL": "http://127.0.0.1:9"})
    checks, metrics = checks_with(capacity=2)
    checks.submit(rules, "web", [b"{}"] * 5)
    assert metrics.registry.get_sample_value("splitter_tracking_plan_unchecked_total", {"source": "web"}) == 3


def test_violations_are_logged_at_most_once_a_second_per_source_and_kind() -> None:
    clock = Clock()
    checks, metrics = checks_with(clock=clock)
    missing = Violation("missing_property", "Order Completed", "'Order Completed' is missing required property 'order_id'")
    wrong = Violation("wrong_type", "Signed Up", "'Signed Up' property 'plan' is an integer, expected string")
    with capture_logs() as logs:
        checks.record("web", [missing, missing, wrong], "observe")
        clock.now += 0.5
        checks.record("web", [missing], "observe")
        checks.record("app", [missing], "block")
        clock.now += 0.6
        checks.record("web", [missing], "observe")
    assert [(e["source"], e["kind"], e["event_name"], e["held_back"], e["mode"]) for e in logs] == [
        ("web", "missing_property", "Order Completed", 0, "observe"),
        ("web", "wrong_type", "Signed Up", 0, "observe"),
        ("app", "missing_property", "Order Completed", 0, "block"),
        ("web", "missing_property", "Order Completed", 2, "observe"),
    ]
    assert {name: value for name, value in logs[0].items() if name not in ("source", "kind", "event_name", "held_back", "mode")} == {
        "event": "tracking_plan_violation",
        "log_level": "warning", "message": "'Order Completed' is missing required property 'order_id'",
    }
    assert metrics.registry.get_sample_value(VIOLATIONS, {"source": "web", "kind": "missing_property"}) == 4


# --- reload and simulate ----------------------------------------------------------------------------


async def test_an_edited_plan_file_is_a_change_on_reload(tmp_path: Path) -> None:
    rules_path = tmp_path / "rules.yaml"
    plan = tmp_path / "web-plan.yaml"
    rules_path.write_text(PLANNED.replace(WEB_PLAN, "    tracking_plan: web-plan.yaml\n"))
    plan.write_text("events: {E: {required: [a]}}\n")
    env = {"SEGMENT_URL": "http://127.0.0.1:9", "RUDDERSTACK_URL": "http://127.0.0.1:9"}
    active = ActiveRules(load_rules(str(rules_path), env))
    reloader = Reloader(str(rules_path), active, Metrics(), env)
    assert (await reloader.reload("test")).status == "unchanged"
    plan.write_text("events: {E: {required: [b]}}\n")
    assert (await reloader.reload("test")).status == "success"
    event = {"type": "track", "event": "E", "properties": {"a": 1}}
    assert [v.message for v in active.current.tracking_plans["web"].violations(event)] == ["'E' is missing required property 'b'"]


def test_simulate_reports_violations(rules_env: dict[str, str], tmp_path: Path) -> None:
    def line(key: str, event: str, **properties: Any) -> str:
        return json.dumps({"writeKey": key, "type": "track", "event": event, "userId": "u1", "properties": properties})

    sample = tmp_path / "sample.ndjson"
    sample.write_text("\n".join([
        line("seg-web-key", "Order Completed", order_id="o-1", total=10, currency="EUR"),
        line("seg-web-key", "Order Completed", order_id="o-2", total=10, currency="YEN"),
        line("seg-web-key", "Order Completed", order_id="o-3", total="10", currency="CHF"),
        line("seg-web-key", "Cart Viewed"),
        line("seg-backend-key", "Order Refunded", order_id="o-1", amount=0),
        line("seg-ios-key", "Product Viewed", sku="s"),
    ]) + "\n")
    result = subprocess.run(splitter_command("simulate", str(RULES_DIR / "tracking-plan.yaml"), str(sample)),
                            capture_output=True, text=True, env=rules_env, timeout=60)
    assert result.returncode == 0, result.stderr  # violations are a finding, not a failure of the command
    report = result.stdout.split("\n\n", 1)[1].splitlines()
    assert report == [
        "tracking plans: 6 events checked, 5 with violations",
        f"{'source':<16} {'kind':<18} {'event':<32} {'violations':>10}",
        f"{'web':<16} {'not_allowed_value':<18} {'Order Completed':<32} {2:>10}",
        "    e.g. 'Order Completed' property 'currency' is 'YEN', expected one of 'USD', 'EUR', 'GBP'",
        "    e.g. 'Order Completed' property 'currency' is 'CHF', expected one of 'USD', 'EUR', 'GBP'",
        f"{'backend':<16} {'schema':<18} {'Order Refunded':<32} {1:>10}",
        "    e.g. 'Order Refunded' fails its JSON Schema at properties.amount: 0 is less than or equal to the minimum of 0",
        f"{'ios':<16} {'missing_property':<18} {'Product Viewed':<32} {1:>10}",
        "    e.g. 'Product Viewed' is missing required property 'product_id'",
        f"{'web':<16} {'unplanned_event':<18} {'Cart Viewed':<32} {1:>10}",
        "    e.g. event 'Cart Viewed' is not in the tracking plan",
        f"{'web':<16} {'wrong_type':<18} {'Order Completed':<32} {1:>10}",
        "    e.g. 'Order Completed' property 'total' is a string, expected number",
    ]


async def test_a_remote_ref_is_never_fetched() -> None:
    # jsonschema's default registry fetches remote $refs with a blocking urlopen (no timeout) on the
    # event loop. The docs promise nothing is fetched: such a plan is refused when it compiles.
    hits: list[str] = []

    async def schema(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"type": "object", "required": ["order_id"]})

    app = web.Application()
    app.router.add_get("/order.json", schema)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    remote = SERVER_PLAN.replace("json_schema: {required: [properties], properties: {properties: {required: [order_id]}}}",
                                 f'json_schema: {{properties: {{properties: {{$ref: "http://127.0.0.1:{port}/order.json"}}}}}}')
    rules = PLANNED.replace(SERVER_PLAN, remote)
    try:
        with pytest.raises(RulesError) as info:
            compile_rules(rules, env={"SEGMENT_URL": "http://127.0.0.1:9", "RUDDERSTACK_URL": "http://127.0.0.1:9"})
        assert info.value.lines == [
            f"rules.yaml:23: sources[1].tracking_plan.events.Order Completed.json_schema.properties.properties.$ref: "
            f"cannot resolve 'http://127.0.0.1:{port}/order.json' (a $ref must point into the same schema: nothing is fetched)"
        ]
        assert hits == []
    finally:
        await runner.cleanup()


def test_observe_mode_queues_only_the_events_its_plan_checks() -> None:
    # The check queue is bounded: pages, screens, identifies without an `identify` plan and (when
    # unplanned events are allowed) unplanned track events have nothing to check, so they must not
    # take its room, nor be counted as `unchecked` when it is full.
    allowing = PLANNED.replace("      allow_unplanned_events: false\n", "")
    rules = compile_rules(allowing, env={"SEGMENT_URL": "http://127.0.0.1:9", "RUDDERSTACK_URL": "http://127.0.0.1:9"})
    batch = [
        order("u1", order_id="o-1"),
        {"type": "page", "name": "Home", "userId": "u2"},
        {"type": "screen", "name": "Home", "userId": "u3"},
        {"type": "identify", "userId": "u4", "traits": {"email": "a@b.c"}},
        {"type": "track", "event": "Cart Viewed", "userId": "u5"},
    ]
    prepared = prepare(rules, {"batch": batch}, CallShape(True), rules.sources["web"], EventContext("web"), None)
    assert [json.loads(data)["userId"] for data in prepared.observed] == ["u1"]
    strict = compile_rules(PLANNED, env={"SEGMENT_URL": "http://127.0.0.1:9", "RUDDERSTACK_URL": "http://127.0.0.1:9"})
    prepared = prepare(strict, {"batch": batch}, CallShape(True), strict.sources["web"], EventContext("web"), None)
    assert [json.loads(data)["userId"] for data in prepared.observed] == ["u1", "u5"]  # unplanned is a violation there


def test_the_queue_is_bounded_in_bytes_too() -> None:
    # 10,000 events of up to 32 KB each would be 320 MB waiting for checks: the bytes are bounded too.
    rules = compile_rules(PLANNED, env={"SEGMENT_URL": "http://127.0.0.1:9", "RUDDERSTACK_URL": "http://127.0.0.1:9"})
    metrics = Metrics()
    checks = PlanChecks(capacity=100, max_bytes=100_000)
    checks.register(web.Application(), metrics)
    event = b"{" + b" " * 30_000 + b"}"
    checks.submit(rules, "web", [event] * 5)
    assert metrics.registry.get_sample_value("splitter_tracking_plan_unchecked_total", {"source": "web"}) == 2


async def test_a_check_that_fails_in_block_mode_is_not_a_500() -> None:
    # A recursive schema and a deeply nested event (250 levels: orjson encodes up to 255) exhaust Python's
    # recursion limit in jsonschema. In block mode that ran inside prepare(): a 500, which SDKs retry
    # forever. A check that fails must cost that event's check, as in observe mode, not the request.
    recursive = SERVER_PLAN.replace(
        "json_schema: {required: [properties], properties: {properties: {required: [order_id]}}}",
        'json_schema: {$defs: {n: {type: [array, string], items: {$ref: "#/$defs/n"}}}, '
        'properties: {properties: {properties: {deep: {$ref: "#/$defs/n"}}}}}')
    async with proxy_stack(PLANNED.replace(SERVER_PLAN, recursive)) as running:
        body = b'{"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "m-deep", "properties": {"deep": ' \
               + b"[" * 250 + b"]" * 250 + b"}}"
        status, answer, _ = await running.post("/v1/track", body, key=SERVER_KEY)
        assert (status, answer) == (200, {"success": True})
        assert received(running) == ["m-deep"]
        status, answer, _ = await running.post("/v1/track", order("u2", deep=["x"]), key=SERVER_KEY)  # and checks still work
        assert status == 200
        status, answer, _ = await running.post("/v1/track", order("u3", deep=[1]), key=SERVER_KEY)
        assert (status, answer["code"]) == (400, "tracking_plan_violation")
