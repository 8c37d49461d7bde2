"""Ramp schedules: a two-destination split whose first-listed share grows at set times.

In the rules file a ramp sits next to the split it moves; the split is what applies before the
first step, and each step gives the first-listed destination's percent (the other gets the rest):

    route:
      split: {rudderstack: 5, segment: 95}
      ramp:
        - {at: 2026-12-01T00:00:00Z, rudderstack: 10}
        - {at: 2026-12-08T00:00:00Z, rudderstack: 25}

Only two-arm splits ramp, so exactly one number moves. Cohort buckets are handed out cumulatively
in arm order, so raising the first share only adds users to it; a step that lowers it would move
users back and is refused at compile time, naming the step. `reshuffle: true` does not relax that:
it acknowledges a salt, key or order change, not a plan that goes back and forth. Rolling back is
an edit and a reload, which `rollout.compare` reports like any lowered percent.

Pure: the caller says what time it is. `effective_rules(rules, when)` is idempotent (every rule's
split is recomputed from its ramp), so it can be applied to rules it already produced.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import yaml

from proxy.engine.cohort import BUCKETS
from proxy.engine.model import Rule, RuleSet, Split
from proxy.engine.yaml_reader import NodeReader, plain

EXAMPLE_TIME = "2026-12-01T00:00:00Z"


@dataclass(frozen=True, slots=True)
class RampStep:
    at: datetime  # timezone-aware, in UTC
    split: Split


@dataclass(frozen=True, slots=True)
class Ramp:
    start: Split  # the route's own split: in effect before the first step
    steps: tuple[RampStep, ...]  # strictly increasing `at`, never lowering the first arm

    def index_at(self, when: datetime) -> int | None:
        """The step in effect at `when` (its `at` is at or before it); None before the first step."""
        position = bisect_right(self.steps, when, key=lambda step: step.at)
        return position - 1 if position else None

    def split_at(self, when: datetime) -> Split:
        index = self.index_at(when)
        return self.start if index is None else self.steps[index].split

    def next_at(self, when: datetime) -> datetime | None:
        """When the next step after `when` takes effect; None once the last one has."""
        position = bisect_right(self.steps, when, key=lambda step: step.at)
        return self.steps[position].at if position < len(self.steps) else None


def effective_rules(rules: RuleSet, when: datetime) -> RuleSet:
    """`rules` with every ramped split set to the step due at `when` (an aware datetime).

    Returns `rules` itself when nothing differs, so callers can tell "no step changed" by identity.
    """
    changed = False
    out: list[Rule] = []
    for rule in rules.rules:
        ramp = rule.route.ramp
        split = ramp.split_at(when) if ramp is not None else None
        if split is None or split == rule.route.split:
            out.append(rule)
            continue
        route = replace(rule.route, split=split)
        out.append(replace(rule, route=route, arms=route.arms_for(rule.name)))
        changed = True
    return replace(rules, rules=tuple(out), _candidates={}) if changed else rules


def next_step_at(rules: RuleSet, when: datetime) -> datetime | None:
    """The earliest step of any rule that takes effect after `when`."""
    upcoming = [at for rule in rules.rules if rule.route.ramp and (at := rule.route.ramp.next_at(when))]
    return min(upcoming, default=None)


@dataclass(frozen=True, slots=True)
class RampView:
    """One rule's schedule as seen at a given time, for `splitter check`, simulate and /admin/config."""

    rule: str
    start: tuple[tuple[str, float], ...]  # percents before the first step
    steps: tuple[tuple[datetime, tuple[tuple[str, float], ...]], ...]
    current: int | None  # index of the step in effect, None while the split itself applies
    next_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "start": dict(self.start),
            "steps": [{"at": iso(at), "split": dict(percents)} for at, percents in self.steps],
            "current_step": self.current,
            "next_step_at": iso(self.next_at) if self.next_at else None,
        }


def ramp_views(rules: RuleSet, when: datetime) -> tuple[RampView, ...]:
    views = []
    for rule in rules.rules:
        ramp = rule.route.ramp
        if ramp is not None:
            steps = tuple((step.at, step.split.percents) for step in ramp.steps)
            views.append(RampView(rule.name, ramp.start.percents, steps, ramp.index_at(when), ramp.next_at(when)))
    return tuple(views)


