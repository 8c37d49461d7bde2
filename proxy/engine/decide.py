"""`decide(rules, event, ctx) -> Decision`: the hot path, called once per event.

Rules are tried in order; the first whose conditions all hold decides. Rules without a split return
a Decision built at compile time; split rules hash the cohort key and pick the arm whose bucket
range holds it. No I/O, no logging, no randomness: the same event gets the same decision on every
replica and in every process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.engine.cohort import NO_KEY_BUCKET, bucket, cohort_key
from proxy.engine.model import Decision, EventContext, Rule, RuleSet

NO_CONTEXT = EventContext()


def decide(rules: RuleSet, event: Mapping[str, Any], ctx: EventContext = NO_CONTEXT) -> Decision:
    for rule in rules.candidates(ctx):
        for condition in rule.event_conditions:
            if not condition(event, ctx):
                break
        else:
            return rule.decision or _split(rule, event)
    raise AssertionError("unreachable: the last rule has no conditions")  # enforced by compile_rules


def _split(rule: Rule, event: Mapping[str, Any]) -> Decision:
    field, key = cohort_key(event, rule.cohort.paths)
    chosen = bucket(rule.cohort.salt, key) if key is not None else NO_KEY_BUCKET
    for upper, primary, mirror in rule.arms:
        if chosen < upper:
            return Decision(rule.name, primary, mirror, chosen, field)
    _, primary, mirror = rule.arms[-1]
    return Decision(rule.name, primary, mirror, chosen, field)
