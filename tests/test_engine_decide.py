"""`decide()`: every condition, every route form, cohort keys and buckets; plus the RuleSet helpers
and the batch-envelope semantics the proxy and `splitter explain` share."""

from __future__ import annotations

import functools
import itertools
import json
from typing import Any

import pytest

from proxy.engine import (
    Decision,
    EventContext,
    RuleSet,
    bucket,
    compile_rules,
    decide,
    events_of_body,
    merge_envelope,
)
from tests.rules_texts import HEAD_WITH_WAREHOUSE, WEB_KEY

HEAD = HEAD_WITH_WAREHOUSE + """\
  - {name: ios, write_keys: [ios-key-000001, ios-key-000002]}
  - {name: android, write_keys: [and-key-000001]}
"""  # destinations segment, rudderstack, warehouse; sources web, ios, android
WEB = EventContext(source="web")


def compile_(body: str) -> RuleSet:
    return compile_rules(HEAD + body, env={})


@functools.cache
def when(condition: str) -> RuleSet:
    """A rule `hit` (to rudderstack) with the given `when`, then the default rule (to segment)."""
    return compile_(f"rules:\n  - name: hit\n    when: {condition}\n    route: rudderstack\n  - name: default\n    route: segment\n")


def hits(condition: str, event: dict[str, Any], ctx: EventContext = EventContext()) -> bool:
    decision = decide(when(condition), event, ctx)
    assert decision.primary == (("rudderstack",) if decision.rule == "hit" else ("segment",))
    return decision.rule == "hit"


@functools.cache
def route(spec: str, cohort: str = "") -> RuleSet:
    return compile_(cohort + f"rules:\n  - name: only\n    route: {spec}\n")


def app(version: Any) -> dict[str, Any]:
    return {"type": "track", "context": {"app": {"version": version}}}


# --- conditions -----------------------------------------------------------------------------------


def test_source_single_and_list() -> None:
    assert hits("{source: web}", {}, WEB)
    assert not hits("{source: web}", {}, EventContext(source="ios"))
    assert not hits("{source: web}", {}, EventContext())
    assert hits("{source: [ios, android]}", {}, EventContext(source="android"))
    assert not hits("{source: [ios, android]}", {}, WEB)


def test_type() -> None:
    assert hits("{type: identify}", {"type": "identify"})
    assert not hits("{type: identify}", {"type": "track"})
    assert not hits("{type: identify}", {})
    assert hits("{type: [page, screen]}", {"type": "screen"})
    assert not hits("{type: [page, screen]}", {"type": "Page"})


@pytest.mark.parametrize(
    "pattern, name, expected",
    [
        ("Order Completed", "Order Completed", True),
        ("Order Completed", "order completed", False),
        ("Order Completed", "Order Completed ", False),
        ("Order *", "Order Completed", True),
        ("Order *", "Order ", True),
        ("Order *", "Orders", False),
        ("Order *", "The Order X", False),
        ("*Viewed", "Product Viewed", True),
        ("*Viewed", "product viewed", False),
        ("*", "anything\nat all", True),
        ("Step ?", "Step 1", True),
        ("Step ?", "Step 12", False),
        ("Step ?", "Step ", False),
        ("Product Viewed [v2]", "Product Viewed [v2]", True),
        ("Product Viewed [v2]", "Product Viewed v", False),
        ("Viewed [*]", "Viewed [x]", True),
        ("Viewed [*]", "Viewed x", False),
        ("a.b+(c)*", "a.b+(c) d", True),
        ("a.b+(c)*", "axb+(c)", False),
    ],
)
def test_event_name_patterns(pattern: str, name: str, expected: bool) -> None:
    assert hits(f"{{event: {json.dumps(pattern)}}}", {"type": "track", "event": name}) is expected


def test_event_list_mixes_exact_names_and_globs_and_needs_a_string() -> None:
    condition = '{event: ["Signed Up", "Order *"]}'
    assert hits(condition, {"event": "Signed Up"})
    assert hits(condition, {"event": "Order Refunded"})
    assert not hits(condition, {"event": "Signed Out"})
    assert not hits(condition, {"type": "track"})
    assert not hits(condition, {"event": 42})
    assert not hits('{event: "4*"}', {"event": 42})


