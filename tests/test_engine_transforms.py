"""Per-destination transforms: each op, where they are declared and in which order, every refusal with
its full `FILE:LINE: path: message`, and purity (the input event and other destinations' copies are
never touched)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import textwrap
from collections.abc import Mapping
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.delivery import Chunk
from proxy.engine import Decision, EventContext, RulesError, RuleSet, compile_rules, decide, transformed_events
from proxy.engine.transforms import Chain, HashProperty, hash_value
from proxy.ingress.prepare import CallShape, prepare
from tests.rules_texts import HEAD, lines

SALT = "pepper"
ENV = {"PII_SALT": SALT}
RULE_HEAD = HEAD + """\
rules:
  - name: orders
    when: {event: "Checkout *"}
    route: {to: [segment], mirror: [rudderstack]}
  - name: default
    route: [segment, rudderstack]
    transforms:
      rudderstack:
"""
OP = lines(RULE_HEAD) + 1  # the line of the default rule's first transform for rudderstack (`rules[1].transforms.rudderstack[0]`)
# A whole file around destination-level transforms, written out because the destination is what these tests
# are about (their expected lines count in it): the transforms start on line 8 (`destinations.rudderstack.transforms[0]`).
DEST_HEAD = """\
version: 1
destinations:
  segment: {kind: segment, url: "http://seg.test"}
  rudderstack:
    kind: rudderstack
    url: "http://rs.test"
    transforms:
"""
DEST_TAIL = """\
sources:
  - name: web
    write_keys: [web-key-000001]
rules:
  - name: segment-only
    when: {type: identify}
    route: segment
  - name: default
    route: [segment, rudderstack]
