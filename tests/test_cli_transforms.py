"""`splitter explain` with transforms, on the shipped example: the event each destination would receive."""

from __future__ import annotations

import hashlib
import json
from itertools import count

from proxy.engine import bucket
from tests.conftest import RULES_DIR, RULES_ENV
from tests.test_cli_engine import run

EXAMPLE = str(RULES_DIR / "transforms.yaml")
DECISION_KEYS = ["rule", "primary", "mirror", "bucket", "cohort_key"]
SALT = "segment-to-rudderstack"  # the example's cohort salt: its `everyone` rule sends buckets 0-999 to RudderStack


def user_in(low: int, high: int) -> str:
    return next(user for user in (f"u-{i}" for i in count()) if low <= bucket(SALT, user) < high)


def hashed(email: str) -> str:
    return hashlib.sha256((RULES_ENV["PII_SALT"] + email).encode()).hexdigest()


def test_explain_shows_the_transformed_event_per_destination(rules_env: dict[str, str]) -> None:
    legacy = {
        "type": "track", "event": "Order Done", "anonymousId": "dev-1",
        "context": {"app": {"version": "4.1.0"}, "traits": {"email": "ada@example.com"}},
        "properties": {"total_cents": 1250, "card_last4": "4242"},
    }
    rudder_user, segment_user = user_in(0, 1000), user_in(1000, 10000)
    identify = {"type": "identify", "userId": rudder_user, "traits": {"email": "bob@example.com", "plan": "pro"}}
    page = {"type": "page", "userId": segment_user, "context": {"traits": {"email": "eve@example.com"}}}
    stdin = "\n".join(json.dumps(e) for e in (legacy, identify, page)) + "\n"
    result = run(["explain", EXAMPLE, "-", "--write-key", RULES_ENV["SEGMENT_WRITE_KEY_IOS"]], rules_env, stdin=stdin)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(list(line) == [*DECISION_KEYS, "transformed"] for line in lines)  # the documented keys, then the copies
    assert (lines[0]["rule"], lines[0]["primary"], lines[0]["mirror"]) == ("legacy-ios-builds", ["segment"], ["rudderstack"])
    assert lines[0]["transformed"] == {
        "rudderstack": {
            "type": "track", "event": "Order Completed", "anonymousId": "dev-1",
            "context": {"app": {"version": "4.1.0"}, "traits": {"email": hashed("ada@example.com")}, "splitter": {"transformed": True}},
            "properties": {"revenue_cents": 1250},
        },
    }
    assert (lines[1]["rule"], lines[1]["primary"], lines[1]["mirror"]) == ("everyone", ["rudderstack"], ["segment"])
    assert lines[1]["transformed"] == {  # only RudderStack's copy: Segment's mirror gets the event as it is
        "rudderstack": {"type": "identify", "userId": rudder_user, "traits": {"email": hashed("bob@example.com"), "plan": "pro"},
                        "context": {"splitter": {"transformed": True}}},
    }
    assert (lines[2]["primary"], lines[2]["mirror"], lines[2]["transformed"]) == (["segment"], [], {})  # no transformed destination


def test_explain_without_transforms_keeps_its_documented_keys(rules_env: dict[str, str]) -> None:
    result = run(["explain", str(RULES_DIR / "parallel-mirror.yaml")], rules_env, stdin='{"type": "page", "userId": "u"}')
    assert result.returncode == 0, result.stderr
    assert list(json.loads(result.stdout)) == DECISION_KEYS