@pytest.mark.parametrize(
    "condition, event",
    [
        ('{event: "Signed Up"}', {"type": "track", "event": ["Signed Up"]}),
        ('{event: "Signed Up"}', {"type": "track", "event": {"name": "Signed Up"}}),
        ("{library: analytics.js}", {"type": "track", "context": {"library": {"name": ["analytics.js"]}}}),
        ("{type: track}", {"type": ["track"]}),
    ],
)
def test_unhashable_field_values_do_not_match_and_do_not_crash(condition: str, event: dict[str, Any]) -> None:
    assert not hits(condition, event)


def test_region_is_the_proxy_region_case_insensitive() -> None:
    assert hits("{region: EU}", {}, EventContext(region="eu"))
    assert hits("{region: [us, eu]}", {}, EventContext(region="Eu"))
    assert not hits("{region: eu}", {}, EventContext(region="eu-west"))
    assert not hits("{region: eu}", {}, EventContext(region=None))
    assert not hits("{region: eu}", {"context": {"location": {"region": "eu"}}})


def location(country: Any) -> dict[str, Any]:
    return {"type": "track", "context": {"location": {"country": country}}}


def test_country_from_the_request_context() -> None:
    assert hits("{country: [de, FR]}", {}, EventContext(country="DE"))
    assert hits("{country: [de, FR]}", {}, EventContext(country="FR"))
    assert not hits("{country: [de, FR]}", {}, EventContext(country="US"))
    assert not hits("{country: [de, FR]}", {})


def test_country_falls_back_to_the_event_location_in_any_case() -> None:
    assert hits("{country: DE}", location("de"))
    assert hits("{country: de}", location("DE"))
    assert not hits("{country: DE}", location("Germany"))
    assert not hits("{country: DE}", location(None))
    assert not hits("{country: DE}", location(49))
    assert not hits("{country: DE}", {"context": {"location": "DE"}})
    assert not hits("{country: DE}", {"context": "DE"})


def test_country_of_the_request_wins_over_the_event() -> None:
    assert not hits("{country: DE}", location("DE"), EventContext(country="US"))
    # and the other way round (a German request, an event located in the US): tests/golden/decisions/country-header


# "<4.2.0" against versions as apps report them (v prefix, build suffix, spaces, pre-release) is the legacy-builds
# rule of tests/golden/decisions/app-version, one event each.
RANGE_CASES = [
    (">=3.0,<4.2.0", "3.0", True), (">=3.0,<4.2.0", "3", True), (">=3.0,<4.2.0", "2.9.9", False),
    (">=3.0,<4.2.0", "4.1.99", True), (">=3.0,<4.2.0", "4.2.0", False), (">=3.0,<4.2.0", "3.0.0-rc.1", False),
    ("<4.2.1", "4.2.1-beta.1", True), ("<4.2.1", "4.2.1", False), (">=4.2.1", "4.2.1-beta.1", False), (">=4.2.1", "4.2.1.0", True),
    (">4.2.1", "4.2.1.1", True), ("==4.2", "4.2.0", True), ("4.2", "4.2.0.0", True), ("=4.2", "4.2.1", False),
    ("!=4.2", "4.2.0", False), ("!=4.2", "4.3", True), ("<=4.2", "4.2.0", True), ("<=4.2", "4.2.0.1", False),
    (">4.2.1-beta.1", "4.2.1-beta.2", True), (">4.2.1-beta.2", "4.2.1-beta.10", True),
    (">4.2.1-beta.1", "4.2.1-alpha.9", False), (">4.2.1-beta", "4.2.1-beta.1", True),
]


@pytest.mark.parametrize("version_range, version, expected", RANGE_CASES)
def test_app_version_ranges(version_range: str, version: str, expected: bool) -> None:
    assert hits(f'{{app_version: "{version_range}"}}', app(version)) is expected


