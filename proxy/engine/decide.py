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
    rule = first_match(rules, event, ctx)
    return rule.decision or _split(rule, event)


def first_match(rules: RuleSet, event: Mapping[str, Any], ctx: EventContext) -> Rule:
    candidates = rules.candidates(ctx)
    signature = routing_signature(event, ctx)
    if signature is not None:
        found = candidates.first_match.get(signature)
        if found is not None:
            return found
    for rule in candidates.rules:
        for condition in rule.event_conditions:
            if not condition(event, ctx):
                break
        else:
            if signature is not None:
                if len(candidates.first_match) >= MAX_SIGNATURES:
                    candidates.first_match.clear()
                candidates.first_match[signature] = rule
            return rule
    raise AssertionError("unreachable: the last rule has no conditions")  # enforced by compile_rules


def routing_signature(event: Mapping[str, Any], ctx: EventContext) -> tuple[Any, ...] | None:
    """Every value a condition may read, or None when one is not a plain string (then nothing is
    remembered: `1`, `1.0` and `True` are equal as keys but not to the conditions)."""
    context = event.get("context")
    app = os_ = library = location = None
    if type(context) is dict:
        app, os_, library, location = context.get("app"), context.get("os"), context.get("library"), context.get("location")
    signature = (
        event.get("type"),
        event.get("event"),
        ctx.country,
        location.get("country") if type(location) is dict else None,
        app.get("version") if type(app) is dict else None,
        os_.get("name") if type(os_) is dict else None,
        library.get("name") if type(library) is dict else None,
    )
    for value in signature:
        if value is not None and type(value) is not str:
            return None
    return signature


def _split(rule: Rule, event: Mapping[str, Any]) -> Decision:
    field, key = cohort_key(event, rule.cohort.paths)
    chosen = bucket(rule.cohort.salt, key) if key is not None else NO_KEY_BUCKET
    for upper, primary, mirror in rule.arms:
        if chosen < upper:
            return Decision(rule.name, primary, mirror, chosen, field)
    _, primary, mirror = rule.arms[-1]
    return Decision(rule.name, primary, mirror, chosen, field)
