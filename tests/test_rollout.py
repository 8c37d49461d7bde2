"""`rollout.compare(old, new)`: widening, rollbacks, and refused reshuffles."""

from __future__ import annotations

import pytest

from proxy.engine import RuleSet, compile_rules
from proxy.engine.rollout import RolloutReport, SplitChange, compare

HEAD = """\
version: 1
destinations:
  segment: {kind: segment, url: "http://seg.test"}
  rudderstack: {kind: rudderstack, url: "http://rs.test"}
  warehouse: {kind: segment, url: "http://wh.test"}
sources:
  - {name: web, write_keys: [web-key-000001]}
"""


def ruleset(split: str, *, cohort: str = "{salt: s}", rule_extra: str = "", name: str = "r") -> RuleSet:
    """One split rule (`name`) and, after it, the non-split default rule."""
    return compile_rules(
        HEAD
        + f"cohort: {cohort}\n"
        + f"rules:\n  - name: {name}\n    when: {{source: web}}\n    route: {{split: {split}}}\n{rule_extra}"
        + "  - name: default\n    route: segment\n",
        env={},
    )


def refusal(rule: str, reason: str) -> str:
    return (
        f"rule {rule!r}: {reason}; this reshuffles users between destinations. "
        "Set `reshuffle: true` on the rule (or on the cohort) to do it anyway"
    )


def test_identical_files_change_nothing() -> None:
    old = ruleset("{rudderstack: 5, segment: 95}")
    assert compare(old, ruleset("{rudderstack: 5, segment: 95}")) == RolloutReport((), ())


def test_raising_a_percent_moves_buckets_forward_only() -> None:
    report = compare(ruleset("{rudderstack: 5, segment: 95}"), ruleset("{rudderstack: 10, segment: 90}"))
    assert report.refused == ()
    assert report.changes == (SplitChange("r", 500, 0),)
    assert report.rollbacks == ()


def test_raising_by_a_hundredth_moves_one_bucket() -> None:
    report = compare(ruleset("{rudderstack: 12.34, segment: 87.66}"), ruleset("{rudderstack: 12.35, segment: 87.65}"))
    assert report.changes == (SplitChange("r", 1, 0),)


def test_lowering_a_percent_is_a_rollback() -> None:
    report = compare(ruleset("{rudderstack: 25, segment: 75}"), ruleset("{rudderstack: 20, segment: 80}"))
    assert report.refused == ()
    assert report.changes == (SplitChange("r", 0, 500),)
    assert report.rollbacks == (SplitChange("r", 0, 500),)


def test_full_rollback_from_100_to_0() -> None:
    report = compare(ruleset("{rudderstack: 100, segment: 0}"), ruleset("{rudderstack: 0, segment: 100}"))
    assert report.rollbacks == (SplitChange("r", 0, 10000),)


@pytest.mark.parametrize(
    "before, after, forward, back",
    [
        # 1000-1999 move from warehouse to rudderstack (earlier arm): forward.
        ("{rudderstack: 10, warehouse: 20, segment: 70}", "{rudderstack: 20, warehouse: 10, segment: 70}", 1000, 0),
        # Only the boundary between the last two arms moves: 9000-9499 segment -> warehouse.
        ("{rudderstack: 10, warehouse: 80, segment: 10}", "{rudderstack: 10, warehouse: 85, segment: 5}", 500, 0),
    ],
)
def test_three_arm_moves_are_counted_per_bucket(before: str, after: str, forward: int, back: int) -> None:
    report = compare(ruleset(before), ruleset(after))
    assert report.refused == ()
    assert report.changes == (SplitChange("r", forward, back),)
    assert report.rollbacks == ((SplitChange("r", forward, back),) if back else ())