def test_app_version_list_means_any_of() -> None:
    condition = '{app_version: ["<2.0", ">=5"]}'
    assert hits(condition, app("1.5"))
    assert hits(condition, app("5.0.1"))
    assert not hits(condition, app("3.0"))


@pytest.mark.parametrize("version", [None, "", "latest", "beta-4.2", "4..2", True, [4, 2], {"v": 4}])
def test_missing_or_unreadable_version_matches_no_range(version: Any) -> None:
    assert not hits('{app_version: "!=9.9.9"}', app(version))
    assert not hits('{app_version: "<100"}', app(version))


def test_app_version_missing_from_the_event() -> None:
    assert not hits('{app_version: "!=9.9.9"}', {"type": "track"})
    assert not hits('{app_version: "!=9.9.9"}', {"context": {"app": "4.2"}})


def test_numeric_versions_from_json() -> None:
    assert hits('{app_version: ">=4,<5"}', app(4))
    assert not hits('{app_version: ">=4,<5"}', app(5))
    assert hits('{app_version: ">4.1,<4.3"}', app(4.2))


def test_os_is_case_insensitive() -> None:
    assert hits("{os: iOS}", {"context": {"os": {"name": "ios"}}})
    assert hits("{os: [android, IOS]}", {"context": {"os": {"name": "iOS"}}})
    assert not hits("{os: iOS}", {"context": {"os": {"name": "iPadOS"}}})
    assert not hits("{os: iOS}", {"context": {"os": {}}})
    assert not hits("{os: iOS}", {"context": {"os": {"name": 1}}})


def test_library_is_exact() -> None:
    assert hits("{library: analytics.js}", {"context": {"library": {"name": "analytics.js"}}})
    assert not hits("{library: analytics.js}", {"context": {"library": {"name": "Analytics.js"}}})
    assert hits("{library: [analytics-ios, analytics-android]}", {"context": {"library": {"name": "analytics-android"}}})
    assert not hits("{library: analytics.js}", {"context": {}})


def test_all_conditions_of_a_rule_must_hold() -> None:
    condition = '{source: ios, type: track, event: "Order *", os: ios, app_version: ">=4"}'
    event = {"type": "track", "event": "Order Done", "context": {"os": {"name": "iOS"}, "app": {"version": "4.0.1"}}}
    ios = EventContext(source="ios")
    assert hits(condition, event, ios)
    assert not hits(condition, event, WEB)
    assert not hits(condition, {**event, "type": "screen"}, ios)
    assert not hits(condition, {**event, "event": "Signed Up"}, ios)
    assert not hits(condition, {**event, "context": {"os": {"name": "iOS"}, "app": {"version": "3.9"}}}, ios)


def test_first_matching_rule_wins_and_the_default_catches_the_rest() -> None:
    rules = compile_("""\
rules:
  - name: ios-orders
    when: {source: ios, event: "Order *"}
    route: warehouse
  - name: ios
    when: {source: ios}
    route: rudderstack
  - name: orders
    when: {event: "Order *"}
    route: [segment, rudderstack]
  - name: default
    route: segment
""")
    order = {"type": "track", "event": "Order Done"}
    assert decide(rules, order, EventContext(source="ios")).rule == "ios-orders"
    assert decide(rules, {"type": "track"}, EventContext(source="ios")).rule == "ios"
    assert decide(rules, order, WEB).rule == "orders"
    assert decide(rules, {"type": "identify"}, WEB).rule == "default"
    assert decide(rules, {}).rule == "default"
    assert [r.when_text for r in rules.rules] == [{"source": "ios", "event": "Order *"}, {"source": "ios"}, {"event": "Order *"}, {}]


# --- route forms ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, primary, mirror",
    [
        ("segment", ("segment",), ()),
        ("[rudderstack, segment]", ("rudderstack", "segment"), ()),
        ("{to: [warehouse, segment]}", ("warehouse", "segment"), ()),
        ("{to: segment, mirror: [rudderstack, warehouse]}", ("segment",), ("rudderstack", "warehouse")),
        ("{to: [segment], mirror: rudderstack}", ("segment",), ("rudderstack",)),
    ],
)
def test_routes_without_a_split(spec: str, primary: tuple[str, ...], mirror: tuple[str, ...]) -> None:
    rules = route(spec)
    decision = decide(rules, {"anonymousId": "a1"})
    assert decision == Decision("only", primary, mirror, None, None)
    assert decision is rules.rules[0].decision
    assert decide(rules, {"userId": "other"}) is decision


