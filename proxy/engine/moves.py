"""What a rules change does to each kind of traffic, whatever was edited: rules inserted, removed or
reordered, conditions, destinations and mirrors changed, not only split percentages.

A change is judged per *class* of events: the events the old file decided with rule A and the new
file decides with rule B. Within a class, where an event goes depends only on its user's bucket,
so a class is fully described by its two routes: `class_moves` lays the old route's arms over the
new one's and reads, bucket range by bucket range, where users' primary destinations move and
which destinations stop (or start) getting a copy. `traffic_moves` does the same from a sample of
real events, for what the rules alone cannot show, and counts users and events.

Whether a change is refused comes from the rules alone, so every replica (and `splitter check`,
and a restart, which have no traffic) reaches the same verdict; traffic adds to what is reported.

Sides are the destinations' kinds: a primary set of Segment-kind destinations only is the old side,
RudderStack-kind only the new side, both in between. Moving a user's primary toward the old side,
or taking a copy away from a RudderStack-kind destination, is a rollback; a class whose users move
both ways at once is a reshuffle. Classes decided by the same rule with the same destinations on
both sides are left to the bucket-exact split comparison in `rollout.py`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.engine.cohort import BUCKETS, cohort_key, field_value
from proxy.engine.evaluate import decide
from proxy.engine.model import EventContext, Route, Rule, RuleSet

What = Literal["primary", "copy_lost", "copy_gained"]
Direction = Literal["forward", "back", "sideways"]
_POSITION = {frozenset({"segment"}): 0, frozenset({"segment", "rudderstack"}): 1, frozenset({"rudderstack"}): 2}


@dataclass(frozen=True, slots=True)
class Move:
    """One kind of change for one class of events (decided by `old_rule`, now by `new_rule`)."""

    what: What
    direction: Direction
    old_rule: str
    new_rule: str
    before: str  # primary: the old primary destinations ("a+b"); copies: the role the destination had ("" if none)
    after: str  # primary: the new primary destinations; copies: the role it has now ("" if none)
    destination: str = ""  # copies: the destination that loses or gains them
    users: int = 0  # distinct cohort keys of the traffic sample that move this way
    events: int = 0  # events of the traffic sample that move this way
    share: float = 0.0  # percent of the class's users that move this way, from the rules alone
    example: Mapping[str, Any] | None = None  # a made-up event of the class (no identifiers), when found from the rules

    @property
    def is_rollback(self) -> bool:
        return self.direction == "back"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.what, "rule": self.new_rule, "from_rule": self.old_rule}
        if self.destination:
            out["destination"] = self.destination
        out |= {"before": self.before, "after": self.after, "users": self.users, "events": self.events}
        if self.share:
            out["share_percent"] = round(self.share, 2)
        if self.example is not None:
            out["example"] = dict(self.example)
        return out


@dataclass
class _Tally:
    users: set[str] = field(default_factory=set)
    events: int = 0
    weight: float = 0.0  # buckets (of 10,000) of the class's users
    example: Mapping[str, Any] | None = None


Key = tuple[What, str, str, str, str, str]  # (what, old rule, new rule, before, after, destination)


class MoveTally:
    """Moves collected from classes and from traffic, merged per kind of move."""

    def __init__(self, old: RuleSet, new: RuleSet) -> None:
        self.old, self.new = old, new
        self._tallies: dict[Key, _Tally] = defaultdict(_Tally)
        self.directions: dict[tuple[str, str], set[str]] = defaultdict(set)  # class -> primary directions its arms show

    def add(self, old_rule: str, new_rule: str, old_outcome: Outcome, new_outcome: Outcome, *, user: str | None = None,
            weight: float = 0.0, example: Mapping[str, Any] | None = None) -> None:
        for key in self._keys(old_rule, new_rule, old_outcome, new_outcome):
            if weight > 0 and key[0] == "primary":  # the verdict comes from the rules alone: the same on every replica
                self.directions[old_rule, new_rule].add(self._direction(key))
            tally = self._tallies[key]
            if user is not None:
                tally.users.add(user)
            tally.events += 1 if weight == 0.0 else 0
            tally.weight += weight
            if example is not None and tally.example is None:
                tally.example = example

    def _keys(self, old_rule: str, new_rule: str, old_outcome: Outcome, new_outcome: Outcome) -> list[Key]:
        (old_primary, old_mirror), (new_primary, new_mirror) = old_outcome, new_outcome
        keys: list[Key] = []
        if set(old_primary) != set(new_primary):
            keys.append(("primary", old_rule, new_rule, "+".join(old_primary), "+".join(new_primary), ""))
        old_roles = {**{d: "mirror" for d in old_mirror}, **{d: "primary" for d in old_primary}}
        new_roles = {**{d: "mirror" for d in new_mirror}, **{d: "primary" for d in new_primary}}
        for destination in old_roles.keys() - new_roles.keys():
            keys.append(("copy_lost", old_rule, new_rule, old_roles[destination], "", destination))
        for destination in new_roles.keys() - old_roles.keys():
            keys.append(("copy_gained", old_rule, new_rule, "", new_roles[destination], destination))
        return keys

    def _kind(self, destination: str) -> str:
        found = self.new.destinations.get(destination) or self.old.destinations.get(destination)
        return found.kind if found is not None else "segment"

    def _primary_direction(self, before: Iterable[str], after: Iterable[str]) -> Direction:
        old = _POSITION.get(frozenset(self._kind(d) for d in before), 0)
        new = _POSITION.get(frozenset(self._kind(d) for d in after), 0)
        return "forward" if new > old else "back" if new < old else "sideways"

    def _direction(self, key: Key) -> Direction:
        what, _, _, before, after, destination = key
        if what == "primary":
            return self._primary_direction(before.split("+"), after.split("+"))
        new_side = self._kind(destination) == "rudderstack"
        if what == "copy_lost":
            return "back" if new_side else "forward"
        return "forward" if new_side else "sideways"

    def moves(self) -> tuple[Move, ...]:
        rank = {rule.name: rule.index for rule in self.new.rules}
        out = [
            Move(key[0], self._direction(key), key[1], key[2], key[3], key[4], key[5], len(tally.users), tally.events,
                 100.0 * tally.weight / BUCKETS, tally.example)
            for key, tally in self._tallies.items()
        ]
        return tuple(sorted(out, key=lambda m: (rank.get(m.new_rule, -1), m.old_rule, m.what, m.destination, m.before, m.after)))

    def both_ways(self) -> list[tuple[str, str]]:
        """Classes whose users' primaries move toward both sides at once: reshuffles."""
        return [pair for pair, seen in self.directions.items() if {"forward", "back"} <= seen]


