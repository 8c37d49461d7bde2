"""What `prepare()` hands delivery: per destination and role, each event's bytes with its messageId,
type and name in step; rejections typed; the presented key kept out of the value's repr. Run on both
`prepare()`s, the pure-Python one and its compiled twin (proxy/ingress/implementation.py)."""

from __future__ import annotations

import orjson
import pytest

from proxy.delivery import Rejection, Submission
from proxy.engine import EventContext, compile_rules
from proxy.ingress.implementation import PYTHON, Implementation
from proxy.ingress.prepare import CallShape
from tests.conftest import compiled_twin
from tests.rules_texts import HEAD, WEB_KEY

RULES = HEAD + """\
rules:
  - name: orders
    when: {event: "Order *"}
    route: {to: [segment], mirror: [rudderstack]}
    transforms:
      rudderstack:
        - rename_event: {from: "Order Done", to: "Order Completed"}
  - name: default
    route: [segment]
"""


@pytest.fixture(params=["python", "compiled"])
def implementation(request: pytest.FixtureRequest) -> Implementation:
    return PYTHON if request.param == "python" else compiled_twin()


def submitted(implementation: Implementation, batch: list[object]) -> Submission:
    rules = compile_rules(RULES, filename="rules.yaml", env={})
    source = rules.sources["web"]
    prepared = implementation.prepare(rules, {"batch": batch}, CallShape(True), source, EventContext("web"), None,
                       presented_key=WEB_KEY, forwarded_for="198.51.100.7")
    return prepared.submission


def test_each_event_is_filed_with_its_id_type_and_name(implementation: Implementation) -> None:
    submission = submitted(implementation, [
        {"type": "track", "event": "Order Done", "userId": "u", "messageId": "m-order"},
        {"type": "page", "name": "Home", "userId": "u", "messageId": "m-page"},
        {"type": "screen", "userId": "u", "messageId": "m-screen"},  # no name: its type
        {"type": "track", "event": 7, "userId": "u", "messageId": "m-odd"},  # not a string: its type
        {"type": "identify", "userId": "u"},  # messageId stamped
    ])
    segment = submission.primary["segment"]
    assert [orjson.loads(data)["messageId"] for data in segment.events] == segment.message_ids
    assert segment.message_ids[:4] == ["m-order", "m-page", "m-screen", "m-odd"] and len(segment.message_ids[4]) == 36
    assert segment.types == ["track", "page", "screen", "track", "identify"]
    assert segment.names == ["Order Done", "Home", "screen", "track", "identify"]
    rudder = submission.mirror["rudderstack"]  # the transformed copy carries its own name
    assert (rudder.message_ids, rudder.types, rudder.names) == (["m-order"], ["track"], ["Order Completed"])
    assert orjson.loads(rudder.events[0])["event"] == "Order Completed"
    assert list(submission.primary) == ["segment"] and list(submission.mirror) == ["rudderstack"]
    assert (submission.source.name, submission.presented_key, submission.forwarded_for) == ("web", WEB_KEY, "198.51.100.7")
    assert WEB_KEY not in repr(submission)


def test_rejections_are_typed_and_answered_as_before(implementation: Implementation) -> None:
    submission = submitted(implementation, [{"type": "track", "event": "x", "userId": "u"}, "not an event", {"type": "track", "event": "y"}])
    assert submission.rejected == (
        Rejection(1, "invalid_event", "event is not a JSON object (str)"),
        Rejection(2, "no_user_anon_id", "event has neither userId nor anonymousId"),
    )
    assert submission.rejected[1].as_json() == {"index": 2, "code": "no_user_anon_id", "message": "event has neither userId nor anonymousId"}
    assert len(submission.primary["segment"]) == 1