"""
OPS = "unknown transform {!r} (expected one of: rename_event, rename_property, drop_property, hash_property, set_property)"


def rule_ops(block: str) -> str:
    return RULE_HEAD + textwrap.indent(textwrap.dedent(block).strip("\n") + "\n", "        ")


def dest_ops(block: str, tail: str = DEST_TAIL) -> str:
    return DEST_HEAD + textwrap.indent(textwrap.dedent(block).strip("\n") + "\n", "      ") + tail


def compiled(text: str, env: dict[str, str] | None = None) -> RuleSet:
    return compile_rules(text, filename="rules.yaml", env=ENV if env is None else env)


def errors(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(RulesError) as info:
        compiled(text, env)
    return info.value.lines


def chain(block: str) -> Chain:
    return compiled(rule_ops(block)).transforms[("default", "rudderstack")]


def sha(text: str, salt: str = SALT) -> str:
    return hashlib.sha256((salt + text).encode()).hexdigest()


def track(**fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Clicked", "userId": "u-1", "messageId": "m-1", **fields}


# --- each op ----------------------------------------------------------------------------------------


def test_rename_event_renames_only_the_named_event() -> None:
    rename = chain('- rename_event: {from: "Order Done", to: "Order Completed"}')
    assert rename.apply(track(event="Order Done")) == track(event="Order Completed")
    assert rename.apply(track(event="Order Done!")) == track(event="Order Done!")
    assert rename.apply({"type": "identify", "userId": "u"}) == {"type": "identify", "userId": "u"}


def test_rename_property_moves_the_value_and_creates_missing_objects() -> None:
    rename = chain("- rename_property: {from: traits.email, to: context.traits.email}")
    event = {"type": "identify", "userId": "u", "traits": {"email": "a@b.c", "plan": "pro"}}
    assert rename.apply(event) == {"type": "identify", "userId": "u", "traits": {"plan": "pro"}, "context": {"traits": {"email": "a@b.c"}}}


@pytest.mark.parametrize(
    "if_exists, survivor",
    [("", "new-style"), ("if_exists: keep, ", "new-style"), ("if_exists: overwrite, ", "legacy")],
)
def test_rename_property_onto_an_existing_field(if_exists: str, survivor: str) -> None:
    rename = chain(f"- rename_property: {{{if_exists}from: properties.old, to: properties.new}}")
    event = track(properties={"old": "legacy", "new": "new-style"})
    assert rename.apply(event)["properties"] == {"new": survivor}  # the old name is retired either way


@pytest.mark.parametrize(
    "event",
    [
        track(),  # no properties at all
        track(properties={"other": 1}),  # the field is absent
        track(properties="not an object"),  # the parent is not an object
        track(properties=None),
        track(properties=[{"old": 1}]),
    ],
)
def test_a_path_that_is_absent_or_blocked_leaves_the_event_as_it_is(event: dict[str, Any]) -> None:
    ops = chain("""
        - rename_property: {from: properties.old, to: properties.new}
        - drop_property: properties.old
        - hash_property: {path: properties.old, salt: "${PII_SALT}"}
        - rename_property: {from: properties.other, to: context.traits.other}
    """)
    expected = copy.deepcopy(event)
    if isinstance(event.get("properties"), dict) and "other" in event["properties"]:
        expected["properties"] = {}
        expected["context"] = {"traits": {"other": 1}}
    assert ops.apply(event) == expected


def test_rename_property_keeps_the_value_when_a_non_object_is_in_the_way() -> None:
    rename = chain("- rename_property: {from: properties.email, to: context.traits.email}")
    event = track(properties={"email": "a@b.c"}, context={"traits": "oops"})
    assert rename.apply(event) == event


def test_drop_property() -> None:
    drop = chain("- drop_property: properties.card_number")
    assert drop.apply(track(properties={"card_number": "4111", "total": 3})) == track(properties={"total": 3})
    assert drop.apply(track(properties={"card_number": None})) == track(properties={})


@pytest.mark.parametrize(
    "value, hashed_text",
    [
        ("Ada@Example.com", "Ada@Example.com"),  # as written: no case folding
        ("", ""),
        (42, "42"),
        (4.5, "4.5"),
        (True, "true"),
        ({"b": 1, "a": "é"}, '{"a":"é","b":1}'),  # canonical JSON: sorted keys, no spaces, UTF-8
        ([1, "x"], '[1,"x"]'),
    ],
)
def test_hash_property_is_sha256_hex_of_salt_then_value(value: Any, hashed_text: str) -> None:
    hashed = chain('- hash_property: {path: context.traits.email, salt: "${PII_SALT}"}')
    assert hashed.apply(track(context={"traits": {"email": value}}))["context"]["traits"]["email"] == sha(hashed_text)


def test_hash_property_without_salt_and_of_null() -> None:
    hashed = chain("- hash_property: {path: properties.email}")
    assert hashed.apply(track(properties={"email": "a@b.c"}))["properties"]["email"] == hashlib.sha256(b"a@b.c").hexdigest()
    assert hashed.apply(track(properties={"email": None})) == track(properties={"email": None})  # nothing to hide


def test_the_salt_is_kept_out_of_repr() -> None:
    hashed = chain('- hash_property: {path: properties.email, salt: "${PII_SALT}"}')
    assert hashed.operations == (HashProperty(("properties", "email"), SALT.encode()),)
    assert SALT not in repr(hashed) and SALT not in repr(compiled(rule_ops('- hash_property: {path: properties.email, salt: "${PII_SALT}"}')))


def test_set_property_writes_any_json_value_and_creates_missing_objects() -> None:
    ops = chain("""
        - set_property: {path: context.library.name, value: splitter}
        - set_property: {path: properties.tags, value: [a, {b: null}]}
        - set_property: {path: properties.plan, value: 3.5}
    """)
    event = track(context={"library": {"name": "analytics.js", "version": "1"}}, properties={"plan": "free"})
    assert ops.apply(event) == track(
        context={"library": {"name": "splitter", "version": "1"}}, properties={"plan": 3.5, "tags": ["a", {"b": None}]},
    )
    assert chain("- set_property: {path: context.library.name, value: x}").apply(track(context="oops")) == track(context="oops")


def test_set_property_gives_each_event_its_own_copy_of_the_value() -> None:
    ops = chain("""
        - set_property: {path: context.library, value: {name: splitter}}
        - set_property: {path: context.library.version, value: "1"}
    """)
    first, second = ops.apply(track()), ops.apply(track())
    assert first["context"] == second["context"] == {"library": {"name": "splitter", "version": "1"}}
    assert first["context"]["library"] is not second["context"]["library"]
    assert ops.operations[0].value == {"name": "splitter"}  # type: ignore[union-attr]  # the config is never written to


def test_when_scopes_an_op_and_sees_the_event_as_earlier_ops_left_it() -> None:
    ops = chain("""
        - rename_event: {from: "Order Done", to: "Order Completed"}
        - rename_property: {from: properties.total_cents, to: properties.revenue_cents}
          when: {event: "Order Completed"}
        - drop_property: properties.card
          when: {type: [identify, page]}
    """)
    event = track(event="Order Done", properties={"total_cents": 5, "card": "x"})
    assert ops.apply(event) == track(event="Order Completed", properties={"card": "x", "revenue_cents": 5})
    assert ops.apply(track(properties={"total_cents": 5})) == track(properties={"total_cents": 5})
    page = {"type": "page", "userId": "u", "properties": {"card": "x"}}
    assert ops.apply(page) == {"type": "page", "userId": "u", "properties": {}}


# --- where transforms are declared, and their order --------------------------------------------------


def test_rule_transforms_run_before_the_destination_transforms() -> None:
    text = dest_ops(
        '- hash_property: {path: context.traits.email, salt: "${PII_SALT}"}',
        DEST_TAIL.replace("    route: [segment, rudderstack]\n", "    route: [segment, rudderstack]\n"
                          "    transforms: {rudderstack: [{rename_property: {from: properties.mail, to: context.traits.email}}]}\n"),
    )
    rules = compiled(text)
    event = track(properties={"mail": "a@b.c"})
    decision = decide(rules, event)
    assert transformed_events(rules.transforms, decision, event) == {
        "rudderstack": track(properties={}, context={"traits": {"email": sha("a@b.c")}}),
    }


def test_destination_transforms_apply_to_every_rule_that_sends_there() -> None:
    rules = compiled(dest_ops("- drop_property: properties.secret"))
    assert list(rules.transforms) == [("default", "rudderstack")]  # segment-only never sends there
    event = {"type": "page", "userId": "u", "properties": {"secret": 1}}
    assert transformed_events(rules.transforms, decide(rules, event), event) == {"rudderstack": {"type": "page", "userId": "u", "properties": {}}}


# A mirror gets its rule's transforms too (and the destination's): tests/golden/decisions/transforms, the legacy iOS order.


def test_without_transforms_the_table_is_empty() -> None:
    rules = compiled(RULE_HEAD.replace("    transforms:\n      rudderstack:\n", ""))
    assert not rules.transforms
    assert transformed_events(rules.transforms, Decision("default", ("segment", "rudderstack"), ()), track()) == {}


def test_compiled_transforms_are_frozen() -> None:
    compiled_chain = chain("- drop_property: properties.a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        compiled_chain.operations[0].path = ("properties", "b")  # type: ignore[misc]


# --- refusals ----------------------------------------------------------------------------------------

AT = f"rules.yaml:{OP}: rules[1].transforms.rudderstack[0]"
PATH_ROOTS = "is not under properties, traits, context: transforms change event data, not the envelope"
JSON_DATA = "must be JSON data (string, number, true/false, null, list or mapping with string keys)"


@pytest.mark.parametrize(
    "block, expected",
    [
        ("- hash: properties.a", [f"{AT}.hash: {OPS.format('hash')}"]),
        ("- {}", [f"{AT}: must hold one transform (one of: rename_event, rename_property, drop_property, hash_property, set_property)"]),
        ("- drop_property", [f"{AT}: must be a mapping, not a value"]),
        ("- {drop_property: properties.a, set_property: {path: properties.b, value: 1}}",
         [f"{AT}: holds 2 transforms (drop_property, set_property): write one per list item, so their order is explicit"]),
        ("- {drop_property: properties.a, hash: x}", [f"{AT}.hash: {OPS.format('hash')}"]),
        ('- hash_property: {salt: "${PII_SALT}"}', [f"{AT}.hash_property.path: is required"]),
        ("- hash_property: {path: properties.a, pepper: x}", [f"{AT}.hash_property.pepper: unknown key 'pepper' (expected one of: path, salt)"]),
        ("- hash_property: properties.a", [f"{AT}.hash_property: must be a mapping, not a value"]),
        ("- rename_event: {from: A}", [f"{AT}.rename_event.to: is required"]),
        ("- rename_event: {from: A, to: A}", [f"{AT}.rename_event.to: is the same as from ('A'): the rename does nothing"]),
        ('- rename_event: {from: A, to: ""}', [f"{AT}.rename_event.to: must not be empty"]),
        ("- set_property: {path: properties.a}", [f"{AT}.set_property.value: is required"]),
        ("- set_property: {path: properties.a, value: 2026-01-01}",
         [f"{AT}.set_property.value: {JSON_DATA}: datetime.date(2026, 1, 1) is a date (quote it to send it as a string)"]),
        ("- set_property: {path: properties.a, value: {1: x}}", [f"{AT}.set_property.value: {JSON_DATA}: key 1 is not a string"]),
        ("- set_property: {path: properties.a, value: [.nan]}", [f"{AT}.set_property.value: {JSON_DATA}: nan is not a finite number"]),
        # orjson cannot encode these: every event the op touched would be a 500 at ingress
        ("- set_property: {path: properties.a, value: 18446744073709551616}",
         [f"{AT}.set_property.value: {JSON_DATA}: 18446744073709551616 is outside the 64-bit integer range"]),
        ("- set_property: {path: properties.a, value: {b: [-9223372036854775809]}}",
         [f"{AT}.set_property.value: {JSON_DATA}: -9223372036854775809 is outside the 64-bit integer range"]),
        ("- rename_property: {from: properties.a, to: properties.b, if_exists: skip}",
         [f"{AT}.rename_property.if_exists: must be keep or overwrite, not 'skip'"]),
        ("- rename_property: {from: properties.a, to: properties.a}",
         [f"{AT}.rename_property.to: 'properties.a' is the same field as from ('properties.a'): rename to a separate field"]),
        ("- rename_property: {from: properties.a, to: properties.a.b}",
         [f"{AT}.rename_property.to: 'properties.a.b' is inside from ('properties.a'): rename to a separate field"]),
        ("- rename_property: {from: context.traits.email, to: context.traits}",
         [f"{AT}.rename_property.to: 'context.traits' is a parent of from ('context.traits.email'): rename to a separate field"]),
    ],
)
def test_operation_problems(block: str, expected: list[str]) -> None:
    assert errors(rule_ops(block)) == expected


@pytest.mark.parametrize(
    "path, message",
    [
        ("messageId", "messageId is never transformed: warehouses de-duplicate on it, so every destination must receive the same one"),
        ("type", "type is never transformed: it is part of the wire contract (destinations read the event by it)"),
        ("userId", "userId is never transformed: destinations refuse an event without userId or anonymousId"),
        ("anonymousId", "anonymousId is never transformed: destinations refuse an event without userId or anonymousId"),
        ("event", "the event name is changed with rename_event, not as a property"),
        ("messageId.x", "messageId is never transformed: warehouses de-duplicate on it, so every destination must receive the same one"),
        ("timestamp", f"'timestamp' {PATH_ROOTS}"),
        ("integrations.All", f"'integrations.All' {PATH_ROOTS}"),
        ("properties", "'properties' names the whole object: give a field inside it, e.g. properties.plan"),
        ("properties..a", "'properties..a' is not a field path (use names separated by dots)"),
        ("context.traits.", "'context.traits.' is not a field path (use names separated by dots)"),
    ],
)
def test_paths_outside_event_data_are_refused(path: str, message: str) -> None:
    assert errors(rule_ops(f'- drop_property: "{path}"')) == [f"{AT}.drop_property: {message}"]
    assert errors(rule_ops(f'- set_property: {{path: "{path}", value: 1}}')) == [f"{AT}.set_property.path: {message}"]
    assert errors(rule_ops(f'- rename_property: {{from: properties.a, to: "{path}"}}')) == [f"{AT}.rename_property.to: {message}"]


@pytest.mark.parametrize(
    "block, expected",
    [
        ("- drop_property: properties.a\n  when: {source: web}",
         [f"rules.yaml:{OP + 1}: rules[1].transforms.rudderstack[0].when.source: unknown key 'source' (expected one of: type, event)"]),
        ("- drop_property: properties.a\n  when: {type: click}",
         [f"rules.yaml:{OP + 1}: rules[1].transforms.rudderstack[0].when.type: unknown event type 'click' "
          "(expected one of: track, identify, page, screen, group, alias)"]),
        ("- drop_property: properties.a\n  when: {}", [f"rules.yaml:{OP + 1}: rules[1].transforms.rudderstack[0].when: must hold at least one condition (type, event)"]),
        ("- drop_property: properties.a\n  when: [a]", [f"rules.yaml:{OP + 1}: rules[1].transforms.rudderstack[0].when: must be a mapping, not a list"]),
    ],
)
def test_when_problems(block: str, expected: list[str]) -> None:
    assert errors(rule_ops(block)) == expected


def test_a_salt_written_in_the_file_is_refused() -> None:
    assert errors(rule_ops("- hash_property: {path: properties.email, salt: pepper}")) == [
        f'{AT}.hash_property.salt: must come from the environment, e.g. "${{PII_SALT}}": a salt written in the rules file '
        "lets anyone who reads the file reverse the hashes"
    ]


def test_a_missing_salt_variable_is_named_once() -> None:
    assert errors(rule_ops('- hash_property: {path: properties.email, salt: "${PII_SALT}"}'), env={}) == [
        f"rules.yaml:{OP}: environment variable PII_SALT is not set and has no default (write ${{PII_SALT:-default}} to give one)"
    ]


@pytest.mark.parametrize("reference, env", [('"${PII_SALT}"', {"PII_SALT": ""}), ('"${UNSET_SALT:-}"', {})])
def test_an_empty_salt_is_refused(reference: str, env: dict[str, str]) -> None:
    assert errors(rule_ops(f"- hash_property: {{path: properties.email, salt: {reference}}}"), env=env) == [
        f"{AT}.hash_property.salt: must not be empty"
    ]


def test_a_salt_from_the_environment_with_a_default_is_accepted() -> None:
    hashed = compiled(rule_ops('- hash_property: {path: properties.email, salt: "${UNSET_SALT:-dev-only}"}'), env={})
    assert hashed.transforms[("default", "rudderstack")].apply(track(properties={"email": "x"}))["properties"]["email"] == sha("x", "dev-only")


def test_transform_lists_and_destination_names_are_checked() -> None:
    head = RULE_HEAD.replace("    transforms:\n      rudderstack:\n", "")
    line = lines(head) + 1  # of the `transforms:` appended to it
    assert errors(head + "    transforms: {rudderstack: []}\n") == [
        f"rules.yaml:{line}: rules[1].transforms.rudderstack: must be a non-empty list of transforms, e.g. [{{drop_property: properties.card_number}}]"
    ]
    assert errors(head + "    transforms: [{drop_property: properties.a}]\n") == [
        f"rules.yaml:{line}: rules[1].transforms: must map destination names to their transforms, e.g. {{rudderstack: [...]}}"
    ]
    assert errors(head + "    transforms:\n      rudder: [{drop_property: properties.a}]\n") == [
        f"rules.yaml:{line + 1}: rules[1].transforms.rudder: unknown destination 'rudder' (destinations: segment, rudderstack)"
    ]


def test_transforms_for_a_destination_the_rule_never_sends_to_are_refused() -> None:
    text = DEST_HEAD.replace("    transforms:\n", "") + DEST_TAIL.replace(
        "    route: segment\n", "    route: segment\n    transforms: {rudderstack: [{drop_property: properties.a}]}\n"
    )
    assert errors(text) == [
        "rules.yaml:14: rules[0].transforms.rudderstack: this rule never sends to 'rudderstack' (it routes to: segment), so these transforms would never run"
    ]


def test_destination_transform_problems_name_the_destination() -> None:
    assert errors(dest_ops("- drop_property: messageId\n- rename_event: {from: A}")) == [
        "rules.yaml:8: destinations.rudderstack.transforms[0].drop_property: "
        "messageId is never transformed: warehouses de-duplicate on it, so every destination must receive the same one",
        "rules.yaml:9: destinations.rudderstack.transforms[1].rename_event.to: is required",
    ]
    assert errors(DEST_HEAD.replace("    transforms:\n", "    transforms: {drop_property: properties.a}\n") + DEST_TAIL) == [
        "rules.yaml:7: destinations.rudderstack.transforms: must be a non-empty list of transforms, e.g. [{drop_property: properties.card_number}]"
    ]


def test_every_problem_in_one_file_is_reported_together() -> None:
    assert errors(rule_ops("- drop_property: type\n- hash: x\n- rename_event: {from: A, to: A}")) == [
        f"{AT}.drop_property: type is never transformed: it is part of the wire contract (destinations read the event by it)",
        f"rules.yaml:{OP + 1}: rules[1].transforms.rudderstack[1].hash: " + OPS.format("hash"),
        f"rules.yaml:{OP + 2}: rules[1].transforms.rudderstack[2].rename_event.to: is the same as from ('A'): the rename does nothing",
    ]


# --- purity ------------------------------------------------------------------------------------------

PII_CHAIN = """
    - rename_event: {from: "Order Done", to: "Order Completed"}
    - rename_property: {from: properties.mail, to: context.traits.email, if_exists: overwrite}
    - hash_property: {path: context.traits.email, salt: "${PII_SALT}"}
    - drop_property: properties.card
    - set_property: {path: context.library, value: {name: splitter}}
    - set_property: {path: context.library.version, value: "1"}
    - rename_property: {from: traits.a, to: properties.a}