Outcome = tuple[tuple[str, ...], tuple[str, ...]]  # (primary, mirror)


def same_shape(before: Rule, after: Rule) -> bool:
    """Same rule, same fixed destinations and mirrors, a split on both sides or on neither: what can
    differ (split bounds, arms, the cohort) is judged bucket by bucket by `rollout.compare` itself."""
    return (before.name == after.name and before.route.to == after.route.to and before.route.mirror == after.route.mirror
            and (before.route.split is None) == (after.route.split is None))


def _arms(route: Route) -> list[tuple[int, int, Outcome]]:
    """(first bucket, end bucket, outcome) per arm; a route without a split is one arm over all buckets."""
    if route.split is None:
        return [(0, BUCKETS, route.outcome(None))]
    arms, lower = [], 0
    for position, (destination, upper) in enumerate(route.split.arms):
        end = BUCKETS if position == len(route.split.arms) - 1 else upper
        arms.append((lower, end, route.outcome(destination)))
        lower = end
    return [arm for arm in arms if arm[1] > arm[0]]


def class_moves(tally: MoveTally, before: Rule, after: Rule, example: Mapping[str, Any]) -> None:
    """Every bucket range of one class: where its users go under each rule.

    With the same cohort (key and salt) a user has the same bucket under both rules, so the arms
    are intersected; with different cohorts the two buckets are independent hashes, so every pair
    of arms holds its product share of the users."""
    same_cohort = before.cohort.fields == after.cohort.fields and before.cohort.salt == after.cohort.salt
    for old_lower, old_end, old_outcome in _arms(before.route):
        for new_lower, new_end, new_outcome in _arms(after.route):
            if same_cohort:
                weight = float(max(0, min(old_end, new_end) - max(old_lower, new_lower)))
            else:
                weight = (old_end - old_lower) * (new_end - new_lower) / BUCKETS
            if weight > 0:
                tally.add(before.name, after.name, old_outcome, new_outcome, weight=weight, example=example)


def traffic_moves(tally: MoveTally, samples: Iterable[tuple[Mapping[str, Any], EventContext]]) -> None:
    """Replay real events through both rule sets; classes left to the split comparison are skipped."""
    old, new = tally.old, tally.new
    for event, ctx in samples:
        before, after = decide(old, event, ctx), decide(new, event, ctx)
        old_rule, new_rule = old.rule_named(before.rule), new.rule_named(after.rule)
        if same_shape(old_rule, new_rule):
            continue
        user = cohort_key(event, new_rule.cohort.paths)[1] or cohort_key(event, old_rule.cohort.paths)[1]
        tally.add(before.rule, after.rule, (before.primary, before.mirror), (after.primary, after.mirror), user=user)


# The context fields conditions read (conditions.py): kept by `replay_view`, never hashed by a recording (recording.py).
ROUTING_CONTEXT_FIELDS = (("app", "version"), ("os", "name"), ("library", "name"), ("location", "country"))


def replay_view(event: Mapping[str, Any], cohort_paths: Iterable[tuple[str, ...]]) -> dict[str, Any]:
    """What a replay needs of a real event: the fields conditions read and the cohort key fields.

    Nothing else is kept (no properties, traits or write key), so a window of recent traffic held
    for reloads costs little memory and holds no payload."""
    view: dict[str, Any] = {"type": event.get("type"), "event": event.get("event")}
    context = event.get("context")
    if type(context) is dict:
        kept: dict[str, Any] = {}
        for section, name in ROUTING_CONTEXT_FIELDS:
            inner = context.get(section)
            if type(inner) is dict and name in inner:
                kept[section] = {name: inner[name]}
        view["context"] = kept
    for path in cohort_paths:
        value = field_value(event, path)
        if value is not None and (type(value) is str or type(value) is int or type(value) is float):
            target = view
            for part in path[:-1]:
                target = target.setdefault(part, {}) if type(target.get(part, {})) is dict else {}
            target[path[-1]] = value
    return view