def test_a_split_moving_users_both_ways_at_once_is_a_reshuffle() -> None:
    # 500-999 rudderstack -> warehouse (back); 3000-3499 segment -> warehouse (forward).
    before, after = "{rudderstack: 10, warehouse: 20, segment: 70}", "{rudderstack: 5, warehouse: 30, segment: 65}"
    report = compare(ruleset(before), ruleset(after))
    assert report.refused == (
        "rule 'r': the split moves 500 buckets toward earlier arms and 500 back at once; this reshuffles users between "
        "destinations. Set `reshuffle: true` on the rule (or on the cohort) to do it anyway",
    )
    consented = compare(ruleset(before), ruleset(after, rule_extra="    reshuffle: true\n"))
    assert consented.refused == () and consented.changes == (SplitChange("r", 500, 500),)


def test_salt_change_is_refused_and_names_the_rule() -> None:
    report = compare(ruleset("{rudderstack: 5, segment: 95}"), ruleset("{rudderstack: 10, segment: 90}", cohort="{salt: t}"))
    assert report.refused == (refusal("r", "cohort salt changed from 's' to 't'"),)
    assert "reshuffle: true" in report.refused[0]
    assert report.changes == ()


def test_salt_change_in_a_rule_cohort_is_refused() -> None:
    old = ruleset("{rudderstack: 5, segment: 95}", rule_extra="    cohort: {salt: a}\n")
    new = ruleset("{rudderstack: 5, segment: 95}", rule_extra="    cohort: {salt: b}\n")
    assert compare(old, new).refused == (refusal("r", "cohort salt changed from 'a' to 'b'"),)


def test_key_change_is_refused() -> None:
    old = ruleset("{rudderstack: 5, segment: 95}")
    new = ruleset("{rudderstack: 5, segment: 95}", cohort="{salt: s, key: [userId]}")
    assert compare(old, new).refused == (refusal("r", "cohort key changed from ['anonymousId', 'userId'] to ['userId']"),)


def test_key_order_change_is_refused() -> None:
    old = ruleset("{rudderstack: 5, segment: 95}")
    new = ruleset("{rudderstack: 5, segment: 95}", cohort="{salt: s, key: [userId, anonymousId]}")
    assert compare(old, new).refused == (refusal("r", "cohort key changed from ['anonymousId', 'userId'] to ['userId', 'anonymousId']"),)


def test_arm_order_change_is_refused() -> None:
    report = compare(ruleset("{rudderstack: 5, segment: 95}"), ruleset("{segment: 95, rudderstack: 5}"))
    assert report.refused == (refusal("r", "split order changed from ['rudderstack', 'segment'] to ['segment', 'rudderstack']"),)
    assert report.changes == ()


def test_adding_an_arm_is_an_order_change() -> None:
    report = compare(ruleset("{rudderstack: 5, segment: 95}"), ruleset("{rudderstack: 5, warehouse: 5, segment: 90}"))
    assert report.refused == (
        refusal("r", "split order changed from ['rudderstack', 'segment'] to ['rudderstack', 'warehouse', 'segment']"),
    )


@pytest.mark.parametrize(
    "change",
    [
        {"cohort": "{salt: t}"},
        {"cohort": "{salt: s, key: [userId]}"},
        {"split": "{segment: 95, rudderstack: 5}"},
    ],
    ids=["salt", "key", "order"],
)
@pytest.mark.parametrize(
    "acknowledge",
    [
        {"rule_extra": "    reshuffle: true\n"},
        {"cohort_reshuffle": True},
        {"rule_extra": "    cohort: {reshuffle: true}\n"},
    ],
    ids=["on-rule", "on-top-cohort", "on-rule-cohort"],
)
def test_reshuffle_true_accepts_it(change: dict[str, str], acknowledge: dict[str, object]) -> None:
    old = ruleset("{rudderstack: 5, segment: 95}")
    cohort = change.get("cohort", "{salt: s}")
    if acknowledge.get("cohort_reshuffle"):
        cohort = cohort[:-1] + ", reshuffle: true}"
    new = ruleset(change.get("split", "{rudderstack: 5, segment: 95}"), cohort=cohort, rule_extra=str(acknowledge.get("rule_extra", "")))
    assert compare(old, new) == RolloutReport((), ())
    assert compare(old, ruleset(change.get("split", "{rudderstack: 5, segment: 95}"), cohort=change.get("cohort", "{salt: s}"))).refused != ()


