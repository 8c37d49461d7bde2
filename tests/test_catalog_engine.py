"""The event catalog's pure parts in the engine: event names, property paths and their types, masked
payload samples, the rules file's `catalog:` section, and the comparison with a tracking plan."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.engine import (
    MASK,
    NAME_FIELDS,
    OTHER,
    CatalogSettings,
    RulesError,
    SeenEvent,
    SeenPath,
    compare_with_plan,
    compile_plan,
    compile_rules,
    event_name,
    event_shape,
    masked_sample,
)
from proxy.engine.shapes import MAX_ITEMS
from tests.rules_texts import HEAD, lines

TAIL = "rules:\n  - name: default\n    route: segment\n"


# ---- names ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("event", "name"), [
    ({"type": "track", "event": "Order Completed"}, "Order Completed"),
    ({"type": "page", "name": "Home"}, "Home"),
    ({"type": "screen", "name": "Cart"}, "Cart"),
    ({"type": "identify", "traits": {"name": "Ada"}}, "identify"),  # identify, group and alias are named by their type
    ({"type": "group", "name": "not a group name"}, "group"),
    ({"type": "alias"}, "alias"),
    ({"type": "track", "event": 42}, "track"),  # a name that is not a string: the type
    ({"type": "page"}, "page"),
])
def test_an_event_is_named_by_its_name_field_or_its_type(event: dict[str, Any], name: str) -> None:
    assert event_name(event, event["type"]) == name


def test_delivery_files_events_under_the_same_names() -> None:
    from proxy.delivery.submission import NAME_FIELDS as delivery_names  # one definition, shared

    assert delivery_names is NAME_FIELDS


# ---- paths and types ------------------------------------------------------------------------------

def test_paths_and_json_types_of_properties_traits_and_context() -> None:
    event = {
        "type": "track", "event": "Order Completed", "userId": "u1", "messageId": "m1",
        "properties": {"price": 19.99, "qty": 2, "whole": 3.0, "coupon": None, "paid": True, "sku": "a", "tags": ["x", 1],
                       "cart": {"currency": "EUR", "items": [{"sku": "s1", "n": 1}, {"sku": 7}]}},
        "traits": {"plan": "team"},
        "context": {"ip": "10.0.0.1", "library": {"name": "analytics.js", "version": "5"}, "traits": {"email": "a@b.c", "address": {"city": "x"}}},
    }
    assert event_shape(event, max_depth=3, max_paths=300) == {
        "properties.price": {"number"},
        "properties.qty": {"integer"},
        "properties.whole": {"integer"},  # 3.0 is an integer, as in JSON Schema and the tracking plans
        "properties.coupon": {"null"},
        "properties.paid": {"boolean"},
        "properties.sku": {"string"},
        "properties.tags": {"array"},
        "properties.tags[]": {"string", "integer"},  # an array's items, mixed
        "properties.cart": {"object"},
        "properties.cart.currency": {"string"},
        "properties.cart.items": {"array"},
        "properties.cart.items[]": {"object"},
        "properties.cart.items[].sku": {"string", "integer"},
        "properties.cart.items[].n": {"integer"},
        "traits.plan": {"string"},
        "context.ip": {"string"},
        "context.library": {"object"},  # context's own keys only, not what is inside them...
        "context.traits.email": {"string"},  # ...except context.traits, walked like traits
        "context.traits.address": {"object"},
        "context.traits.address.city": {"string"},
    }


def test_paths_stop_at_the_depth_and_arrays_are_looked_into_up_to_a_few_items() -> None:
    event = {"properties": {"a": {"b": {"c": {"d": 1}}}, "list": [{"k": 1}] * MAX_ITEMS + [{"late": 1}], "nested": [[1]]}}
    shape = event_shape(event, max_depth=2, max_paths=300)
    assert shape["properties.a.b"] == {"object"}
    assert "properties.a.b.c" not in shape  # three keys below properties: past max_depth 2
    assert "properties.list[].k" in shape and "properties.list[].late" not in shape
    assert shape["properties.nested[]"] == {"array"} and "properties.nested[][]" not in shape  # an array in an array is a level deeper
    assert event_shape(event, max_depth=3, max_paths=300)["properties.nested[][]"] == {"integer"}


def test_a_container_that_is_not_an_object_is_recorded_as_itself() -> None:  # an object container is not a path: its members are
    assert event_shape({"properties": "oops", "traits": None, "context": [1]}, 3, 300) == {
        "properties": {"string"}, "traits": {"null"}, "context": {"array"}}


def test_paths_past_the_cap_or_too_long_go_under_other() -> None:
    event = {"properties": {f"p{i}": i for i in range(10)} | {"k" * 300: "long key"}}
    shape = event_shape(event, max_depth=3, max_paths=4)
    assert list(shape) == ["properties.p0", "properties.p1", "properties.p2", "properties.p3", OTHER]
    assert shape[OTHER] == {"integer", "string"}


def test_top_level_fields_and_values_are_not_paths() -> None:
    shape = event_shape({"type": "track", "event": "E", "userId": "secret-user", "properties": {"email": "secret@example.com"}}, 3, 300)
    assert shape == {"properties.email": {"string"}}
    assert "secret" not in repr(shape)


# ---- payload samples ------------------------------------------------------------------------------

def test_a_payload_sample_masks_every_string_but_the_allowed_paths() -> None:
    event = {"type": "track", "event": "Signed Up", "userId": "user-1", "messageId": "m-1", "timestamp": "2026-01-01T00:00:00Z",
             "properties": {"plan": "team", "email": "ada@example.com", "seats": 3, "paid": True, "coupon": None,
                            "items": [{"sku": "s1"}, {"sku": "s2"}], "card": {"last4": "4242"}},
             "context": {"library": {"name": "analytics.js"}, "writeKey": "nested-key"}}
    sample = masked_sample(event, frozenset({"properties.plan", "properties.items[].sku", "context.library.name"}), frozenset())
    assert sample == {
        "type": "track", "event": "Signed Up", "userId": MASK, "messageId": MASK, "timestamp": MASK,
        "properties": {"plan": "team", "email": MASK, "seats": 3, "paid": True, "coupon": None,
                       "items": [{"sku": "s1"}, {"sku": "s2"}], "card": {"last4": MASK}},
        "context": {"library": {"name": "analytics.js"}},  # a writeKey member is left out wherever it is
    }


def test_a_payload_sample_never_shows_a_write_key_even_on_an_allowed_path() -> None:
    event = {"type": "identify", "traits": {"note": "seg-web-key-0123456789", "plan": "team"}, "writeKey": "seg-web-key-0123456789"}
    sample = masked_sample(event, frozenset({"traits.note", "traits.plan"}), frozenset({"seg-web-key-0123456789"}))
    assert sample == {"type": "identify", "traits": {"note": MASK, "plan": "team"}}


def test_a_payload_sample_cuts_arrays_and_long_allowed_strings() -> None:
    sample = masked_sample({"type": "track", "event": "E", "properties": {"list": list(range(50)), "text": "x" * 500}},
                           frozenset({"properties.text"}), frozenset())
    assert sample["properties"]["list"] == list(range(MAX_ITEMS))
    assert len(sample["properties"]["text"]) == 200 and sample["properties"]["text"].endswith("...")


# ---- the catalog section of the rules file --------------------------------------------------------

def test_without_a_catalog_section_the_defaults_hold() -> None:
    rules = compile_rules(HEAD + TAIL)
    assert rules.catalog == CatalogSettings()
    assert (rules.catalog.enabled, rules.catalog.max_events, rules.catalog.max_paths, rules.catalog.payload_samples) == (True, 4000, 300, False)


def test_every_catalog_key_is_read() -> None:
    rules = compile_rules(HEAD + TAIL + """\
