"""Tracking plans in the engine: both plan forms, every violation kind, and every compile error in full."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxy.engine import EventContext, RulesError, Violation, compile_rules, load_rules, plan_files
from proxy.engine.plan_report import check_plans, plan_report_lines
from proxy.engine.tracking import KINDS
from tests.rules_texts import HEAD, lines

PLAN = lines(HEAD) + 1  # the line of the `tracking_plan:` appended to HEAD's source web; a plan's lines count from it
TAIL = "rules:\n  - name: default\n    route: segment\n"

SIMPLE_PLAN = """\
tracking_plan:
  allow_unplanned_events: false
  events:
    Order Completed:
      required: [order_id, total]
      properties:
        order_id: {type: string}
        total: {type: number}
        currency: {type: string, enum: [USD, EUR]}
        coupon: {type: [string, "null"]}
        seats: {type: integer}
        paid: {type: boolean, enum: [true]}
    Checked Out: {}
  identify:
    required: [email]
    traits:
      email: {type: string}
"""
SCHEMA_PLAN = """\
tracking_plan:
  mode: block
  events:
    Order Completed:
      json_schema:
        type: object
        required: [properties]
        properties:
          properties:
            type: object
            required: [order_id]
            properties:
              order_id: {type: string}
              total: {type: number, minimum: 0}
  identify:
    json_schema: {required: [traits], properties: {traits: {required: [email]}}}