def test_reshuffle_on_the_old_file_does_not_count() -> None:
    old = ruleset("{rudderstack: 5, segment: 95}", rule_extra="    reshuffle: true\n")
    new = ruleset("{rudderstack: 5, segment: 95}", cohort="{salt: t}")
    assert compare(old, new).refused == (refusal("r", "cohort salt changed from 's' to 't'"),)


def test_reshuffle_false_is_not_an_acknowledgement() -> None:
    new = ruleset("{rudderstack: 5, segment: 95}", cohort="{salt: t, reshuffle: false}", rule_extra="    reshuffle: false\n")
    assert len(compare(ruleset("{rudderstack: 5, segment: 95}"), new).refused) == 1


def test_a_renamed_rule_is_judged_by_where_its_users_go() -> None:
    # Renaming escapes the by-name split comparison, not the per-class one: a new salt and a new
    # percentage move users both ways, as a salt change would.
    old = ruleset("{rudderstack: 5, segment: 95}", name="old-name")
    renamed = compare(old, ruleset("{rudderstack: 50, segment: 50}", cohort="{salt: other}", name="new-name"))
    assert renamed.refused and "rule 'new-name' (events that rule 'old-name' decided before)" in renamed.refused[0]
    # Same cohort, same split, another name: nobody moves.
    assert compare(old, ruleset("{rudderstack: 5, segment: 95}", name="new-name")) == RolloutReport((), ())


def test_a_rule_that_stops_splitting_is_judged_per_class() -> None:
    split = ruleset("{rudderstack: 5, segment: 95}")
    plain = compile_rules(
        HEAD + "cohort: {salt: zzz}\nrules:\n  - name: r\n    when: {source: web}\n    route: rudderstack\n"
        "  - name: default\n    route: {to: [segment], mirror: [rudderstack]}\n",
        env={},
    )
    widened = compare(split, plain)  # the 95 % on Segment move to RudderStack: forward only
    assert widened.refused == () and widened.changes == () and widened.move_rollbacks == ()
    assert {(m.what, m.direction, round(m.share)) for m in widened.moves} == {
        ("primary", "forward", 95), ("copy_gained", "forward", 95), ("copy_lost", "forward", 95),
        ("copy_gained", "forward", 100)}  # the default rule gains a RudderStack mirror
    narrowed = compare(plain, split)  # back to 5 %: 95 % of the users move back
    assert narrowed.refused == ()
    assert [(m.what, m.before, m.after, round(m.share)) for m in narrowed.move_rollbacks] == [
        ("copy_lost", "primary", "", 95), ("primary", "rudderstack", "segment", 95),
        ("copy_lost", "mirror", "", 100)]  # and RudderStack loses the default rule's mirror
    assert compare(plain, plain) == RolloutReport((), ())


def test_several_rules_are_reported_in_new_file_order() -> None:
    def two(first: str, second: str, salt: str = "s") -> RuleSet:
        return compile_rules(
            HEAD + f"cohort: {{salt: {salt}}}\nrules:\n"
            f"  - name: alpha\n    when: {{type: track}}\n    route: {{split: {first}}}\n"
            f"  - name: beta\n    when: {{type: page}}\n    cohort: {{salt: beta-salt}}\n    route: {{split: {second}}}\n"
            "  - name: default\n    route: segment\n",
            env={},
        )

    old = two("{rudderstack: 30, segment: 70}", "{rudderstack: 10, segment: 90}")
    report = compare(old, two("{rudderstack: 20, segment: 80}", "{rudderstack: 15, segment: 85}"))
    assert report.changes == (SplitChange("alpha", 0, 1000), SplitChange("beta", 500, 0))
    assert report.rollbacks == (SplitChange("alpha", 0, 1000),)
    salted = compare(old, two("{rudderstack: 30, segment: 70}", "{rudderstack: 20, segment: 80}", salt="new"))
    assert salted.refused == (refusal("alpha", "cohort salt changed from 's' to 'new'"),)
    assert salted.changes == (SplitChange("beta", 1000, 0),)
