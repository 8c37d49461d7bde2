"""What changed between two rule sets, by name, for the change history (proxy/control/history.py).

`compare` (rollout.py) answers whether a change is safe and who moves; this module answers what was
edited, so an operator matching a data anomaly to a change can read it: rules added, removed and
edited (and which part of each: `when`, route, split, ramp, cohort, transforms, order), every split's
percents before and after with the buckets `compare` saw move, the destinations added, removed or
edited, and the reshuffles the new file consented to (`reshuffle: true`), which `compare` accepts
without a word.

Only names, percents and counts come out: never a write key, a destination URL (it may hold
credentials), a transform's salt or the file's text. A transform's `when` is compiled into
closures, so transforms are compared by their shape (see `_chain_shape`), not by identity.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from proxy.engine.model import Rule, RuleSet, Split
from proxy.engine.rollout import RolloutReport, reshuffle_reason
from proxy.engine.transforms import Chain

ASPECTS = ("order", "when", "route", "split", "ramp", "cohort", "reshuffle", "transforms")  # the order `what` lists them in


@dataclass(frozen=True, slots=True)
class RuleEdit:
    rule: str
    what: tuple[str, ...]  # of ASPECTS


@dataclass(frozen=True, slots=True)
class SplitShift:
    """One split rule kept by name whose arms changed: percents per destination, in arm order."""

    rule: str
    before: Mapping[str, float] | None  # None: the rule had no split
    after: Mapping[str, float] | None  # None: it has none now
    buckets_forward: int = 0  # from compare's SplitChange: toward an earlier-listed arm
    buckets_back: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "before": _plain(self.before), "after": _plain(self.after),
                "buckets_forward": self.buckets_forward, "buckets_back": self.buckets_back}


@dataclass(frozen=True, slots=True)
class RulesDiff:
    rules_added: tuple[str, ...] = ()
    rules_removed: tuple[str, ...] = ()
    rules_edited: tuple[RuleEdit, ...] = ()
    splits: tuple[SplitShift, ...] = ()
    destinations_added: tuple[str, ...] = ()
    destinations_removed: tuple[str, ...] = ()
    destinations_edited: tuple[str, ...] = ()  # kind, URL, timeout or delivery options; which is not said (a URL may hold credentials)
    reshuffles: tuple[Mapping[str, str], ...] = ()  # consented: {"rule", "reason"}, or {"rule", "from_rule", "reason"} for a class of events
    moves: tuple[Mapping[str, Any], ...] = ()  # every move compare found (Move.as_dict with its direction)
    rollbacks: tuple[Mapping[str, Any], ...] = ()  # RolloutReport.rollback_entries()

    def as_dict(self) -> dict[str, Any]:
        return {
            "rules": {"added": list(self.rules_added), "removed": list(self.rules_removed),
                      "edited": [{"rule": edit.rule, "what": list(edit.what)} for edit in self.rules_edited]},
            "splits": [shift.as_dict() for shift in self.splits],
            "destinations": {"added": list(self.destinations_added), "removed": list(self.destinations_removed),
                             "edited": list(self.destinations_edited)},
            "reshuffles": [dict(entry) for entry in self.reshuffles],
            "moves": [dict(move) for move in self.moves],
            "rollbacks": [dict(entry) for entry in self.rollbacks],
        }


def diff_rules(old: RuleSet, new: RuleSet, report: RolloutReport) -> RulesDiff:
    """`new` against `old`, with `report` = `compare(old, new, ...)` for the buckets and moves."""
    old_rules = {rule.name: rule for rule in old.rules}
    new_rules = {rule.name: rule for rule in new.rules}
    kept = [rule.name for rule in new.rules if rule.name in old_rules]
    moved = _reordered(kept, old_rules)
    edits: list[RuleEdit] = []
    for name in kept:
        what = _rule_aspects(old_rules[name], new_rules[name], old, new)
        if name in moved:
            what = ("order", *what)
        if what:
            edits.append(RuleEdit(name, what))
    return RulesDiff(
        rules_added=tuple(rule.name for rule in new.rules if rule.name not in old_rules),
        rules_removed=tuple(rule.name for rule in old.rules if rule.name not in new_rules),
        rules_edited=tuple(edits),
        splits=_splits(old_rules, new.rules, report),
        destinations_added=tuple(name for name in new.destinations if name not in old.destinations),
        destinations_removed=tuple(name for name in old.destinations if name not in new.destinations),
        destinations_edited=tuple(name for name, dest in new.destinations.items() if name in old.destinations and old.destinations[name] != dest),
        reshuffles=() if report.refused else _reshuffles(old_rules, new.rules, report),
        moves=tuple({**move.as_dict(), "direction": move.direction} for move in report.moves),
        rollbacks=report.rollback_entries(),
    )


def _rule_aspects(before: Rule, after: Rule, old: RuleSet, new: RuleSet) -> tuple[str, ...]:
    checks: dict[str, Callable[[Rule], Any]] = {
        "when": lambda rule: dict(rule.when_text),
        "route": lambda rule: (rule.route.to, rule.route.mirror),
        "split": lambda rule: rule.route.split,
        "ramp": lambda rule: rule.route.ramp,
        "cohort": lambda rule: (rule.cohort.fields, rule.cohort.salt),
        "reshuffle": lambda rule: (rule.reshuffle, rule.cohort.reshuffle),
    }
    what = [aspect for aspect, of in checks.items() if of(before) != of(after)]
    if _transforms_of(old, before.name) != _transforms_of(new, after.name):
        what.append("transforms")
    return tuple(what)


def _reordered(kept: list[str], old_rules: Mapping[str, Rule]) -> set[str]:
    """The kept rules that moved: those outside a longest run kept in the old relative order (a rule
    inserted or removed above others moves none of them; one rule dragged to the top moves only it)."""
    indexes = [old_rules[name].index for name in kept]
    tails: list[int] = []  # tails[k]: the smallest last old index of an increasing run of length k + 1
    tail_at: list[int] = []  # position in `kept` of that tail
    parent: list[int] = [-1] * len(kept)
    for position, index in enumerate(indexes):
        k = bisect_left(tails, index)
        if k == len(tails):
            tails.append(index)
            tail_at.append(position)
        else:
            tails[k] = index
            tail_at[k] = position
        parent[position] = tail_at[k - 1] if k else -1
    in_order: set[int] = set()
    position = tail_at[-1] if tail_at else -1
    while position >= 0:
        in_order.add(position)
        position = parent[position]
    return {name for position, name in enumerate(kept) if position not in in_order}


def _splits(old_rules: Mapping[str, Rule], new_rules: tuple[Rule, ...], report: RolloutReport) -> tuple[SplitShift, ...]:
    buckets = {change.rule: change for change in report.changes}
    shifts: list[SplitShift] = []
    for rule in new_rules:
        before = old_rules.get(rule.name)
        if before is None or (before.route.split is None and rule.route.split is None) or before.route.split == rule.route.split:
            continue
        change = buckets.get(rule.name)
        shifts.append(SplitShift(rule.name, _percents(before.route.split), _percents(rule.route.split),
                                 change.buckets_forward if change else 0, change.buckets_back if change else 0))
    return tuple(shifts)


def _reshuffles(old_rules: Mapping[str, Rule], new_rules: tuple[Rule, ...], report: RolloutReport) -> tuple[Mapping[str, str], ...]:
    """What a refusal would have named, had the file not said `reshuffle: true`: split rules whose
    salt, key or arm order changed, and classes of events whose users move both ways at once."""
    found: list[Mapping[str, str]] = []
    for rule in new_rules:
        before = old_rules.get(rule.name)
        if before is not None and before.route.split is not None and rule.route.split is not None:
            reason = reshuffle_reason(before, rule)
            if reason:
                found.append({"rule": rule.name, "reason": reason})
    directions: dict[tuple[str, str], set[str]] = defaultdict(set)
    for move in report.moves:
        if move.what == "primary" and move.share > 0:  # judged from the rules alone, as compare's verdict is
            directions[move.old_rule, move.new_rule].add(move.direction)
    for (old_rule, new_rule), seen in directions.items():
        if {"forward", "back"} <= seen:
            found.append({"rule": new_rule, "from_rule": old_rule,
                          "reason": "some users move toward RudderStack and others back toward Segment"})
    return tuple(found)


def _percents(split: Split | None) -> dict[str, float] | None:
    return dict(split.percents) if split is not None else None


def _plain(percents: Mapping[str, float] | None) -> dict[str, float] | None:
    return dict(percents) if percents is not None else None


def _transforms_of(rules: RuleSet, rule: str) -> dict[str, tuple[Any, ...]]:
    return {destination: _chain_shape(chain) for (name, destination), chain in rules.transforms.items() if name == rule}


def _chain_shape(chain: Chain) -> tuple[Any, ...]:
    """Each operation's kind and fields, its `when` predicates by the function and the values it closes
    over (the sets and patterns a condition compiled): equal for the same transforms compiled twice."""
    return tuple(
        (type(op).__name__,
         tuple((f.name, getattr(op, f.name)) for f in fields(op) if f.name != "when"),
         tuple(_predicate_shape(predicate) for predicate in op.when))
        for op in chain.operations
    )


def _predicate_shape(predicate: Callable[..., Any]) -> tuple[Any, ...]:
    cells = getattr(predicate, "__closure__", None) or ()
    return (getattr(predicate, "__qualname__", type(predicate).__name__), tuple(cell.cell_contents for cell in cells))