def iso(when: datetime) -> str:
    """ISO 8601 with `Z` for UTC, the way ramp times are usually written."""
    return when.isoformat().replace("+00:00", "Z")


def compile_ramp(reader: NodeReader, node: yaml.Node, path: str, split: Split | None, has_split: bool,
                 destinations: Sequence[str]) -> Ramp | None:
    """Read `route.ramp` for a route whose split compiled to `split` (None if it has problems).

    Problems go to `reader`; None is returned when there is no usable ramp.
    """
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        reader.problem(node, path, f"must be a non-empty list of steps such as {{at: {EXAMPLE_TIME}, DESTINATION: PERCENT}}")
        return None
    if not has_split:
        reader.problem(node, path, "needs a `split` next to it: the percents that apply before the first step")
        return None
    if split is None:
        return None  # the split's own problems are reported; its arms are unknown
    if len(split.arms) != 2:
        reader.problem(node, path, "only a split of two destinations can ramp (the first-listed ramps, the other gets the rest), "
                                   f"this one has {len(split.arms)}")
        return None
    arms = (split.arms[0][0], split.arms[1][0])
    steps: list[RampStep] = []
    previous_at: datetime | None = None
    previous = Decimal(split.arms[0][1]) / 100
    for index, item in enumerate(node.value):
        step_path = f"{path}[{index}]"
        at, percent = _step(reader, item, step_path, arms, destinations)
        if at is not None:
            if previous_at is not None and at <= previous_at:
                reader.problem(item, f"{step_path}.at", f"{iso(at)} is not after the previous step's {iso(previous_at)}; steps must be in time order")
            previous_at = at
        if percent is not None:
            if percent < previous:
                reader.problem(item, step_path, f"{arms[0]} goes from {plain(previous)} to {plain(percent)} %, which would move users back to "
                                                f"{arms[1]}; ramps only move forward (to roll back, edit the split and reload)")
            previous = percent
        if at is not None and percent is not None:
            steps.append(RampStep(at, Split(((arms[0], int(percent * 100)), (arms[1], BUCKETS)))))
    return Ramp(split, tuple(steps)) if len(steps) == len(node.value) else None


def _step(reader: NodeReader, node: yaml.Node, path: str, arms: tuple[str, str],
          destinations: Sequence[str]) -> tuple[datetime | None, Decimal | None]:
    """One `{at: TIME, FIRST: PERCENT}` step; either part is None when it has a problem."""
    spec = reader.mapping(node, path)
    if spec is None:
        return None, None
    at: datetime | None = None
    percent: Decimal | None = None
    if "at" in spec:
        at = _timestamp(reader, spec["at"], f"{path}.at")
    else:
        reader.problem(node, f"{path}.at", f"is required: when this step takes effect, such as {EXAMPLE_TIME}")
    for key, value in spec.items():
        if key == arms[0]:
            read, fine = reader.percent(value, f"{path}.{key}")
            percent = read if fine else None
        elif key == arms[1]:
            reader.problem(value, f"{path}.{key}", f"give the percent of {arms[0]}, the destination that ramps; {arms[1]} gets the rest")
        elif key in destinations:
            reader.problem(value, f"{path}.{key}", f"{key!r} is not in this rule's split ({', '.join(arms)})")
        elif key != "at":
            reader.problem(value, f"{path}.{key}", f"unknown destination {key!r} (destinations: {', '.join(destinations)})")
    if arms[0] not in spec:
        reader.problem(node, f"{path}.{arms[0]}", f"is required: the percent of {arms[0]} from this step on")
    return at, percent


def _timestamp(reader: NodeReader, node: yaml.Node, path: str) -> datetime | None:
    """A timezone-aware time. YAML reads an unquoted ISO 8601 time as a datetime; quoted, it is text."""
    value = reader.scalar(node, path)
    if value is None and not isinstance(node, yaml.ScalarNode):
        return None  # not a single value: already reported
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            pass
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            reader.problem(node, path, f"{value.isoformat()} has no timezone: add Z (UTC) or an offset such as +01:00")
            return None
        return value.astimezone(UTC)
    if isinstance(value, date):
        reader.problem(node, path, f"{value.isoformat()} is a date: give a time with a timezone, such as {value.isoformat()}T00:00:00Z")
    else:
        reader.problem(node, path, f"must be an ISO 8601 time with a timezone, such as {EXAMPLE_TIME}, not {node.value!r}")
    return None
