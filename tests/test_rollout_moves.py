"""`rollout.compare` beyond split percentages: inserted, removed and reordered rules, changed
conditions and mirrors, judged per class of events from the rules and from real traffic."""

from __future__ import annotations

from typing import Any

from proxy.engine import EventContext, RuleSet, compile_rules
from proxy.engine.moves import Move
from proxy.engine.rollout import compare

HEAD = """\
version: 1
destinations:
  segment: {kind: segment, url: "http://seg.test"}
  rudderstack: {kind: rudderstack, url: "http://rs.test"}
sources:
  - {name: web, write_keys: [web-key-000001]}
  - {name: ios, write_keys: [ios-key-000001]}
cohort: {key: [anonymousId, userId], salt: s}
rules:
"""
COHORT = "  - name: cohort\n    route: {split: {rudderstack: 20, segment: 80}}\n"


def rules(*blocks: str) -> RuleSet:
    return compile_rules(HEAD + "".join(blocks), env={})


def summary(moves: tuple[Move, ...]) -> list[tuple[str, str, str, str, str, str, float]]:
    return [(m.what, m.direction, m.old_rule, m.new_rule, m.before or m.destination, m.after, round(m.share, 1)) for m in moves]


def test_a_rule_inserted_above_the_cohort_sends_its_users_back_and_is_reported() -> None:
    checkout = "  - name: checkout\n    when: {event: 'Checkout *'}\n    route: {to: [segment], mirror: [rudderstack]}\n"
    report = compare(rules(COHORT), rules(checkout, COHORT))
    assert report.refused == () and report.changes == ()
    assert summary(report.move_rollbacks) == [("primary", "back", "cohort", "checkout", "rudderstack", "segment", 20.0)]
    back = report.move_rollbacks[0]
    assert back.example == {"event": "Checkout x"}
    assert back.as_dict() == {"kind": "primary", "rule": "checkout", "from_rule": "cohort", "before": "rudderstack", "after": "segment",
                              "users": 0, "events": 0, "share_percent": 20.0, "example": {"event": "Checkout x"}}
    # The 80 % that were on Segment gain a RudderStack mirror: forward, not a rollback.
    assert ("copy_gained", "forward", "cohort", "checkout", "rudderstack", "mirror", 80.0) in summary(report.moves)


def test_a_removed_rule_that_held_a_mirror_is_a_copy_rollback() -> None:
    mirrored = "  - name: checkout\n    when: {event: 'Checkout *'}\n    route: {to: [segment], mirror: [rudderstack]}\n"
    report = compare(rules(mirrored, COHORT), rules(COHORT))
    assert report.refused == ()
    assert summary(report.move_rollbacks) == [("copy_lost", "back", "checkout", "cohort", "mirror", "", 80.0)]
    assert report.move_rollbacks[0].destination == "rudderstack"


def test_a_segment_copy_that_stops_is_progress_not_a_rollback() -> None:
    shadow = "  - name: backend\n    when: {source: ios}\n    route: {to: [rudderstack], mirror: [segment]}\n"
    cut = "  - name: backend\n    when: {source: ios}\n    route: rudderstack\n"
    report = compare(rules(shadow, COHORT), rules(cut, COHORT))
    assert report.refused == () and report.move_rollbacks == ()
    assert summary(report.moves) == [("copy_lost", "forward", "backend", "backend", "mirror", "", 100.0)]


def test_reordering_rules_is_judged_by_where_events_go() -> None:
    web_all = "  - name: web-all\n    when: {source: web}\n    route: rudderstack\n"
    tracks = "  - name: tracks\n    when: {type: track}\n    route: {split: {rudderstack: 20, segment: 80}}\n"
    default = "  - name: default\n    route: segment\n"
    report = compare(rules(web_all, tracks, default), rules(tracks, web_all, default))
    assert report.refused == () and report.changes == ()
    assert summary(report.move_rollbacks) == [("copy_lost", "back", "web-all", "tracks", "primary", "", 80.0),
                                              ("primary", "back", "web-all", "tracks", "rudderstack", "segment", 80.0)]
    assert report.move_rollbacks[0].example == {"source": "web"}