"""


def rules_with(plan: str, filename: str = "rules.yaml", **kwargs: Any) -> Any:
    return compile_rules(HEAD + textwrap.indent(textwrap.dedent(plan), "    ") + TAIL, filename=filename, env={}, **kwargs)


def errors(plan: str, **kwargs: Any) -> list[str]:
    with pytest.raises(RulesError) as info:
        rules_with(plan, **kwargs)
    return info.value.lines


def track(name: str | None, **properties: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "track", "userId": "u1", "properties": properties}
    if name is not None:
        event["event"] = name
    return event


def messages(plan: str, event: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(v.kind, v.event, v.message) for v in rules_with(plan).tracking_plans["web"].violations(event)]


GOOD_ORDER = {"order_id": "o-1", "total": 12.5, "currency": "EUR", "coupon": None, "seats": 3.0, "paid": True}


# --- the simple form ------------------------------------------------------------------------------


def test_a_conforming_event_has_no_violations() -> None:
    assert messages(SIMPLE_PLAN, track("Order Completed", **GOOD_ORDER)) == []
    assert messages(SIMPLE_PLAN, track("Checked Out", anything=[1])) == []
    assert messages(SIMPLE_PLAN, {"type": "page", "name": "Home"}) == []  # types the plan does not cover


@pytest.mark.parametrize(
    "event, expected",
    [
        (track("Order Placed"), [("unplanned_event", "Order Placed", "event 'Order Placed' is not in the tracking plan")]),
        (track(None), [("unplanned_event", "(no event name)", "track event has no event name")]),
        ({**track("Order Completed"), "properties": None},
         [("missing_property", "Order Completed", "'Order Completed' is missing required property 'order_id'"),
          ("missing_property", "Order Completed", "'Order Completed' is missing required property 'total'")]),
        (track("Order Completed", **{**GOOD_ORDER, "total": None}),
         [("missing_property", "Order Completed", "'Order Completed' is missing required property 'total'")]),
        (track("Order Completed", **{**GOOD_ORDER, "total": "12.50"}),
         [("wrong_type", "Order Completed", "'Order Completed' property 'total' is a string, expected number")]),
        (track("Order Completed", **{**GOOD_ORDER, "seats": 2.5}),
         [("wrong_type", "Order Completed", "'Order Completed' property 'seats' is a number, expected integer")]),
        (track("Order Completed", **{**GOOD_ORDER, "coupon": 7}),
         [("wrong_type", "Order Completed", "'Order Completed' property 'coupon' is an integer, expected null or string")]),
        (track("Order Completed", **{**GOOD_ORDER, "currency": "YEN"}),
         [("not_allowed_value", "Order Completed", "'Order Completed' property 'currency' is 'YEN', expected one of 'USD', 'EUR'")]),
        (track("Order Completed", **{**GOOD_ORDER, "paid": 1}),
         [("wrong_type", "Order Completed", "'Order Completed' property 'paid' is an integer, expected boolean")]),
        ({**track("Order Completed"), "properties": ["o-1"]},
         [("wrong_type", "Order Completed", "'Order Completed' properties is an array, expected object")]),
        ({"type": "identify", "userId": "u1", "traits": {"email": ["a@b.c"]}},
         [("wrong_type", "identify", "'identify' trait 'email' is an array, expected string")]),
        ({"type": "identify", "userId": "u1"}, [("missing_property", "identify", "'identify' is missing required trait 'email'")]),
    ],
)
def test_simple_plan_violations(event: dict[str, Any], expected: list[tuple[str, str, str]]) -> None:
    assert messages(SIMPLE_PLAN, event) == expected


def test_enum_keeps_true_apart_from_one_and_clips_long_values() -> None:
    plan = "tracking_plan:\n  events:\n    E:\n      properties:\n        v: {enum: [1, x]}\n"
    assert messages(plan, track("E", v=True)) == [("not_allowed_value", "E", "'E' property 'v' is True, expected one of 1, 'x'")]
    assert messages(plan, track("E", v=1.0)) == []
    assert messages(plan, track("E", v="y" * 100)) == [("not_allowed_value", "E", f"'E' property 'v' is '{'y' * 36}..., expected one of 1, 'x'")]
    assert messages(plan, track("E", v={"a": 1})) == [("not_allowed_value", "E", "'E' property 'v' is an object, expected one of 1, 'x'")]


def test_unplanned_events_are_allowed_unless_the_plan_says_otherwise() -> None:
    assert messages("tracking_plan:\n  events: {E: {}}\n", track("Other")) == []
    assert messages("tracking_plan:\n  events: {E: {}}\n", track(None)) == []


# --- the JSON Schema form -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event, expected",
    [
        (track("Order Completed", order_id="o-1", total=3), []),
        ({"type": "track", "event": "Order Completed"},
         ["'Order Completed' fails its JSON Schema at (event): 'properties' is a required property"]),
        (track("Order Completed", total=-1),
         ["'Order Completed' fails its JSON Schema at properties.total: -1 is less than the minimum of 0",
          "'Order Completed' fails its JSON Schema at properties: 'order_id' is a required property"]),
        ({"type": "identify", "traits": {}}, ["'identify' fails its JSON Schema at traits: 'email' is a required property"]),
    ],
)
def test_json_schema_violations(event: dict[str, Any], expected: list[str]) -> None:
    found = rules_with(SCHEMA_PLAN).tracking_plans["web"].violations(event)
    assert sorted(v.message for v in found) == expected
    assert {v.kind for v in found} <= {"schema"}


def test_plan_defaults_and_modes() -> None:
    simple = rules_with(SIMPLE_PLAN).tracking_plans["web"]
    assert (simple.mode, simple.blocks, simple.allow_unplanned_events, simple.origin) == ("observe", False, False, "rules.yaml")
    assert rules_with(SCHEMA_PLAN).tracking_plans["web"].blocks
    assert compile_rules(HEAD + TAIL, env={}).tracking_plans == {}
    assert KINDS == ("unplanned_event", "missing_property", "wrong_type", "not_allowed_value", "schema")


# --- compile errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plan, expected",
    [
        ("tracking_plan: {mode: enforce, events: {}}\n",
         [f"rules.yaml:{PLAN}: sources[0].tracking_plan.mode: must be observe or block, not 'enforce'"]),
        ("tracking_plan: {allow_unplanned_events: sometimes}\n",
         [f"rules.yaml:{PLAN}: sources[0].tracking_plan.allow_unplanned_events: must be true or false, not 'sometimes'"]),
        ("tracking_plan: {event: {}}\n",
         [f"rules.yaml:{PLAN}: sources[0].tracking_plan.event: unknown key 'event' (expected one of: mode, allow_unplanned_events, events, identify)"]),
        ("tracking_plan: [E]\n", [f"rules.yaml:{PLAN}: sources[0].tracking_plan: must be a mapping, not a list"]),
        ("""\
         tracking_plan:
           events:
             E:
               required: order_id
               properties:
                 total: {type: decimal}
                 kind: {type: [string, text]}
                 currency: {enum: USD}
                 size: {type: integer, enum: [1, "2", 2.5, 2026-01-01, [3]]}
                 other: {format: email}
               schema: {}
         """, [
            f"rules.yaml:{PLAN + 5}: sources[0].tracking_plan.events.E.properties.total.type: unknown type 'decimal' "
            "(expected one of: string, number, integer, boolean, object, array, null)",
            f"rules.yaml:{PLAN + 6}: sources[0].tracking_plan.events.E.properties.kind.type: unknown type 'text' "
            "(expected one of: string, number, integer, boolean, object, array, null)",
            f"rules.yaml:{PLAN + 7}: sources[0].tracking_plan.events.E.properties.currency.enum: must be a non-empty list of allowed values",
            f"rules.yaml:{PLAN + 8}: sources[0].tracking_plan.events.E.properties.size.enum[1]: '2' is string, but the type is integer",
            f"rules.yaml:{PLAN + 8}: sources[0].tracking_plan.events.E.properties.size.enum[2]: 2.5 is number, but the type is integer",
            f"rules.yaml:{PLAN + 8}: sources[0].tracking_plan.events.E.properties.size.enum[3]: '2026-01-01' is not a JSON value (quote it to make it a string)",
            f"rules.yaml:{PLAN + 8}: sources[0].tracking_plan.events.E.properties.size.enum[4]: must be a single value, not a list",
            f"rules.yaml:{PLAN + 9}: sources[0].tracking_plan.events.E.properties.other.format: unknown key 'format' (expected one of: type, enum)",
            f"rules.yaml:{PLAN + 10}: sources[0].tracking_plan.events.E.schema: unknown key 'schema' (expected one of: required, properties, json_schema)",
        ]),
        ("tracking_plan:\n  identify: {properties: {}}\n",
         [f"rules.yaml:{PLAN + 1}: sources[0].tracking_plan.identify.properties: unknown key 'properties' (expected one of: required, traits, json_schema)"]),
        ("tracking_plan:\n  events:\n    E: {required: [a], json_schema: {type: object}}\n",
         [f"rules.yaml:{PLAN + 2}: sources[0].tracking_plan.events.E: give either json_schema or required/properties, not both"]),
    ],
)
def test_simple_plan_errors(plan: str, expected: list[str]) -> None:
    assert errors(plan) == expected


def test_malformed_json_schema_is_reported_at_the_offending_keyword() -> None:
    plan = """\
    tracking_plan:
      events:
        Order Completed:
          json_schema:
            type: object
            properties:
              properties:
                properties:
                  total: {type: decimal}
        Signed Up:
          json_schema:
            required: plan
        Logged In:
          json_schema: [type, object]
        Logged Out:
          json_schema: {$schema: "https://example.com/my-dialect", type: object}
    """
    assert errors(plan) == [
        f"rules.yaml:{PLAN + 8}: sources[0].tracking_plan.events.Order Completed.json_schema.properties.properties.properties.total.type: "
        "invalid JSON Schema: 'decimal' is not valid under any of the given schemas",
        f"rules.yaml:{PLAN + 11}: sources[0].tracking_plan.events.Signed Up.json_schema.required: invalid JSON Schema: 'plan' is not of type 'array'",
        f"rules.yaml:{PLAN + 13}: sources[0].tracking_plan.events.Logged In.json_schema: must be a JSON Schema object (a mapping)",
        f"rules.yaml:{PLAN + 15}: sources[0].tracking_plan.events.Logged Out.json_schema.$schema: unknown JSON Schema dialect 'https://example.com/my-dialect'",
    ]


# --- plan files -----------------------------------------------------------------------------------


def write_rules(tmp_path: Path, plan_ref: str, sources: str = "") -> Path:
    (tmp_path / "conf").mkdir(exist_ok=True)
    rules = tmp_path / "conf" / "rules.yaml"
    rules.write_text(HEAD + f"    tracking_plan: {plan_ref}\n" + sources + TAIL)
    return rules


def load_errors(path: Path) -> list[str]:
    with pytest.raises(RulesError) as info:
        load_rules(str(path), {})
    return info.value.lines


def test_plan_file_is_read_relative_to_the_rules_file_and_shared(tmp_path: Path) -> None:
    (tmp_path / "conf" / "plans").mkdir(parents=True)
    (tmp_path / "conf" / "plans" / "web.yaml").write_text("mode: block\nevents:\n  E: {required: [a]}\n")
    second = "  - name: app\n    write_keys: [app-key-000001]\n    tracking_plan: plans/web.yaml\n"
    rules = load_rules(str(write_rules(tmp_path, "plans/web.yaml", second)), {})
    plan = rules.tracking_plans["web"]
    assert rules.tracking_plans["app"] is plan  # compiled once
    assert plan.origin == str(tmp_path / "conf" / "plans" / "web.yaml")
    assert plan.blocks and [v.kind for v in plan.violations(track("E"))] == ["missing_property"]
    before = plan_files(rules.tracking_plans)
    (tmp_path / "conf" / "plans" / "web.yaml").write_text("mode: block\nevents:\n  E: {required: [b]}\n")
    assert plan_files(load_rules(str(tmp_path / "conf" / "rules.yaml"), {}).tracking_plans) != before


def test_json_plan_file_with_env_references(tmp_path: Path) -> None:
    rules_path = write_rules(tmp_path, "web.json")
    (tmp_path / "conf" / "web.json").write_text('{"mode": "${PLAN_MODE}", "events": {"E": {"json_schema": {"required": ["event"]}}}}')
    assert load_rules(str(rules_path), {"PLAN_MODE": "block"}).tracking_plans["web"].blocks


def test_missing_plan_file(tmp_path: Path) -> None:
    path = write_rules(tmp_path, "plans/missing.yaml")
    assert load_errors(path) == [f"{path}:{PLAN}: sources[0].tracking_plan: cannot read plan file {tmp_path}/conf/plans/missing.yaml: No such file or directory"]


def test_plan_file_problems_name_the_plan_file_and_its_lines(tmp_path: Path) -> None:
    path = write_rules(tmp_path, "web.yaml")
    plan = tmp_path / "conf" / "web.yaml"
    plan.write_text("events:\n  E:\n    json_schema:\n      type: [object, thing]\nmode: later\n")
    assert load_errors(path) == [
        f"{plan}:4: events.E.json_schema.type: invalid JSON Schema: ['object', 'thing'] is not valid under any of the given schemas",
        f"{plan}:5: mode: must be observe or block, not 'later'",
    ]
    plan.write_text("events: {E: [\n")
    assert load_errors(path) == [f"{plan}:2: invalid YAML: while parsing a flow node expected the node content, but found '<stream end>'"]
    plan.write_text("# nothing yet\n")
    assert load_errors(path) == [f"{path}:{PLAN}: sources[0].tracking_plan: plan file {plan} is empty"]
    plan.write_bytes(b"events: {\xff: {}}\n")
    assert load_errors(path) == [f"{path}:{PLAN}: sources[0].tracking_plan: plan file {plan} is not UTF-8 text (byte 0xff at offset 9)"]


def test_plan_file_needs_a_reader() -> None:
    assert errors("tracking_plan: plans/web.yaml\n", filename="conf/rules.yaml") == [
        f"conf/rules.yaml:{PLAN}: sources[0].tracking_plan: plan file conf/plans/web.yaml cannot be read: "
        "these rules were not loaded from a file (use an inline plan)"
    ]


def test_plan_file_through_an_injected_reader() -> None:
    files = {"conf/plans/web.yaml": b"events: {E: {}}\nallow_unplanned_events: false\n"}
    rules = rules_with("tracking_plan: plans/web.yaml\n", filename="conf/rules.yaml", read_file=files.__getitem__)
    assert [v.kind for v in rules.tracking_plans["web"].violations(track("F"))] == ["unplanned_event"]


# --- the simulate report --------------------------------------------------------------------------


def test_check_plans_tallies_by_source_kind_and_event() -> None:
    rules = rules_with(SIMPLE_PLAN)
    web, other = EventContext("web"), EventContext(None)
    samples = [
        (track("Order Completed", **GOOD_ORDER), web),
        (track("Order Completed", **{**GOOD_ORDER, "currency": "YEN"}), web),
        (track("Order Completed", **{**GOOD_ORDER, "currency": "JPY"}), web),
        (track("Order Completed", **{**GOOD_ORDER, "currency": "JPY"}), web),
        (track("Nope"), web),
        (track("Nope"), other),  # no source, so no plan: not checked
    ]
    report = check_plans(rules, samples)
    assert (report.checked, report.failing) == (5, 4)
    assert [(r.source, r.kind, r.event, r.violations) for r in report.rows] == [
        ("web", "not_allowed_value", "Order Completed", 3),
        ("web", "unplanned_event", "Nope", 1),
    ]
    assert report.rows[0].examples == (
        "'Order Completed' property 'currency' is 'YEN', expected one of 'USD', 'EUR'",
        "'Order Completed' property 'currency' is 'JPY', expected one of 'USD', 'EUR'",
    )
    assert plan_report_lines(compile_rules(HEAD + TAIL, env={}), samples) == []
    assert plan_report_lines(rules, samples)[1] == "tracking plans: 5 events checked, 4 with violations"


def test_violation_is_a_plain_value() -> None:
    assert Violation("schema", "E", "m") == Violation("schema", "E", "m")


# --- $ref: only within the schema, checked when the plan compiles ---------------------------------


def test_a_ref_that_does_not_resolve_is_a_compile_error_not_a_failure_per_event() -> None:
    # Unchecked, this raised from every check: in block mode inside prepare(), a 500 for each request.
    plan = """\
    tracking_plan:
      mode: block
      events:
        E:
          json_schema:
            $defs: {order: {type: object}}
            properties:
              properties: {$ref: "#/$defs/missing"}
              context: {$ref: "#/$defs/order"}
    """
    assert errors(plan) == [
        f"rules.yaml:{PLAN + 7}: sources[0].tracking_plan.events.E.json_schema.properties.properties.$ref: "
        "cannot resolve '#/$defs/missing' (a $ref must point into the same schema: nothing is fetched)"
    ]


def test_local_refs_and_refs_under_an_id_resolve() -> None:
    plan = """\
    tracking_plan:
      events:
        E:
          json_schema:
            $id: "https://plans.example/e.json"
            $defs:
              id: {type: string}
              nested:
                $id: "https://plans.example/nested.json"
                $defs: {inner: {type: integer}}
                properties: {n: {$ref: "#/$defs/inner"}}
            properties:
              properties:
                properties:
                  order_id: {$ref: "#/$defs/id"}
                  box: {$ref: "nested.json"}
                  again: {$ref: "https://plans.example/e.json#/$defs/id"}
    """
    check = rules_with(plan).tracking_plans["web"]
    assert check.violations(track("E", order_id="o", box={"n": 1}, again="x")) == ()
    assert [v.message for v in check.violations(track("E", order_id=1, box={"n": "x"}))] == [
        "'E' fails its JSON Schema at properties.order_id: 1 is not of type 'string'",
        "'E' fails its JSON Schema at properties.box.n: 'x' is not of type 'integer'",
    ]


def test_schema_dialect_and_dynamic_ref_problems_are_reported_not_raised() -> None:
    assert errors('tracking_plan: {events: {E: {json_schema: {$schema: 5}}}}\n') == [
        f"rules.yaml:{PLAN}: sources[0].tracking_plan.events.E.json_schema.$schema: must be a string naming a JSON Schema dialect, not 5"
    ]
    assert errors('tracking_plan: {events: {E: {json_schema: {$dynamicRef: "#nope"}}}}\n') == [
        f"rules.yaml:{PLAN}: sources[0].tracking_plan.events.E.json_schema.$dynamicRef: "
        "cannot resolve '#nope' (a $ref must point into the same schema: nothing is fetched)"
    ]
    anchored = 'tracking_plan: {events: {E: {json_schema: {$dynamicAnchor: node, properties: {properties: {$dynamicRef: "#node"}}}}}}\n'
    assert rules_with(anchored).tracking_plans["web"].violations(track("E", a=1)) == ()


def test_a_schema_error_path_made_of_client_property_names_is_clipped() -> None:
    # The path of an error inside `additionalProperties` or `patternProperties` names the client's own
    # keys (up to the 32 KB event limit); the message goes to the log and, in block mode, to the client.
    plan = "tracking_plan:\n  events:\n    E:\n      json_schema: {properties: {properties: {additionalProperties: {type: string}}}}\n"
    [violation] = rules_with(plan).tracking_plans["web"].violations(track("E", **{"k" * 5000: 1}))
    assert violation.message == f"'E' fails its JSON Schema at properties.{'k' * 86}...: 1 is not of type 'string'"