catalog:
  enabled: true
  max_events: 50
  max_paths: 20
  max_depth: 2
  schema_samples: 5
  sample_every: 10
  snapshot_interval: 500ms
  payload_samples: true
  unmasked_paths:
    - properties.plan
    - properties.items[].sku
""")
    assert rules.catalog == CatalogSettings(True, 50, 20, 2, 5, 10, 0.5, True, frozenset({"properties.plan", "properties.items[].sku"}))


@pytest.mark.parametrize("text", ["catalog: off", "catalog: false", "catalog: {enabled: false}"])
def test_the_catalog_can_be_turned_off(text: str) -> None:
    assert compile_rules(HEAD + TAIL + text + "\n").catalog.enabled is False


@pytest.mark.parametrize(("text", "message"), [
    ("{max_events: 0}", "catalog.max_events: must be a whole number between 1 and 100,000, not 0"),
    ("{max_paths: 2.5}", "catalog.max_paths: must be a whole number between 1 and 10,000, not 2.5"),
    ("{max_depth: 11}", "catalog.max_depth: must be a whole number between 1 and 10, not 11"),
    ("{sample_every: lots}", "catalog.sample_every: must be a number, not 'lots'"),
    ("{snapshot_interval: 2h}", "catalog.snapshot_interval: must be between 100ms and 1h, not 7200s"),
    ("{snapshot_interval: soon}", "catalog.snapshot_interval: must be a duration such as 90s, 10m or 1h (a bare number is seconds), not 'soon'"),
    ("{payload_samples: yes please}", "catalog.payload_samples: must be true or false, not 'yes please'"),
    ("{unmasked_paths: [properties..plan]}", "catalog.unmasked_paths: 'properties..plan' is not a path"),
    ("{samples: 3}", "catalog.samples: unknown key 'samples'"),
])
def test_catalog_problems_name_the_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(RulesError) as caught:
        compile_rules(HEAD + TAIL + f"catalog: {text}\n", filename="rules.yaml")
    line = lines(HEAD + TAIL) + 1
    assert any(problem.startswith(f"rules.yaml:{line}: {message}") for problem in caught.value.lines), caught.value.lines


# ---- against a tracking plan ----------------------------------------------------------------------

PLAN = b"""\
allow_unplanned_events: false
events:
  Order Completed:
    required: [order_id, total]
    properties:
      order_id: {type: string}
      total: {type: number}
      coupon: {type: [string, "null"]}
  Signed Up:
    required: [plan]
  Refunded:
    json_schema:
      type: object
      properties:
        properties:
          type: object
          required: [amount]
          properties:
            amount: {type: number}
            reason: {enum: [late, other]}
