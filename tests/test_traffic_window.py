"""The window of recent traffic a reload replays: what it keeps of an event, and how much."""

from __future__ import annotations

import time

from proxy.control.traffic import RecentTraffic
from proxy.engine import EventContext, compile_rules, decide

RULES = compile_rules(
    """\
version: 1
destinations:
  segment: {kind: segment, url: "http://127.0.0.1:9"}
  rudderstack: {kind: rudderstack, url: "http://127.0.0.1:9"}
sources: [{name: web, write_keys: [web-key-0123456789]}]
cohort: {key: [anonymousId, context.traits.account]}
rules:
  - name: ios-new
    when: {app_version: ">=4.2", os: iOS, library: analytics-ios, country: DE}
    route: rudderstack
  - name: split
    route: {split: {rudderstack: 30, segment: 70}}
""",
    env={},
)
CTX = EventContext("web", "eu", "DE")


def full_event(user: str) -> dict[str, object]:
    return {
        "type": "track", "event": "Order Completed", "anonymousId": user, "writeKey": "web-key-0123456789",
        "properties": {"email": "someone@example.com", "total": 12.5}, "traits": {"name": "Someone"},
        "context": {"app": {"version": "4.3.0"}, "os": {"name": "iOS"}, "library": {"name": "analytics-ios"},
                    "location": {"country": "DE", "city": "Berlin"}, "traits": {"account": "acct-1", "email": "someone@example.com"},
                    "ip": "203.0.113.9"},
    }


def test_only_what_routing_reads_is_kept_and_it_routes_the_same() -> None:
    window = RecentTraffic()
    event = full_event("user-1")
    window.record(RULES, [event], CTX)
    [(view, ctx)] = window.snapshot()
    assert view == {"type": "track", "event": "Order Completed", "anonymousId": "user-1",
                    "context": {"app": {"version": "4.3.0"}, "os": {"name": "iOS"}, "library": {"name": "analytics-ios"},
                                "location": {"country": "DE"}, "traits": {"account": "acct-1"}}}
    assert ctx == CTX
    assert "web-key" not in repr(view) and "example.com" not in repr(view) and "Berlin" not in repr(view)
    assert decide(RULES, view, ctx) == decide(RULES, event, CTX)
    without_id = {k: v for k, v in full_event("x").items() if k != "anonymousId"}
    window.record(RULES, [without_id], CTX)
    assert decide(RULES, window.snapshot()[-1][0], CTX) == decide(RULES, without_id, CTX)  # the nested cohort key is kept


def test_the_window_is_bounded_per_request_and_in_all() -> None:
    window = RecentTraffic(capacity=100, per_request=10)
    window.record(RULES, [full_event(f"u{i}") for i in range(50)] + ["not an event"], CTX)
    assert len(window) == 10
    for batch in range(20):
        window.record(RULES, [full_event(f"b{batch}-{i}") for i in range(10)], CTX)
    assert len(window) == 100 and window.snapshot()[-1][0]["anonymousId"] == "b19-9"  # the most recent kept


def test_a_busy_proxy_samples_a_request_per_interval() -> None:
    window = RecentTraffic(interval=0.05)
    assert window.due() and not window.due() and not window.due()
    time.sleep(0.06)
    assert window.due()
