"""What a new rules file does to the users already on each side, compared with the active one.

Raising a split percent only moves users toward the first-listed destination; changing a cohort
salt or key, or the order of a split's arms, reshuffles everyone between the two sides, which would
scatter each user's history across Segment and RudderStack. `compare` finds both: reshuffles are
refused unless the new file says `reshuffle: true`, and rollbacks (users moved back toward the last
arm) are reported with how many of the 10,000 buckets moved, so a reload can log them loudly.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.engine.cohort import BUCKETS
from proxy.engine.model import Rule, RuleSet, Split


@dataclass(frozen=True, slots=True)
class SplitChange:
    rule: str
    buckets_forward: int  # moved toward an earlier-listed arm (a widening rollout)
    buckets_back: int  # moved toward a later-listed arm (a rollback)


@dataclass(frozen=True, slots=True)
class RolloutReport:
    refused: tuple[str, ...]  # reshuffles the new file did not acknowledge
    changes: tuple[SplitChange, ...]

    @property
    def rollbacks(self) -> tuple[SplitChange, ...]:
        return tuple(change for change in self.changes if change.buckets_back)


def compare(old: RuleSet, new: RuleSet) -> RolloutReport:
    """Match split rules by name and classify how each one's buckets move."""
    old_rules = {rule.name: rule for rule in old.rules if rule.route.split}
    refused: list[str] = []
    changes: list[SplitChange] = []
    for rule in new.rules:
        before = old_rules.get(rule.name)
        if rule.route.split is None or before is None or before.route.split is None:
            continue
        acknowledged = rule.reshuffle or rule.cohort.reshuffle or new.cohort.reshuffle
        reason = _reshuffle_reason(before, rule)
        if reason:
            if not acknowledged:
                refused.append(
                    f"rule {rule.name!r}: {reason}; this reshuffles users between destinations. "
                    "Set `reshuffle: true` on the rule (or on the cohort) to do it anyway"
                )
            continue
        forward, back = _moves(before.route.split, rule.route.split)
        if forward or back:
            changes.append(SplitChange(rule.name, forward, back))
    return RolloutReport(tuple(refused), tuple(changes))


def _reshuffle_reason(before: Rule, after: Rule) -> str | None:
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