def test_a_changed_condition_moves_the_events_it_no_longer_takes() -> None:
    def pilot(countries: str) -> str:
        return f"  - name: pilot\n    when: {{country: {countries}}}\n    route: rudderstack\n"

    report = compare(rules(pilot("[DE, FR]"), COHORT), rules(pilot("[DE]"), COHORT))
    assert summary(report.move_rollbacks) == [("copy_lost", "back", "pilot", "cohort", "primary", "", 80.0),
                                              ("primary", "back", "pilot", "cohort", "rudderstack", "segment", 80.0)]
    assert report.move_rollbacks[1].example == {"country": "FR"}
    widened = compare(rules(pilot("[DE]"), COHORT), rules(pilot("[DE, FR]"), COHORT))
    assert widened.move_rollbacks == () and widened.refused == ()


def test_users_moving_both_ways_in_one_class_are_a_reshuffle() -> None:
    # The cohort rule is replaced by one with its own salt: the 20 % are drawn anew.
    salted = "  - name: cohort-v2\n    cohort: {salt: other}\n    route: {split: {rudderstack: 20, segment: 80}}\n"
    report = compare(rules(COHORT), rules(salted))
    assert report.refused == (
        "rule 'cohort-v2' (events that rule 'cohort' decided before): some users move toward RudderStack and others back "
        "toward Segment; this reshuffles users between destinations. Set `reshuffle: true` on rule 'cohort-v2' (or on the "
        "cohort) to do it anyway",
    )
    consented = compare(rules(COHORT), rules(salted.replace("cohort: {salt: other}", "cohort: {salt: other, reshuffle: true}")))
    assert consented.refused == ()
    # Independent buckets: 20 % x 80 % move forward and 80 % x 20 % move back.
    assert ("primary", "back", "cohort", "cohort-v2", "rudderstack", "segment", 16.0) in summary(consented.moves)
    assert ("primary", "forward", "cohort", "cohort-v2", "segment", "rudderstack", 16.0) in summary(consented.moves)


def test_moves_toward_both_sides_in_different_classes_are_allowed() -> None:
    # Web widens while iOS checkout events go back: two classes, one way each.
    before = "  - name: ios\n    when: {source: ios}\n    route: rudderstack\n  - name: web\n    route: segment\n"
    after = ("  - name: ios-checkout\n    when: {source: ios, event: 'Checkout *'}\n    route: segment\n"
             "  - name: ios\n    when: {source: ios}\n    route: rudderstack\n  - name: web\n    route: rudderstack\n")
    report = compare(rules(before), rules(after))
    assert report.refused == ()
    assert [m.new_rule for m in report.move_rollbacks if m.what == "primary"] == ["ios-checkout"]


def _traffic(*events: tuple[dict[str, Any], str]) -> list[tuple[dict[str, Any], EventContext]]:
    return [(event, EventContext(source)) for event, source in events]


def test_real_traffic_finds_what_the_rules_alone_cannot() -> None:
    # No made-up event matches both globs; a real "Checkout Completed" does.
    checkout = "  - name: checkout\n    when: {event: 'Checkout *'}\n    route: rudderstack\n"
    completed = "  - name: completed\n    when: {event: '* Completed'}\n    route: segment\n"
    default = "  - name: default\n    route: segment\n"
    old, new = rules(checkout, default), rules(completed, checkout, default)
    assert compare(old, new).move_rollbacks == ()
    sample = _traffic(*[({"type": "track", "event": "Checkout Completed", "anonymousId": f"u{i % 7}"}, "web") for i in range(30)],
                      ({"type": "track", "event": "Checkout Started", "anonymousId": "u1"}, "web"))
    report = compare(old, new, sample)
    assert [(m.what, m.before, m.after, m.users, m.events, m.share, m.example) for m in report.move_rollbacks] == [
        ("copy_lost", "primary", "", 7, 30, 0.0, None),
        ("primary", "rudderstack", "segment", 7, 30, 0.0, None),
    ]


def test_traffic_of_a_split_kept_by_name_is_left_to_the_bucket_exact_comparison() -> None:
    lowered = "  - name: cohort\n    route: {split: {rudderstack: 10, segment: 90}}\n"
    sample = _traffic(*[({"type": "track", "anonymousId": f"user-{i}"}, "web") for i in range(500)])
    report = compare(rules(COHORT), rules(lowered), sample)
    assert report.moves == ()
    assert [(c.rule, c.buckets_back) for c in report.rollbacks] == [("cohort", 1000)]
    assert report.rollback_entries() == ({"rule": "cohort", "buckets_back": 1000},)
