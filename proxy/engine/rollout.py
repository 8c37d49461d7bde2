"""What a new rules file does to the users already on each side, compared with the active one.

Raising a split percent only moves users toward the first-listed destination; changing a cohort
salt or key, or the order of a split's arms, reshuffles everyone between the two sides, which would
scatter each user's history across Segment and RudderStack. `compare` finds both: reshuffles are
refused unless the new file says `reshuffle: true`, and rollbacks (users moved back toward the last
arm) are reported with how many of the 10,000 buckets moved, so a reload can log them loudly.

Every other kind of edit (a rule inserted above another, removed, reordered, a condition, a
destination or a mirror changed) is judged by `moves.py` per class of events, from made-up events
that reach every pair of rules (`witnesses.py`) and, when given, a sample of recent real traffic:
users moved back toward the old side and copies a RudderStack-kind destination stops receiving are
rollbacks, and a class whose users move both ways at once is a reshuffle, refused like a salt change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.engine.cohort import BUCKETS
from proxy.engine.model import EventContext, Rule, RuleSet, Split
from proxy.engine.moves import Move, MoveTally, class_moves, same_shape, traffic_moves
from proxy.engine.witnesses import classes


@dataclass(frozen=True, slots=True)
class SplitChange:
    rule: str
    buckets_forward: int  # moved toward an earlier-listed arm (a widening rollout)
    buckets_back: int  # moved toward a later-listed arm (a rollback)


@dataclass(frozen=True, slots=True)
class RolloutReport:
    refused: tuple[str, ...]  # reshuffles the new file did not acknowledge
    changes: tuple[SplitChange, ...]  # split rules kept by name, bucket-exact
    moves: tuple[Move, ...] = ()  # everything else, per class of events

    @property
    def rollbacks(self) -> tuple[SplitChange, ...]:
        return tuple(change for change in self.changes if change.buckets_back)

    @property
    def move_rollbacks(self) -> tuple[Move, ...]:
        return tuple(move for move in self.moves if move.is_rollback)

    def rollback_entries(self) -> tuple[dict[str, Any], ...]:
        """Every rollback as the reload answer, the log and `check` show it."""
        splits = tuple({"rule": c.rule, "buckets_back": c.buckets_back} for c in self.rollbacks)
        return splits + tuple(move.as_dict() for move in self.move_rollbacks)


Sample = tuple[Mapping[str, Any], EventContext]


def compare(old: RuleSet, new: RuleSet, samples: Iterable[Sample] = ()) -> RolloutReport:
    """Split rules kept by name, bucket by bucket; every other class of events from the rules'
    made-up events and from `samples` (recent real events, as the proxy keeps them)."""
    refused, changes = _compare_splits(old, new)
    tally = MoveTally(old, new)
    for (old_name, new_name), witness in classes(old, new).items():
        before, after = old.rule_named(old_name), new.rule_named(new_name)
        if not same_shape(before, after):
            class_moves(tally, before, after, witness)
    traffic_moves(tally, samples)
    for old_name, new_name in tally.both_ways():
        rule = new.rule_named(new_name)
        if not (rule.reshuffle or rule.cohort.reshuffle or new.cohort.reshuffle):
            refused.append(
                f"rule {new_name!r} (events that rule {old_name!r} decided before): some users move toward RudderStack and others "
                "back toward Segment; this reshuffles users between destinations. "
                f"Set `reshuffle: true` on rule {new_name!r} (or on the cohort) to do it anyway"
            )
    return RolloutReport(tuple(refused), changes, tally.moves())


def _compare_splits(old: RuleSet, new: RuleSet) -> tuple[list[str], tuple[SplitChange, ...]]:
    """Match split rules by name and classify how each one's buckets move."""
    old_rules = {rule.name: rule for rule in old.rules if rule.route.split}
    refused: list[str] = []
    changes: list[SplitChange] = []
    for rule in new.rules:
        before = old_rules.get(rule.name)
        if rule.route.split is None or before is None or before.route.split is None:
            continue
        acknowledged = rule.reshuffle or rule.cohort.reshuffle or new.cohort.reshuffle
        reason = reshuffle_reason(before, rule)
        if reason:
            if not acknowledged:
                refused.append(
                    f"rule {rule.name!r}: {reason}; this reshuffles users between destinations. "
                    "Set `reshuffle: true` on the rule (or on the cohort) to do it anyway"
                )
            continue
        forward, back = _moves(before.route.split, rule.route.split)
        if forward and back and not acknowledged:
            refused.append(
                f"rule {rule.name!r}: the split moves {forward} buckets toward earlier arms and {back} back at once; "
                "this reshuffles users between destinations. Set `reshuffle: true` on the rule (or on the cohort) to do it anyway"
            )
        elif forward or back:
            changes.append(SplitChange(rule.name, forward, back))
    return refused, tuple(changes)