identify:
  traits:
    age: {type: integer}
"""


def seen(event_type: str, name: str, total: int, sampled: int = 0, **paths: dict[str, int]) -> SeenEvent:
    return SeenEvent(event_type, name, total, sampled, {path.replace("__", "."): SeenPath(sum(types.values()), types) for path, types in paths.items()})


def test_the_comparison_finds_unplanned_unseen_type_breaks_and_missing_required_properties() -> None:
    plan = compile_plan(PLAN, "plan.yaml", {})
    events = [
        seen("track", "Order Completed", 100, 10, properties__order_id={"string": 10}, properties__total={"integer": 6, "number": 2, "string": 2},
             properties__coupon={"null": 4, "string": 3}),
        seen("track", "Refunded", 5, 5, properties__amount={"string": 1, "number": 4}),
        seen("track", "Debug Ping", 7),
        seen("page", "Home", 40),  # pages are outside any plan: neither unplanned nor compared
        seen("identify", "identify", 3, 3, traits__age={"number": 1, "integer": 2}),
    ]
    found = compare_with_plan(events, plan)
    assert [(e.type, e.name, e.total) for e in found.unplanned] == [("track", "Debug Ping", 7)]
    assert found.unseen == ("Signed Up",)
    assert [(b.event, b.path, b.expected, dict(b.observed), b.sampled) for b in found.type_breaks] == [
        ("Order Completed", "properties.total", ("number",), {"string": 2}, 10),  # integers are numbers: only the strings break it
        ("Refunded", "properties.amount", ("number",), {"string": 1}, 5),  # from the JSON Schema
        ("identify", "traits.age", ("integer",), {"number": 1}, 3),
    ]
    assert found.missing_required == ()  # every required property was in every sample
    assert found.as_dict()["never_seen"] == ["Signed Up"]
    assert [found.status(t, n) for t, n in (("track", "Refunded"), ("track", "Debug Ping"), ("page", "Home"), ("identify", "identify"))] == [
        "planned", "not planned", "not covered", "planned"]
    without_identify = compare_with_plan(events, compile_plan(b"events: {Refunded: {}}\n", "plan.yaml", {}))
    assert without_identify.status("identify", "identify") == "not covered"  # a plan without identify does not check identify calls


def test_a_required_property_missing_from_some_samples_is_reported() -> None:
    plan = compile_plan(PLAN, "plan.yaml", {})
    found = compare_with_plan([seen("track", "Order Completed", 9, 4, properties__order_id={"string": 3, "null": 1})], plan)
    assert [(m.path, m.seen, m.sampled) for m in found.missing_required] == [("properties.order_id", 3, 4), ("properties.total", 0, 4)]


def test_a_plan_file_with_a_mistake_is_refused_with_its_line() -> None:
    with pytest.raises(RulesError) as caught:
        compile_plan(b"events:\n  E:\n    properties:\n      p: {type: decimal}\n", "plans/web.yaml", {})
    assert caught.value.lines[0].startswith("plans/web.yaml:4: events.E.properties.p.type: unknown type 'decimal'")
