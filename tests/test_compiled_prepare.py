"""The compiled `prepare()` and its pure-Python twin: built here, chosen as documented, and identical.

`make test` installs splitter with its compiled module (setup.py); these tests fail if it is missing
or older than its source, rather than pass on the twin alone. Both are checked the same ways: the
golden cohort buckets, the golden decisions (here and in test_golden_decisions.py), what
`prepare()` files for hand-written cases (test_submission.py runs on both), and a property test that
gives both the same random requests (odd types, blanks, numbers for ids, envelopes, transforms, a
blocking tracking plan, catalog samples, rejections) and compares everything they hand on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadtest.bench_compiled import filed
from loadtest.process import launch_splitter
from proxy.engine import EventContext, RuleSet, compile_rules
from proxy.ingress.implementation import CHOSEN, DISABLE, PYTHON, Implementation, choose
from proxy.ingress.prepare import CallShape, Prepared
from proxy.ingress.responses import IngressError
from proxy.observe.catalog import Catalog
from tests.conftest import VENDORED_GOLDEN, compiled_twin
from tests.rules_texts import HEAD, WEB_KEY, served_head

RULES = HEAD + """\
    tracking_plan:
      mode: block
      allow_unplanned_events: true
      events:
        Order Completed:
          required: [order_id]
          properties:
            order_id: {type: string}
cohort: {key: [userId, anonymousId, context.traits.id], salt: "twins"}
catalog:
  enabled: true
  schema_samples: 5
  sample_every: 1
rules:
  - name: old-ios
    when: {os: iOS, app_version: "<4.2.0"}
    route: segment
  - name: internal
    when: {library: [analytics-ruby]}
    route: {to: [segment], mirror: [rudderstack]}
  - name: checkout
    when: {type: track, event: ["Checkout *", "Order ?ompleted"]}
    route: {to: [segment], mirror: [rudderstack]}
    transforms:
      rudderstack:
        - rename_event: {from: "Order Completed", to: "Order Done"}
  - name: germany
    when: {country: [DE]}
    route: {split: {rudderstack: 50, segment: 50}}
  - name: identify
    when: {type: [identify, group]}
    route: rudderstack
  - name: everyone-else
    route: {split: {rudderstack: 30, segment: 70}, mirror: [segment]}