def test_decision_as_dict_has_exactly_the_documented_keys() -> None:
    fixed = decide(route("{to: segment, mirror: [rudderstack]}"), {})
    assert fixed.as_dict() == {"rule": "only", "primary": ["segment"], "mirror": ["rudderstack"], "bucket": None, "cohort_key": None}
    split = decide(route("{split: {rudderstack: 100}}"), {"userId": "u"}).as_dict()
    assert list(split) == ["rule", "primary", "mirror", "bucket", "cohort_key"]
    assert split == {"rule": "only", "primary": ["rudderstack"], "mirror": [], "bucket": bucket("splitter", "u"), "cohort_key": "userId"}


@functools.cache
def key_in_bucket_range(salt: str, low: int, high: int) -> str:
    """A generated key whose bucket is in [low, high)."""
    for i in itertools.count():
        key = f"user-{i}"
        if low <= bucket(salt, key) < high:
            return key
    raise AssertionError


def test_split_with_to() -> None:
    rules = route("{split: {rudderstack: 50, segment: 50}, to: [warehouse]}")
    low = decide(rules, {"anonymousId": key_in_bucket_range("splitter", 0, 5000)})
    high = decide(rules, {"anonymousId": key_in_bucket_range("splitter", 5000, 10000)})
    assert (low.primary, low.mirror) == (("rudderstack", "warehouse"), ())
    assert (high.primary, high.mirror) == (("segment", "warehouse"), ())


def test_split_arm_that_is_also_in_to_is_primary_once() -> None:
    rules = route("{split: {rudderstack: 50, segment: 50}, to: [segment]}")
    assert decide(rules, {"anonymousId": key_in_bucket_range("splitter", 0, 5000)}).primary == ("rudderstack", "segment")
    assert decide(rules, {"anonymousId": key_in_bucket_range("splitter", 5000, 10000)}).primary == ("segment",)


def test_split_with_mirror_never_sends_the_chosen_arm_twice() -> None:
    rules = route("{split: {rudderstack: 50, segment: 50}, mirror: [segment, warehouse]}")
    to_rs = decide(rules, {"anonymousId": key_in_bucket_range("splitter", 0, 5000)})
    to_seg = decide(rules, {"anonymousId": key_in_bucket_range("splitter", 5000, 10000)})
    assert (to_rs.primary, to_rs.mirror) == (("rudderstack",), ("segment", "warehouse"))
    assert (to_seg.primary, to_seg.mirror) == (("segment",), ("warehouse",))
    assert rules.rules[0].decision is None
    assert rules.rules[0].arms == ((5000, Decision("only", ("rudderstack",), ("segment", "warehouse"))), (10000, Decision("only", ("segment",), ("warehouse",))))


# --- cohort keys and buckets ----------------------------------------------------------------------

SPLIT = "{split: {rudderstack: 50, warehouse: 49.99, segment: 0.01}}"  # bucket 9999 alone goes to segment


@pytest.mark.parametrize(
    "event, key, field",
    [
        ({"anonymousId": "anon-1", "userId": "user-1"}, "anon-1", "anonymousId"),
        ({"userId": "user-1"}, "user-1", "userId"),
        ({"anonymousId": "", "userId": "user-1"}, "user-1", "userId"),
        ({"anonymousId": "   ", "userId": "user-1"}, "user-1", "userId"),
        ({"anonymousId": None, "userId": "user-1"}, "user-1", "userId"),
        ({"anonymousId": True, "userId": "user-1"}, "user-1", "userId"),
        ({"anonymousId": {"id": "x"}, "userId": "user-1"}, "user-1", "userId"),
        ({"anonymousId": ["x"], "userId": "user-1"}, "user-1", "userId"),
        ({"userId": 42}, "42", "userId"),
        ({"userId": 42.0}, "42", "userId"),
        ({"anonymousId": 7, "userId": "u"}, "7", "anonymousId"),
        ({"anonymousId": " padded "}, " padded ", "anonymousId"),
    ],
)
def test_cohort_key_is_the_first_usable_field_as_text(event: dict[str, Any], key: str, field: str) -> None:
    decision = decide(route(SPLIT, "cohort: {salt: s1}\n"), event)
    assert (decision.bucket, decision.cohort_key) == (bucket("s1", key), field)


