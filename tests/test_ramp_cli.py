"""`splitter check / simulate / explain` with a ramp schedule, run as a real process on rules/ramp.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.engine import bucket
from tests.conftest import RULES_DIR
from tests.test_cli_engine import run

RAMP = RULES_DIR / "ramp.yaml"
SALT = "segment-to-rudderstack"
STEPS = {"2026-12-15T09:00:00Z": 10, "2026-12-22T09:00:00Z": 25, "2026-12-29T09:00:00Z": 50, "2027-01-05T09:00:00Z": 100}


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "events.ndjson"
    path.write_text("\n".join(json.dumps({"type": "track", "event": "E", "userId": f"user-{i}"}) for i in range(2000)) + "\n")
    return path


def test_check_prints_the_schedule(rules_env: dict[str, str]) -> None:
    result = run(["check", str(RAMP)], rules_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{RAMP}: ok: 1 rules (1 with a split)")
    assert [line.removesuffix("   <- now") for line in lines[1:]] == [
        "ramp of rule 'weekly-ramp':",
        "  before                rudderstack 5 %, segment 95 %",
        "  2026-12-15T09:00:00Z  rudderstack 10 %, segment 90 %",
        "  2026-12-22T09:00:00Z  rudderstack 25 %, segment 75 %",
        "  2026-12-29T09:00:00Z  rudderstack 50 %, segment 50 %",
        "  2027-01-05T09:00:00Z  rudderstack 100 %, segment 0 %",
    ]
    assert sum(line.endswith("   <- now") for line in lines) == 1


@pytest.mark.parametrize("at, percent, position", [
    ("2026-12-15T08:59:59Z", 5, "before its first step (rudderstack 5 %, segment 95 %)"),
    ("2026-12-22T09:00:00Z", 25, "step 2 of 4 (rudderstack 25 %, segment 75 %)"),
    ("2026-12-24T10:00:00+01:00", 25, "step 2 of 4 (rudderstack 25 %, segment 75 %)"),
    ("2027-02-01T00:00:00Z", 100, "step 4 of 4 (rudderstack 100 %, segment 0 %)"),
])
def test_simulate_at_rehearses_a_step(at: str, percent: int, position: str, sample: Path, rules_env: dict[str, str]) -> None:
    result = run(["simulate", str(RAMP), str(sample), "--write-key", "seg-web-key", "--at", at], rules_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    shown = at.replace("2026-12-24T10:00:00+01:00", "2026-12-24T09:00:00Z")
    assert lines[:2] == [f"2000 events, 2000 distinct cohort keys ({RAMP})", f"at {shown}: rule 'weekly-ramp' is {position}"]
    expected = sum(bucket(SALT, f"user-{i}") < percent * 100 for i in range(2000))
    row = next(line.split() for line in lines if line.startswith("weekly-ramp") and " rudderstack " in line)
    assert int(row[3]) == expected


def test_simulate_against_the_previous_step_shows_users_only_moving_forward(sample: Path, rules_env: dict[str, str]) -> None:
    result = run(["simulate", str(RAMP), str(sample), "--write-key", "seg-web-key", "--against", str(RAMP), "--at", "2026-12-29T09:00:00Z"],
                 rules_env)
    assert result.returncode == 0, result.stderr
    assert "0 of 2000 cohort keys" in result.stdout  # both sides at the same time: the same step


def test_explain_at_decides_with_the_step_due(rules_env: dict[str, str]) -> None:
    user = next(f"user-{i}" for i in range(1000) if 1000 <= bucket(SALT, f"user-{i}") < 2500)  # rudderstack from the 25 % step
    event = json.dumps({"type": "track", "event": "E", "userId": user, "writeKey": "seg-web-key"})
    primaries = [json.loads(run(["explain", str(RAMP), "-", "--at", when], rules_env, stdin=event).stdout)["primary"] for when in STEPS]
    assert primaries == [["segment"], ["rudderstack"], ["rudderstack"], ["rudderstack"]]


@pytest.mark.parametrize("at, message", [
    ("next week", "'next week' is not an ISO 8601 time such as 2026-12-01T00:00:00Z"),
    ("2026-12-15T09:00:00", "'2026-12-15T09:00:00' has no timezone: add Z (UTC) or an offset such as +01:00"),
])
def test_a_bad_at_is_a_usage_error(at: str, message: str, sample: Path, rules_env: dict[str, str]) -> None:
    result = run(["simulate", str(RAMP), str(sample), "--at", at], rules_env)
    assert result.returncode == 2
    assert f"Invalid value for '--at': {message}" in result.stderr