"""


def test_the_compiled_module_is_built_from_the_current_source() -> None:
    compiled_twin()
    from proxy.ingress import _compiled

    built, source = Path(_compiled.__file__), Path(_compiled.__file__).with_name("_compiled.pyx")
    assert built.suffix == ".so", f"{built} is not an extension module"
    assert built.stat().st_mtime >= source.stat().st_mtime, "the compiled module is older than _compiled.pyx: `make venv` rebuilds it"
    assert CHOSEN.name == "compiled" and CHOSEN.why_python is None


def test_the_environment_chooses_the_twin() -> None:
    compiled_twin()
    assert choose({}).name == "compiled"
    assert choose({DISABLE: "0"}).name == "compiled"
    assert choose({DISABLE: "1"}) is PYTHON  # on purpose: no reason to warn about


@pytest.mark.parametrize("case", [json.loads(line) for line in VENDORED_GOLDEN.read_text(encoding="utf-8").splitlines() if line.strip()],
                         ids=lambda case: f"{case['salt']}:{case['key']}")
def test_golden_bucket_compiled(case: dict[str, Any]) -> None:
    compiled_twin()
    from proxy.ingress import _compiled

    assert _compiled.bucket(str(case["salt"]), str(case["key"])) == case["bucket"]


def test_the_compiled_hash_is_the_contract_at_every_length_and_outside_ascii() -> None:
    """Its C hash covers "salt:key" up to 4096 bytes (longer ones take mmh3): every length across that
    edge, in one- and two-byte characters, and the odd cases of the contract."""
    compiled_twin()
    from proxy.engine.cohort import bucket
    from proxy.ingress import _compiled

    cases = [("", "x"), ("", ""), ("日本", "ユーザー"), ("😀", "u-1"), ("s:a", "k:\x00")]
    cases += [("salt", "k" * (4096 - 5 + offset)) for offset in range(-6, 7)] + [("s", "é" * (2047 - 1 + offset)) for offset in range(-3, 4)]
    cases += [(chr(0x10000 + n), chr(0x20000 + n) * n) for n in range(40)]
    for salt, key in cases:
        assert _compiled.bucket(salt, key) == bucket(salt, key), (salt[:5], len(key))


# -- the property test: the same requests through both -------------------------------------------------------------------------

ODD = st.sampled_from([None, True, 0, 7, 2.5, "", " ", ["x"], {"x": 1}])  # what a field should not hold, mixed into each


def _one_of(*values: Any) -> st.SearchStrategy[Any]:
    """Mostly the values a field meaningfully takes (those the rules and prepare() tell apart), sometimes an odd one."""
    return st.one_of(st.sampled_from(values), st.sampled_from(values), ODD)


def _section(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


IDS = st.one_of(st.sampled_from(["u-1", "u-2", "anon-3", "é", " "]), st.integers(-3, 10**12), st.floats(allow_nan=False, allow_infinity=False),
                st.booleans(), st.none())
CONTEXT = _section(app=st.one_of(_section(version=_one_of("4.1.9", "4.2.0", "5.0", "bad", 4, 4.5)), ODD),
                   os=st.one_of(_section(name=_one_of("iOS", "android")), ODD), library=_section(name=_one_of("analytics-ruby", "analytics.js")),
                   location=_section(country=_one_of("DE", "FR")), channel=_one_of("browser", "mobile", "client", "server"),
                   ip=_one_of("10.0.0.9"), traits=_section(id=IDS))
EVENT = _section(type=_one_of("track", "page", "screen", "identify", "group", "alias"),
                 event=_one_of("Checkout Started", "Order Completed", "Order completed", "Viewed"), name=_one_of("Home", "Cart"),
                 userId=IDS, anonymousId=IDS, messageId=_one_of("m-1", "m-2"), writeKey=_one_of("web-key-000001", "other"),
                 sentAt=_one_of("2026-12-02T10:00:00Z"), channel=_one_of("web", "mobile", "server"), context=st.one_of(CONTEXT, CONTEXT, ODD),
                 properties=_section(order_id=_one_of("o-1"), total=st.integers(0, 99)))
ITEMS = st.lists(EVENT, min_size=1, max_size=10)
ODD_ITEMS = st.lists(st.tuples(st.integers(0, 10), ODD), max_size=2)  # (where, what): items that are not events, put among them
ENVELOPE = _section(context=CONTEXT, integrations=_section(All=st.booleans()), sentAt=_one_of("2026-12-02T10:00:00Z"), writeKey=_one_of("web-key-000001"))


def handed_on(implementation: Implementation, rules: RuleSet, body: Any, shape: CallShape, ctx: EventContext, client_ip: str | None) -> Any:
    """Everything `prepare()` hands on (or the error it answers), in comparable form."""
    try:
        prepared: Prepared = implementation.prepare(rules, body, shape, rules.sources["web"], ctx, client_ip, presented_key=WEB_KEY,
                                                    forwarded_for="198.51.100.7", catalog=Catalog())
    except IngressError as error:
        return ("refused", error.status, error.code, error.message)
    return filed(prepared)


ROUTES = {"batch": CallShape(True), "client-batch": CallShape(True, None, True), "track": CallShape(False, "track"),
          "page": CallShape(False, "page", True), "identify": CallShape(False, "identify")}


def both(body: Any, shape: CallShape, country: str | None, client_ip: str | None) -> tuple[Any, Any]:
    """What each files for the same request. Each gets its own rules, compiled afresh (their memo of
    matched signatures is per rule set: shared, the second would only look up what the first matched),
    and its own copy of the body (changed in place: envelope merged, ids stamped, writeKey dropped)."""
    ctx = EventContext("web", None, country)
    return tuple(handed_on(implementation, compile_rules(RULES, filename="rules.yaml", env={}), orjson.loads(orjson.dumps(body)), shape, ctx, client_ip)
                 for implementation in (PYTHON, compiled_twin()))  # type: ignore[return-value]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=ITEMS, odd=ODD_ITEMS, envelope=ENVELOPE, route=st.sampled_from(sorted(ROUTES)), country=st.sampled_from([None, "DE", "FR"]),
       client_ip=st.sampled_from([None, "203.0.113.5"]))
def test_both_file_the_same_for_any_request(items: list[Any], odd: list[tuple[int, Any]], envelope: dict[str, Any], route: str,
                                             country: str | None, client_ip: str | None) -> None:
    shape = ROUTES[route]
    for where, item in odd:
        items.insert(where, item)
    body = {**envelope, "batch": items} if shape.is_batch else items[0]
    python, twin = both(body, shape, country, client_ip)
    assert twin == python


# -- the running proxy says which one it runs -------------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "expected"), [({}, "compiled"), ({DISABLE: "1"}, "python")])
async def test_serve_says_which_prepare_it_runs(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    compiled_twin()
    rules = tmp_path / "rules.yaml"
    rules.write_text(served_head("k-1") + "rules:\n  - name: all\n    route: segment\n")
    splitter = await launch_splitter(str(rules), {**_plain_environment(), "SEGMENT_URL": "http://127.0.0.1:9", **env})
    try:
        started = await splitter.wait_for_log("started")
        assert started["prepare"] == expected
        assert not [line for line in splitter.log if line.get("event") == "compiled_prepare_unavailable"]
    finally:
        await splitter.stop()


def _plain_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("SPLITTER_")}
