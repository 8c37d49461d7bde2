"""Ramp schedules in the engine: every validation error with its full text and line, the split in
effect before, at, between and after steps, and the forward-only promise for every cohort key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.engine import RuleSet, compile_rules, decide
from proxy.engine.ramp import effective_rules, next_step_at, ramp_views
from proxy.engine.rollout import SplitChange, compare
from tests.rules_texts import HEAD_WITH_WAREHOUSE, lines
from tests.test_engine_errors import errors

HEAD = HEAD_WITH_WAREHOUSE + """\
rules:
  - name: ramped
    route:
      split: SPLIT
      ramp:
"""
RAMP = lines(HEAD)  # the line of `ramp:`; `split:` is the line before it
T1, T2, T3 = "2026-12-01T00:00:00Z", "2026-12-08T00:00:00Z", "2026-12-15T00:00:00Z"
BACKWARDS = "ramps only move forward (to roll back, edit the split and reload)"


def ramp_step(i: int) -> str:
    """Where a problem of step i is reported: its own line, RAMP + 1 + i."""
    return f"rules.yaml:{RAMP + 1 + i}: rules[0].route.ramp[{i}]"


def ramp_file(*steps: str, split: str = "{rudderstack: 5, segment: 95}", rule_extra: str = "") -> str:
    return HEAD.replace("SPLIT", split) + "".join(f"        - {step}\n" for step in steps) + rule_extra


def ramp_errors(*steps: str, split: str = "{rudderstack: 5, segment: 95}", rule_extra: str = "") -> list[str]:
    return errors(ramp_file(*steps, split=split, rule_extra=rule_extra))


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


WEEKLY = ramp_file(f"{{at: {T1}, rudderstack: 10}}", f'{{at: "{T2}", rudderstack: 25}}', f"{{at: {T3}, rudderstack: 100}}")


def weekly() -> RuleSet:
    return compile_rules(WEEKLY, env={})


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps, expected",
    [
        ((f"{{at: {T1}, rudderstack: 25}}", f"{{at: {T2}, rudderstack: 20}}"),
         [f"{ramp_step(1)}: rudderstack goes from 25 to 20 %, which would move users back to segment; {BACKWARDS}"]),
        ((f"{{at: {T1}, rudderstack: 3}}",),
         [f"{ramp_step(0)}: rudderstack goes from 5 to 3 %, which would move users back to segment; {BACKWARDS}"]),
        ((f"{{at: {T2}, rudderstack: 10}}", f"{{at: {T1}, rudderstack: 20}}"),
         [f"{ramp_step(1)}.at: 2026-12-01T00:00:00Z is not after the previous step's 2026-12-08T00:00:00Z; steps must be in time order"]),
        ((f"{{at: {T1}, rudderstack: 10}}", "{at: 2026-12-01T01:00:00+01:00, rudderstack: 20}"),
         [f"{ramp_step(1)}.at: 2026-12-01T00:00:00Z is not after the previous step's 2026-12-01T00:00:00Z; steps must be in time order"]),
        (("{at: 2026-12-01T00:00:00, rudderstack: 10}",),
         [f"{ramp_step(0)}.at: 2026-12-01T00:00:00 has no timezone: add Z (UTC) or an offset such as +01:00"]),
        (('{at: "2026-12-01 00:00", rudderstack: 10}',),
         [f"{ramp_step(0)}.at: 2026-12-01T00:00:00 has no timezone: add Z (UTC) or an offset such as +01:00"]),
        (("{at: 2026-12-01, rudderstack: 10}",),
         [f"{ramp_step(0)}.at: 2026-12-01 is a date: give a time with a timezone, such as 2026-12-01T00:00:00Z"]),
        (("{at: next monday, rudderstack: 10}",),
         [f"{ramp_step(0)}.at: must be an ISO 8601 time with a timezone, such as 2026-12-01T00:00:00Z, not 'next monday'"]),
        (("{at: 1764547200, rudderstack: 10}",),
         [f"{ramp_step(0)}.at: must be an ISO 8601 time with a timezone, such as 2026-12-01T00:00:00Z, not '1764547200'"]),
        (("{at: [2026], rudderstack: 10}",), [f"{ramp_step(0)}.at: must be a single value, not a list"]),
        ((f"{{at: {T1}, rudderstack: 101}}",), [f"{ramp_step(0)}.rudderstack: percent 101 is over 100"]),
        ((f"{{at: {T1}, rudderstack: 10.005}}",),
         [f"{ramp_step(0)}.rudderstack: percent 10.005 has more than two decimals (the finest step is 0.01)"]),
        ((f"{{at: {T1}, rudderstack: -1}}",), [f"{ramp_step(0)}.rudderstack: must be a number at least 0, not -1"]),
        ((f"{{at: {T1}, rudderstack: lots}}",), [f"{ramp_step(0)}.rudderstack: must be a number, not 'lots'"]),
        (("{rudderstack: 10}",),
         [f"{ramp_step(0)}.at: is required: when this step takes effect, such as 2026-12-01T00:00:00Z"]),
        ((f"{{at: {T1}}}",), [f"{ramp_step(0)}.rudderstack: is required: the percent of rudderstack from this step on"]),
        ((f"{{at: {T1}, rudderstack: 10, segment: 90}}",),
         [f"{ramp_step(0)}.segment: give the percent of rudderstack, the destination that ramps; segment gets the rest"]),
        ((f"{{at: {T1}, rudderstack: 10, warehouse: 5}}",),
         [f"{ramp_step(0)}.warehouse: 'warehouse' is not in this rule's split (rudderstack, segment)"]),
        ((f"{{at: {T1}, rudderstack: 10, amplitude: 5}}",),
         [f"{ramp_step(0)}.amplitude: unknown destination 'amplitude' (destinations: segment, rudderstack, warehouse)"]),
        (("10",), [f"{ramp_step(0)}: must be a mapping, not a value"]),
    ],
)
def test_step_problems(steps: tuple[str, ...], expected: list[str]) -> None:
    assert ramp_errors(*steps) == expected


def test_every_problem_of_every_step_is_reported_at_once() -> None:
    assert ramp_errors(f"{{at: {T2}, rudderstack: 50}}", f"{{at: {T1}, rudderstack: 20}}", "{at: soon, rudderstack: 101}") == [
        f"{ramp_step(1)}: rudderstack goes from 50 to 20 %, which would move users back to segment; {BACKWARDS}",
        f"{ramp_step(1)}.at: 2026-12-01T00:00:00Z is not after the previous step's 2026-12-08T00:00:00Z; steps must be in time order",
        f"{ramp_step(2)}.at: must be an ISO 8601 time with a timezone, such as 2026-12-01T00:00:00Z, not 'soon'",
        f"{ramp_step(2)}.rudderstack: percent 101 is over 100",
    ]


def test_reshuffle_true_does_not_allow_a_ramp_to_move_users_back() -> None:
    assert ramp_errors(f"{{at: {T1}, rudderstack: 1}}", rule_extra="    reshuffle: true\n") == [
        f"{ramp_step(0)}: rudderstack goes from 5 to 1 %, which would move users back to segment; {BACKWARDS}",
    ]


def test_a_step_that_keeps_the_percent_is_allowed() -> None:
    rules = compile_rules(ramp_file(f"{{at: {T1}, rudderstack: 5}}", f"{{at: {T2}, rudderstack: 5}}"), env={})
    assert [step.split.percents for step in rules.rules[0].route.ramp.steps] == [(("rudderstack", 5.0), ("segment", 95.0))] * 2  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "ramp, expected",
    [
        ("[]", "must be a non-empty list of steps such as {at: 2026-12-01T00:00:00Z, DESTINATION: PERCENT}"),
        (f"{{at: {T1}, rudderstack: 10}}", "must be a non-empty list of steps such as {at: 2026-12-01T00:00:00Z, DESTINATION: PERCENT}"),
    ],
)
def test_ramp_must_be_a_list(ramp: str, expected: str) -> None:
    text = HEAD.replace("SPLIT", "{rudderstack: 5, segment: 95}").replace("      ramp:\n", f"      ramp: {ramp}\n")
    assert errors(text) == [f"rules.yaml:{RAMP}: rules[0].route.ramp: {expected}"]


def test_ramp_needs_a_split() -> None:
    text = HEAD.replace("      split: SPLIT\n", "      to: [segment]\n") + f"        - {{at: {T1}, rudderstack: 10}}\n"
    assert errors(text) == [f"rules.yaml:{RAMP}: rules[0].route.ramp: needs a `split` next to it: the percents that apply before the first step"]


def test_only_a_two_destination_split_ramps() -> None:
    assert ramp_errors(f"{{at: {T1}, rudderstack: 10}}", split="{rudderstack: 5, warehouse: 5, segment: 90}") == [
        f"rules.yaml:{RAMP}: rules[0].route.ramp: only a split of two destinations can ramp "
        "(the first-listed ramps, the other gets the rest), this one has 3",
    ]


def test_a_broken_split_is_reported_once_not_again_through_its_ramp() -> None:
    assert ramp_errors(f"{{at: {T1}, rudderstack: 10}}", split="{rudderstack: 5, segment: 90}") == [
        f"rules.yaml:{RAMP - 1}: rules[0].route.split: percents sum to 95, must be 100",
    ]


def test_times_may_be_written_quoted_unquoted_or_with_an_offset() -> None:
    rules = compile_rules(ramp_file(f"{{at: {T1}, rudderstack: 10}}", '{at: "2026-12-08T01:00:00+01:00", rudderstack: 20}'), env={})
    assert [step.at for step in rules.rules[0].route.ramp.steps] == [at(T1), at(T2)]  # type: ignore[union-attr]


# --- the rules in effect --------------------------------------------------------------------------


def rudder_percent(rules: RuleSet) -> float:
    return dict(rules.rules[0].route.split.percents)["rudderstack"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "when, percent",
    [
        ("2026-11-30T23:59:59Z", 5.0),  # before the first step: the split itself
        (T1, 10.0),  # a step applies from its own time on
        ("2026-12-04T12:00:00+02:00", 10.0),  # between steps
        (T2, 25.0),
        ("2026-12-14T23:59:59.999999Z", 25.0),
        (T3, 100.0),
        ("2030-01-01T00:00:00Z", 100.0),  # after the last step it stays
    ],
)
def test_effective_split_before_at_between_and_after_steps(when: str, percent: float) -> None:
    rules = weekly()
    live = effective_rules(rules, at(when))
    assert rudder_percent(live) == percent
    assert dict(live.rules[0].route.split.percents)["segment"] == 100.0 - percent  # type: ignore[union-attr]
    assert effective_rules(live, at(when)) is live  # idempotent: applying it again changes nothing
    assert rudder_percent(effective_rules(live, at("2026-01-01T00:00:00Z"))) == 5.0  # the ramp is kept, so any time can be asked again


def test_nothing_due_returns_the_rules_themselves() -> None:
    rules = weekly()
    assert effective_rules(rules, at("2026-11-01T00:00:00Z")) is rules
    plain = compile_rules(HEAD.replace("SPLIT", "{rudderstack: 5, segment: 95}").replace("      ramp:\n", ""), env={})
    assert effective_rules(plain, at(T3)) is plain


def test_decisions_follow_the_step_in_effect() -> None:
    rules = weekly()
    keys = [f"user-{i}" for i in range(2000)]

    def share(when: str) -> float:
        live = effective_rules(rules, at(when))
        return sum(decide(live, {"type": "track", "anonymousId": k}).primary == ("rudderstack",) for k in keys) / len(keys)

    assert 0.03 < share("2026-11-01T00:00:00Z") < 0.07
    assert 0.2 < share(T2) < 0.3
    assert share(T3) == 1.0


def test_next_step_time() -> None:
    rules = weekly()
    assert next_step_at(rules, at("2026-01-01T00:00:00Z")) == at(T1)
    assert next_step_at(rules, at(T1)) == at(T2)  # a step due now is not "next"
    assert next_step_at(rules, at(T3)) is None


def test_next_step_time_is_the_earliest_over_all_rules() -> None:
    rules = compile_rules(ramp_file(f"{{at: {T1}, rudderstack: 10}}", f"{{at: {T3}, rudderstack: 100}}", rule_extra=(
        "    when: {source: web}\n"
        "  - name: other\n"
        "    route:\n"
        "      split: {rudderstack: 0, segment: 100}\n"
        "      ramp: [{at: 2026-12-03T00:00:00Z, rudderstack: 50}]\n"
    )), env={})
    assert next_step_at(rules, at(T1)) == at("2026-12-03T00:00:00Z")
    assert [v.rule for v in ramp_views(rules, at(T1))] == ["ramped", "other"]


def test_views_show_the_current_and_next_step() -> None:
    (view,) = ramp_views(weekly(), at("2026-12-04T00:00:00Z"))
    assert view.as_dict() == {
        "rule": "ramped",
        "start": {"rudderstack": 5.0, "segment": 95.0},
        "steps": [
            {"at": T1, "split": {"rudderstack": 10.0, "segment": 90.0}},
            {"at": T2, "split": {"rudderstack": 25.0, "segment": 75.0}},
            {"at": T3, "split": {"rudderstack": 100.0, "segment": 0.0}},
        ],
        "current_step": 0,
        "next_step_at": T2,
    }


def test_rollout_safety_sees_steps_as_forward_moves() -> None:
    rules = weekly()
    report = compare(effective_rules(rules, at(T1)), effective_rules(rules, at(T2)))
    assert report.refused == () and report.changes == (SplitChange("ramped", 1500, 0),)
    # The same file reloaded mid-ramp, compared at the same time, moves no one.
    assert compare(effective_rules(rules, at(T2)), effective_rules(weekly(), at(T2))).changes == ()


# --- the forward-only promise ---------------------------------------------------------------------

times = st.datetimes(min_value=datetime(2026, 11, 1), max_value=datetime(2027, 2, 1), timezones=st.just(UTC))
steps = st.lists(st.integers(min_value=0, max_value=10000), min_size=1, max_size=6).map(sorted)


@settings(max_examples=150, deadline=None)
@given(key=st.text(min_size=1, max_size=12), start=st.integers(min_value=0, max_value=10000), bounds=steps,
       first=times, second=times)
def test_no_key_ever_moves_back_from_the_first_arm(key: str, start: int, bounds: list[int], first: datetime, second: datetime) -> None:
    start = min(start, bounds[0])
    pct = [f"{b / 100:.2f}" for b in bounds]
    rules = compile_rules(ramp_file(
        *(f"{{at: {(datetime(2026, 12, 1, tzinfo=UTC) + timedelta(days=7 * i)).isoformat()}, rudderstack: {p}}}" for i, p in enumerate(pct)),
        split=f"{{rudderstack: {start / 100:.2f}, segment: {(10000 - start) / 100:.2f}}}",
    ), env={})
    early, late = sorted((first, second))
    event = {"type": "track", "anonymousId": key}
    if decide(effective_rules(rules, early), event).primary == ("rudderstack",):
        assert decide(effective_rules(rules, late), event).primary == ("rudderstack",)