"""
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "mail", "email", "card", "traits", "x"]), inner, max_size=3),
    max_leaves=12,
)
events = st.fixed_dictionaries(
    {"type": st.just("track"), "userId": st.just("u-1"), "messageId": st.just("m-1")},
    optional={
        "event": st.sampled_from(["Order Done", "Clicked"]),
        "properties": json_values,
        "traits": json_values,
        "context": st.one_of(json_values, st.fixed_dictionaries({}, optional={"traits": json_values, "library": json_values})),
    },
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_applying_never_changes_the_input_event(event: dict[str, Any]) -> None:
    before = orjson.dumps(event)
    ops = chain(PII_CHAIN)
    result = ops.apply(event)
    assert orjson.dumps(event) == before
    assert result is not event
    assert result["messageId"] == event["messageId"] and result["userId"] == event["userId"]
    orjson.dumps(result)  # still JSON


@settings(max_examples=150, deadline=None)
@given(st.lists(events, min_size=1, max_size=5))
def test_other_destinations_receive_the_untransformed_bytes(batch: list[dict[str, Any]]) -> None:
    """Through ingress `prepare`: segment's bytes with transforms for rudderstack equal those without any."""
    with_transforms = compiled(rule_ops(PII_CHAIN))
    without = compiled(RULE_HEAD.replace("    transforms:\n      rudderstack:\n", ""))
    source = with_transforms.sources["web"]
    shape = CallShape(is_batch=True)
    ctx = EventContext(source="web")
    plain = prepare(without, {"batch": copy.deepcopy(batch)}, shape, source, ctx, None).submission
    transformed = prepare(with_transforms, {"batch": copy.deepcopy(batch)}, shape, source, ctx, None).submission

    def events(chunks: Mapping[str, Chunk], destination: str) -> list[bytes] | None:
        return chunks[destination].events if destination in chunks else None

    assert transformed.primary["segment"].events == plain.primary["segment"].events
    assert events(transformed.mirror, "segment") == events(plain.mirror, "segment")
    rudder = (events(transformed.primary, "rudderstack") or []) + (events(transformed.mirror, "rudderstack") or [])
    plain_rudder = (events(plain.primary, "rudderstack") or []) + (events(plain.mirror, "rudderstack") or [])
    assert [orjson.loads(b)["messageId"] for b in rudder] == [orjson.loads(b)["messageId"] for b in plain_rudder]
    for encoded, original in zip(rudder, plain_rudder, strict=True):
        assert encoded == orjson.dumps(chain(PII_CHAIN).apply(orjson.loads(original)))