# An event without a usable cohort key (none, blank, false, an object) takes bucket 9999 and so the last arm:
# tests/golden/decisions/cohort-split.


def test_dotted_cohort_key_paths() -> None:
    rules = route(SPLIT, "cohort: {key: [context.traits.email, userId], salt: s2}\n")
    by_email = decide(rules, {"userId": "u", "context": {"traits": {"email": "a@b.test"}}})
    assert (by_email.bucket, by_email.cohort_key) == (bucket("s2", "a@b.test"), "context.traits.email")
    for context in ({"traits": {}}, {"traits": "a@b.test"}, "x", None):
        fallback = decide(rules, {"userId": "u", "context": context})
        assert (fallback.bucket, fallback.cohort_key) == (bucket("s2", "u"), "userId")


def test_default_cohort_is_anonymous_id_then_user_id_with_salt_splitter() -> None:
    rules = route(SPLIT)
    assert rules.cohort.fields == ("anonymousId", "userId") and rules.cohort.salt == "splitter"
    assert decide(rules, {"anonymousId": "a", "userId": "u"}).bucket == bucket("splitter", "a")


def test_per_rule_cohort_overrides_salt_and_or_key_and_inherits_the_rest() -> None:
    rules = compile_(f"""\
cohort: {{key: [userId, anonymousId], salt: top}}
rules:
  - name: salt-only
    when: {{source: web}}
    cohort: {{salt: mine}}
    route: {SPLIT}
  - name: key-only
    when: {{source: ios}}
    cohort: {{key: context.device.id}}
    route: {SPLIT}
  - name: both
    when: {{source: android}}
    cohort: {{key: anonymousId, salt: ""}}
    route: {SPLIT}
  - name: default
    route: {SPLIT}
""")
    event = {"anonymousId": "a", "userId": "u", "context": {"device": {"id": "d"}}}
    assert decide(rules, event, WEB).bucket == bucket("mine", "u")
    assert decide(rules, event, EventContext(source="ios")).bucket == bucket("top", "d")
    assert decide(rules, event, EventContext(source="android")).bucket == bucket("", "a")
    assert decide(rules, event).bucket == bucket("top", "u")
    assert decide(rules, {"anonymousId": "a"}, EventContext(source="ios")) == Decision("key-only", ("segment",), (), 9999, None)


KEYS = [f"k{i}" for i in range(2000)]


def test_zero_percent_arm_is_never_chosen_and_hundred_always() -> None:
    first_zero = route("{split: {rudderstack: 0, segment: 100}}")
    last_zero = route("{split: {rudderstack: 100, segment: 0}}")
    assert {decide(first_zero, {"userId": k}).primary for k in KEYS} == {("segment",)}
    assert {decide(last_zero, {"userId": k}).primary for k in KEYS} == {("rudderstack",)}
    assert decide(last_zero, {}).primary == ("rudderstack",)  # the 0 % last arm does not even get bucket 9999


def test_split_boundary_five_percent() -> None:
    rules = route("{split: {rudderstack: 5, segment: 95}}", "cohort: {salt: edge}\n")
    assert rules.rules[0].arms == ((500, Decision("only", ("rudderstack",), ())), (10000, Decision("only", ("segment",), ())))
    for target, expected in ((0, "rudderstack"), (499, "rudderstack"), (500, "segment"), (9998, "segment")):
        key = key_in_bucket_range("edge", target, target + 1)
        decision = decide(rules, {"anonymousId": key})
        assert (decision.bucket, decision.primary) == (target, (expected,))


