"""Pure tallies behind `splitter simulate`: where a sample of events goes, and what a change moves.

Counting is by events and by distinct cohort keys (users), because a rollout is planned in users:
"5 % of users on RudderStack" is what the split promises, while event counts follow how chatty
those users are. Returns rows; the CLI formats them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.engine.cohort import cohort_key
from proxy.engine.evaluate import decide
from proxy.engine.model import EventContext, RuleSet

Sample = tuple[Mapping[str, Any], EventContext]


@dataclass(frozen=True, slots=True)
class TallyRow:
    rule: str
    destination: str
    role: str  # primary | mirror
    events: int
    keys: int
    events_percent: float  # of all events in the sample
    keys_percent: float  # of the distinct cohort keys that reached this rule


@dataclass
class Tally:
    events: int = 0
    keys: int = 0
    rows: list[TallyRow] = field(default_factory=list)
    rule_events: dict[str, int] = field(default_factory=dict)
    rule_keys: dict[str, int] = field(default_factory=dict)


def _user_key(rules: RuleSet, event: Mapping[str, Any], rule_name: str) -> str | None:
    """The cohort key of the rule that decided, also for rules without a split: users are users."""
    return cohort_key(event, rules.rule_named(rule_name).cohort.paths)[1]


def tally(rules: RuleSet, samples: Iterable[Sample]) -> Tally:
    result = Tally()
    events: Counter[tuple[str, str, str]] = Counter()
    keys: defaultdict[tuple[str, str, str], set[str]] = defaultdict(set)
    rule_events: Counter[str] = Counter()
    rule_keys: defaultdict[str, set[str]] = defaultdict(set)
    all_keys: set[str] = set()
    order: dict[tuple[str, str, str], int] = {}
    for event, ctx in samples:
        decision = decide(rules, event, ctx)
        key = _user_key(rules, event, decision.rule)
        result.events += 1
        rule_events[decision.rule] += 1
        if key is not None:
            rule_keys[decision.rule].add(key)
            all_keys.add(key)
        for role, destinations in (("primary", decision.primary), ("mirror", decision.mirror)):
            for destination in destinations:
                row = (decision.rule, destination, role)
                order.setdefault(row, len(order))
                events[row] += 1
                if key is not None:
                    keys[row].add(key)
    result.keys = len(all_keys)
    rule_rank = {rule.name: rule.index for rule in rules.rules}
    for row in sorted(events, key=lambda r: (rule_rank[r[0]], r[2] != "primary", order[r])):
        rule, destination, role = row
        result.rows.append(
            TallyRow(
                rule, destination, role, events[row], len(keys[row]),
                100.0 * events[row] / result.events,
                100.0 * len(keys[row]) / len(rule_keys[rule]) if rule_keys[rule] else 0.0,
            )
        )
    result.rule_events = dict(rule_events)
    result.rule_keys = {rule: len(k) for rule, k in rule_keys.items()}
    return result


@dataclass
class Movement:
    keys: int = 0
    keys_changed: int = 0
    events_changed: int = 0
    transitions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (old primary, new primary) -> keys
    copies: dict[tuple[str, str, str], CopyChange] = field(default_factory=dict)  # (destination, old role, new role) -> counts


@dataclass
class CopyChange:
    """Events one destination receives in another role (or not at all) under the new rules."""

    events: int = 0
    keys: set[str] = field(default_factory=set)


def _roles(primary: tuple[str, ...], mirror: tuple[str, ...]) -> dict[str, str]:
    return {**{d: "mirror" for d in mirror}, **{d: "primary" for d in primary}}


def against(old: RuleSet, new: RuleSet, samples: Iterable[Sample]) -> Movement:
    """How many cohort keys change primary destination(s) between `old` and `new`, and which way;
    and per destination, the events it gets in another role or no longer gets (mirror copies too)."""
    movement = Movement()
    seen: set[str] = set()
    moved: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for event, ctx in samples:
        before, after = decide(old, event, ctx), decide(new, event, ctx)
        key = _user_key(new, event, after.rule) or _user_key(old, event, before.rule)
        if key is not None:
            seen.add(key)
        old_roles, new_roles = _roles(before.primary, before.mirror), _roles(after.primary, after.mirror)
        for destination in dict.fromkeys([*old_roles, *new_roles]):
            change = (destination, old_roles.get(destination, "none"), new_roles.get(destination, "none"))
            if change[1] != change[2]:
                copy = movement.copies.setdefault(change, CopyChange())
                copy.events += 1
                if key is not None:
                    copy.keys.add(key)
        if set(before.primary) == set(after.primary):
            continue
        movement.events_changed += 1
        if key is not None:
            moved[key].add(("+".join(before.primary), "+".join(after.primary)))
    movement.keys = len(seen)
    movement.keys_changed = len(moved)
    for transitions in moved.values():
        for transition in transitions:
            movement.transitions[transition] += 1
    return movement