def test_hash_value_matches_the_documented_formula() -> None:
    assert hash_value(b"s", "v") == hashlib.sha256(b"sv").hexdigest()


def test_set_property_accepts_the_64_bit_extremes() -> None:
    ops = chain("""
        - set_property: {path: properties.big, value: 18446744073709551615}
        - set_property: {path: properties.small, value: -9223372036854775808}
    """)
    result = ops.apply(track())
    assert orjson.loads(orjson.dumps(result))["properties"] == {"big": 2**64 - 1, "small": -(2**63)}


@pytest.mark.parametrize("value", ["0x1F2E", "0017", "1:30", "1_000", "+5", "1e3", "true", "no", "null", "~", "2026-01-01", "123456"])
def test_an_unquoted_salt_reference_is_the_environment_value_exactly(value: str) -> None:
    """YAML would type these plain scalars (0x1F2E is 7982, 1:30 is 90, true a boolean): the salt must
    be the variable's text as set, and it must never be quoted back in an error message."""
    block = """
        - hash_property:
            path: properties.email
            salt: ${PII_SALT}
    """
    ops = compiled(rule_ops(block), env={"PII_SALT": value}).transforms[("default", "rudderstack")]
    assert ops.apply(track(properties={"email": "x"}))["properties"]["email"] == sha("x", value)
