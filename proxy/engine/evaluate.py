"""`decide(rules, event, ctx) -> Decision`: the hot path, called once per event.

Rules are tried in order; the first whose conditions all hold decides. Rules without a split return
a Decision built at compile time; split rules hash the cohort key and pick the arm whose bucket
range holds it. No I/O, no logging, no randomness: the same event gets the same decision on every
replica and in every process.

Which rule matches depends only on the request (source, region, country header) and on the few
event fields conditions read: its routing signature. The first match is remembered per signature,
so an event whose signature was seen before skips the conditions (the split hash still runs per
event: the cohort key is not part of the signature).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.engine.cohort import NO_KEY_BUCKET, bucket, cohort_key
from proxy.engine.model import Decision, EventContext, Rule, RuleSet

NO_CONTEXT = EventContext()
MAX_SIGNATURES = 4096  # per (source, region); past it the memory starts over (a working set, not a history)
# What conditions read from an event, beyond the request (conditions.py): a condition reading any
# other field must be added here, or remembered matches would be wrong (a test checks the names).
SIGNATURE_CONDITIONS = frozenset({"source", "region", "type", "event", "country", "app_version", "os", "library"})


def decide(rules: RuleSet, event: Mapping[str, Any], ctx: EventContext = NO_CONTEXT) -> Decision:
    """The decision with its bucket and cohort key, as `explain` and `simulate` show it."""
    rule = first_match(rules, event, ctx)
    if rule.decision is not None:
        return rule.decision
    field, chosen = _bucket(rule, event)
    arm = _arm(rule, chosen)
    return Decision(rule.name, arm.primary, arm.mirror, chosen, field)


def shared_decision(rules: RuleSet, event: Mapping[str, Any], ctx: EventContext = NO_CONTEXT) -> Decision:
    """The same routing as `decide`, for the proxy's hot path: the rule's or the split arm's shared
    decision, without the bucket and key (nothing allocated per event)."""
    rule = first_match(rules, event, ctx)
    return rule.decision or _arm(rule, _bucket(rule, event)[1])


def _bucket(rule: Rule, event: Mapping[str, Any]) -> tuple[str | None, int]:
    """(cohort key field, bucket) of a split rule for `event`."""
    field, key = cohort_key(event, rule.cohort.paths)
    return field, bucket(rule.cohort.salt, key) if key is not None else NO_KEY_BUCKET


def _arm(rule: Rule, chosen: int) -> Decision:
    for upper, decision in rule.arms:
        if chosen < upper:
            return decision
    return rule.arms[-1][1]


def first_match(rules: RuleSet, event: Mapping[str, Any], ctx: EventContext) -> Rule:
    candidates = rules.candidates(ctx)
    if not candidates.rules[0].event_conditions:  # it takes every event: nothing to look at or remember
        return candidates.rules[0]
    signature = routing_signature(event, ctx)
    hashable = True
    try:
        found = candidates.first_match.get(signature)
    except TypeError:  # a list or an object where a name should be: decided without the memory
        found, hashable = None, False
    if found is not None:
        return found
    for rule in candidates.rules:
        for condition in rule.event_conditions:
            if not condition(event, ctx):
                break
        else:
            if hashable:
                if len(candidates.first_match) >= MAX_SIGNATURES:
                    candidates.first_match.clear()
                candidates.first_match[signature] = rule
            return rule
    raise AssertionError("unreachable: the last rule has no conditions")  # enforced by compile_rules


def routing_signature(event: Mapping[str, Any], ctx: EventContext) -> tuple[Any, ...]:
    """Every value a condition may read. Conditions tell strings from everything else, and only the
    app version condition tells numbers apart (`1`, `1.0` and `true` are equal keys), so a version
    that is not a string is keyed with its type."""
    context = event.get("context")
    version = os_name = library = country = None
    if type(context) is dict:
        section = context.get("app")
        if type(section) is dict:
            version = section.get("version")
            if version is not None and type(version) is not str:
                version = (type(version), version)
        section = context.get("os")
        if type(section) is dict:
            os_name = section.get("name")
        section = context.get("library")
        if type(section) is dict:
            library = section.get("name")
        section = context.get("location")
        if type(section) is dict:
            country = section.get("country")
    return event.get("type"), event.get("event"), ctx.country, country, version, os_name, library
