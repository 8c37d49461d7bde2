"""The cohort hash is a contract (rules schema version 1): golden cases pin it exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.engine import NO_KEY_BUCKET, bucket, compile_rules, decide
from tests.conftest import SHARED_GOLDEN, VENDORED_GOLDEN
from tests.rules_texts import HEAD


def _golden_cases() -> list[dict[str, object]]:
    return [json.loads(line) for line in VENDORED_GOLDEN.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_vendored_golden_file_matches_the_shared_one() -> None:
    # The shared reference is the source of truth; the vendored copy exists so a checkout without
    # shared/ beside it still pins the contract. They must never drift apart.
    if not SHARED_GOLDEN.exists():
        pytest.skip(f"{SHARED_GOLDEN} not present beside this checkout")
    assert VENDORED_GOLDEN.read_bytes() == SHARED_GOLDEN.read_bytes()


def test_golden_file_has_cases() -> None:
    assert len(_golden_cases()) == 200


@pytest.mark.parametrize("case", _golden_cases(), ids=lambda c: f"{c['salt']}:{c['key']!s:.20}")
def test_golden_bucket(case: dict[str, object]) -> None:
    assert bucket(str(case["salt"]), str(case["key"])) == case["bucket"]


@given(st.text(), st.text())
def test_bucket_is_the_documented_formula(salt: str, key: str) -> None:
    expected = mmh3.hash(f"{salt}:{key}".encode(), seed=0, signed=False) % 10000
    assert bucket(salt, key) == expected


def test_no_key_bucket_is_the_last_one() -> None:
    assert NO_KEY_BUCKET == 9999


def _split_text(first: str, second: str) -> str:
    return HEAD + f"""\
cohort: {{key: [anonymousId, userId], salt: s}}
rules:
  - name: split
    route:
      split: {{rudderstack: {first}, segment: {second}}}
"""


def _split_rules(first: str, second: str):  # type: ignore[no-untyped-def]
    return compile_rules(_split_text(first, second))


_DECIDE_IN_CHILD = """
import json, sys
from proxy.engine import compile_rules, decide
rules = compile_rules(sys.stdin.read().split("\\0")[0])
keys = json.loads(open(sys.argv[1]).read())
print(json.dumps([[decide(rules, {"anonymousId": k}).primary[0], decide(rules, {"anonymousId": k}).bucket] for k in keys]))
"""


def test_same_decisions_in_processes_with_different_hash_seeds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Python's str hash is randomised per process; nothing in a decision may depend on it.
    keys = [f"user-{i}" for i in range(300)] + ["", " ", "é", "日本", "42"]
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(keys))
    text = _split_text("33.33", "66.67")
    outputs = set()
    for seed in ("0", "1", "12345", "random"):
        result = subprocess.run(
            [sys.executable, "-c", _DECIDE_IN_CHILD, str(keys_file)],
            input=text, capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(VENDORED_GOLDEN.parents[2])},
        )
        outputs.add(result.stdout)
    assert len(outputs) == 1
    here = _split_rules("33.33", "66.67")
    assert json.loads(outputs.pop()) == [[decide(here, {"anonymousId": k}).primary[0], decide(here, {"anonymousId": k}).bucket] for k in keys]


percents = st.integers(min_value=0, max_value=10000)


@settings(max_examples=60, deadline=None)
@given(low=percents, high=percents, keys=st.lists(st.text(min_size=1, max_size=24), min_size=1, max_size=200))
def test_raising_the_first_percent_never_moves_a_key_away_from_it(low: int, high: int, keys: list[str]) -> None:
    low, high = min(low, high), max(low, high)
    before = _split_rules(f"{low / 100:.2f}", f"{(10000 - low) / 100:.2f}")
    after = _split_rules(f"{high / 100:.2f}", f"{(10000 - high) / 100:.2f}")
    for key in keys:
        if key.strip() and decide(before, {"anonymousId": key}).primary == ("rudderstack",):
            assert decide(after, {"anonymousId": key}).primary == ("rudderstack",)


@pytest.mark.parametrize("percent", ["5", "30", "50", "12.34", "99.5"])
def test_observed_split_is_within_half_a_point_over_100k_keys(percent: str) -> None:
    rules = _split_rules(percent, f"{100 - float(percent):.2f}")
    hits = sum(1 for i in range(100_000) if decide(rules, {"userId": f"u{i}@example.com"}).primary == ("rudderstack",))
    assert abs(hits / 1000 - float(percent)) <= 0.5