def test_split_shares_follow_percents() -> None:
    rules = route("{split: {rudderstack: 25, warehouse: 25, segment: 50}}")
    counts = {"rudderstack": 0, "warehouse": 0, "segment": 0}
    for key in KEYS:
        decision = decide(rules, {"anonymousId": key})
        counts[decision.primary[0]] += 1
        expected = "rudderstack" if decision.bucket < 2500 else "warehouse" if decision.bucket < 5000 else "segment"
        assert decision.primary == (expected,)
    assert all(abs(n / len(KEYS) - share) < 0.05 for n, share in zip(counts.values(), (0.25, 0.25, 0.5)))


# --- RuleSet helpers ------------------------------------------------------------------------------


def test_country_from_headers_default_order() -> None:
    rules = route("segment")
    assert rules.country_headers == ("CF-IPCountry", "CloudFront-Viewer-Country", "X-Country")
    assert rules.country_from_headers({"X-Country": "de", "CloudFront-Viewer-Country": " fr "}) == "FR"
    assert rules.country_from_headers({"X-Country": "de", "CF-IPCountry": "us", "CloudFront-Viewer-Country": "fr"}) == "US"
    assert rules.country_from_headers({"CF-IPCountry": "", "X-Country": "de"}) == "DE"
    assert rules.country_from_headers({"X-Geo": "de"}) is None
    assert rules.country_from_headers({}) is None


def test_custom_country_headers() -> None:
    rules = compile_("country_headers: [X-Geo, X-Country]\nrules: [{name: d, route: segment}]\n")
    assert rules.country_from_headers({"CF-IPCountry": "us", "X-Country": "de"}) == "DE"
    assert rules.country_from_headers({"X-Country": "de", "X-Geo": "nl"}) == "NL"
    assert rules.country_from_headers({"CF-IPCountry": "us"}) is None


def test_blank_country_header_is_skipped() -> None:
    assert route("segment").country_from_headers({"CF-IPCountry": "  ", "X-Country": "de"}) == "DE"


def test_source_for_key() -> None:
    rules = route("segment")
    assert rules.source_for_key("ios-key-000002").name == "ios"
    assert rules.source_for_key(WEB_KEY) is rules.sources["web"]
    assert rules.source_for_key("nope") is None
    assert rules.source_for_key("") is None
    assert rules.source_for_key(None) is None


# --- batch envelope -------------------------------------------------------------------------------


def test_merge_envelope_event_values_win() -> None:
    envelope = {"context": {"ip": "1.1.1.1", "library": {"name": "env"}}, "integrations": {"All": False}, "sentAt": "T1"}
    event = {"type": "track", "context": {"library": {"name": "own"}}, "integrations": {"Amplitude": True}}
    merged = merge_envelope(envelope, event)
    assert merged is event
    assert event == {
        "type": "track",
        "context": {"ip": "1.1.1.1", "library": {"name": "own"}},
        "integrations": {"All": False, "Amplitude": True},
        "sentAt": "T1",
    }
    assert envelope["context"] == {"ip": "1.1.1.1", "library": {"name": "env"}}


def test_merge_envelope_sent_at_only_when_absent_and_copies_context() -> None:
    envelope = {"context": {"ip": "1.1.1.1"}, "sentAt": "T1"}
    own = merge_envelope(envelope, {"sentAt": "T0"})
    assert own == {"context": {"ip": "1.1.1.1"}, "sentAt": "T0"}
    own["context"]["ip"] = "changed"
    assert envelope["context"] == {"ip": "1.1.1.1"}
    assert merge_envelope({"context": {}, "integrations": "x", "sentAt": None}, {"type": "page"}) == {"type": "page"}
    assert merge_envelope({"context": {"a": 1}}, {"context": "junk"}) == {"context": {"a": 1}}