def reshuffle_reason(before: Rule, after: Rule) -> str | None:
    """Why a split rule kept by name reshuffles its users (salt, key or arm order changed), or None."""
    if before.cohort.salt != after.cohort.salt:
        return f"cohort salt changed from {before.cohort.salt!r} to {after.cohort.salt!r}"
    if before.cohort.fields != after.cohort.fields:
        return f"cohort key changed from {list(before.cohort.fields)} to {list(after.cohort.fields)}"
    old_order = [dest for dest, _ in before.route.split.arms]  # type: ignore[union-attr]
    new_order = [dest for dest, _ in after.route.split.arms]  # type: ignore[union-attr]
    if old_order != new_order:
        return f"split order changed from {old_order} to {new_order}"
    return None


def _moves(before: Split, after: Split) -> tuple[int, int]:
    """Buckets whose arm index decreased (forward) or increased (back); same arm order assumed."""
    old_index = _arm_indexes(before)
    new_index = _arm_indexes(after)
    forward = back = 0
    for old, new in zip(old_index, new_index):
        if new < old:
            forward += 1
        elif new > old:
            back += 1
    return forward, back


def _arm_indexes(split: Split) -> list[int]:
    indexes: list[int] = []
    for position, (_, upper) in enumerate(split.arms):
        indexes.extend([position] * (upper - len(indexes)))
    indexes.extend([len(split.arms) - 1] * (BUCKETS - len(indexes)))
    return indexes


def rollback_line(entry: Mapping[str, Any]) -> str:
    """One rollback (an entry of `RolloutReport.rollback_entries`) in words, for `check` and `simulate`."""
    if "buckets_back" in entry:
        return f"rule {entry['rule']!r}: {entry['buckets_back']} of {BUCKETS} cohort buckets move back toward a later-listed destination"
    seen = f"{entry['users']} users, {entry['events']} events in the sample" if entry.get("events") else ""
    share = f"{entry['share_percent']}% of their users" if entry.get("share_percent") else ""
    example = f"e.g. {dict(entry['example'])}" if entry.get("example") else ""
    detail = "; ".join(part for part in (seen, share, example) if part)
    where = f"events rule {entry['from_rule']!r} decided, now rule {entry['rule']!r}"
    if entry["kind"] == "primary":
        return f"{where}: primary {entry['before']} -> {entry['after']} ({detail})"
    return f"{where}: {entry['destination']} no longer gets its {entry['before']} copy ({detail})"


def verdict_lines(report: RolloutReport) -> list[str]:
    """What a reload of the new rules over the old ones would answer: refused, or the rollbacks."""
    if report.refused:
        return ["a reload would be REFUSED:", *(f"  {reason}" for reason in report.refused)]
    entries = report.rollback_entries()
    if not entries:
        return ["a reload would be accepted: no user moves back, no RudderStack copy stops"]
    return [f"a reload would be accepted with {len(entries)} rollback(s):", *(f"  rollback: {rollback_line(entry)}" for entry in entries)]