def test_events_of_body_batch() -> None:
    body = {"writeKey": "web-key-000001", "context": {"app": {"version": "4.0"}}, "sentAt": "T", "batch": [{"type": "track"}, 7, {"type": "page", "context": {"os": {"name": "iOS"}}}]}
    events, key = events_of_body(body)
    assert key == "web-key-000001"
    assert events == [
        {"type": "track", "context": {"app": {"version": "4.0"}}, "sentAt": "T"},
        7,
        {"type": "page", "context": {"app": {"version": "4.0"}, "os": {"name": "iOS"}}, "sentAt": "T"},
    ]
    assert hits('{app_version: ">=4"}', events[0])


def test_events_of_body_single_and_odd_bodies() -> None:
    single = {"type": "track", "writeKey": "k", "event": "X"}
    assert events_of_body(single) == ([single], "k")
    assert events_of_body({"batch": [], "writeKey": 5}) == ([], None)
    assert events_of_body({"batch": "nope"}) == ([{"batch": "nope"}], None)
    assert events_of_body([1, 2]) == ([[1, 2]], None)


# --- remembered first matches ---------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from proxy.engine.conditions import CONDITION_NAMES  # noqa: E402
from proxy.engine.evaluate import SIGNATURE_CONDITIONS  # noqa: E402
from proxy.engine.evaluate import shared_decision as hot_route  # noqa: E402

EVERY_CONDITION = compile_("""\
rules:
  - {name: old-ios, when: {source: ios, app_version: "<4.2"}, route: segment}
  - {name: eu, when: {region: [eu-west-1]}, route: {split: {rudderstack: 50, segment: 50}}}
  - {name: checkout, when: {type: track, event: ["Checkout *", "Order Completed"]}, route: {to: [segment], mirror: [rudderstack]}}
  - {name: german, when: {country: [DE]}, route: rudderstack}
  - {name: droid, when: {os: android, library: [analytics-android]}, route: warehouse}
  - {name: rest, route: {split: {rudderstack: 30, segment: 70}}}
""")
scalar = st.none() | st.sampled_from(["track", "identify", "Checkout Started", "Order Completed", "DE", "de", "FR", "4.1.0", "4.2",
                                      "android", "Android", "analytics-android", "iOS", ""]) | st.integers(0, 5) | st.booleans() | st.floats(0, 5)
section = st.none() | st.integers() | st.fixed_dictionaries({}, optional={"version": scalar, "name": scalar, "country": scalar})
events = st.fixed_dictionaries({}, optional={
    "type": scalar, "event": scalar, "anonymousId": st.text(max_size=6),
    "context": st.none() | st.lists(scalar, max_size=1) | st.fixed_dictionaries(
        {}, optional={"app": section, "os": section, "library": section, "location": section}),
})
contexts = st.builds(EventContext, st.sampled_from([None, "web", "ios"]), st.sampled_from([None, "eu-west-1"]), st.sampled_from([None, "DE", "US"]))


def test_the_routing_signature_covers_every_condition() -> None:
    assert set(CONDITION_NAMES) == SIGNATURE_CONDITIONS  # a new condition must say what it reads


@settings(max_examples=400, deadline=None, database=None)
@given(batch=st.lists(st.tuples(events, contexts), min_size=1, max_size=30))
def test_property_a_remembered_first_match_is_the_rule_the_conditions_pick(batch: list[tuple[dict[str, Any], EventContext]]) -> None:
    for event, ctx in batch + batch:  # twice: the second pass is answered from memory where it can be
        expected = next(rule for rule in EVERY_CONDITION.rules
                        if all(c(event, ctx) for c in (*rule.context_conditions, *rule.event_conditions)))
        assert decide(EVERY_CONDITION, event, ctx).rule == expected.name


@settings(max_examples=300, deadline=None, database=None)
@given(batch=st.lists(st.tuples(events, contexts), min_size=1, max_size=20))
def test_property_route_is_decide_without_the_bucket(batch: list[tuple[dict[str, Any], EventContext]]) -> None:
    for event, ctx in batch:
        full, hot = decide(EVERY_CONDITION, event, ctx), hot_route(EVERY_CONDITION, event, ctx)
        assert (hot.rule, hot.primary, hot.mirror, hot.bucket, hot.cohort_key) == (full.rule, full.primary, full.mirror, None, None)
