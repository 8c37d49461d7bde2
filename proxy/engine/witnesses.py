"""Made-up events that reach every pair of rules two rules files can decide an event with.

Which rule decides an event depends only on a few attributes (source, region, country, type,
event name, app version, OS, library), never on the user. So the classes a comparison must look at
are found by building events from the values the two files' `when`s name: one per way of
satisfying each rule's conditions, every pair of those merged (a rule inserted above another is
seen by the events of both), and a plain event per source. Each event is run through both files'
first-match; the first event found for a pair of rules stands for the class.

This is exact for everything but globs, whose interplay an instance of each cannot cover (an event
name matching both `Checkout *` and `* Completed`); the replay of real traffic covers that.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

from proxy.engine.model import EventContext, Rule, RuleSet
from proxy.engine.versions import parse_range, parse_version

Witness = Mapping[str, str]  # attribute -> value: source, region, country, type, event, app_version, os, library
PER_RULE = 16  # ways of satisfying one rule's conditions that are tried
MAX_WITNESSES = 20_000  # bounds the pairs for files of hundreds of rules (a few hundred ms at most)
_VERSION_FLOOR = "0.0.1"


def _values(written: object) -> list[str]:
    return [written] if isinstance(written, str) else [str(v) for v in written] if isinstance(written, list) else []


def _instance(pattern: str) -> str:
    """An event name a glob matches: every wildcard filled with one letter."""
    return pattern.replace("*", "x").replace("?", "x")


def _versions(ranges: list[str]) -> list[str]:
    """A version inside each range, tried at each bound, just under it and just over it."""
    found: list[str] = []
    for text in ranges:
        checks = parse_range(text)
        bounds = [part.strip().lstrip("<>=!").strip() for part in text.split(",")]
        candidates = [_VERSION_FLOOR, *itertools.chain.from_iterable((b, f"{b}-0", f"{b}.1", f"{b}.0.1") for b in bounds), "9999.0"]
        for candidate in candidates:
            parsed = parse_version(candidate)
            if parsed is not None and checks.contains(parsed):
                found.append(candidate)
                break
    return found


def rule_witnesses(rule: Rule) -> list[dict[str, str]]:
    """Ways of satisfying `rule`'s conditions, one value per condition, at most PER_RULE."""
    choices: list[list[tuple[str, str]]] = []
    for name, written in rule.when_text.items():
        values = _values(written)
        if name == "event":
            values = [_instance(v) for v in values]
        elif name == "app_version":
            values = _versions(values)
        elif name == "country":
            values = [v.upper() for v in values]
        if values:
            choices.append([(name, value) for value in values])
    return [dict(combination) for combination in itertools.islice(itertools.product(*choices), PER_RULE)]


def witnesses(old: RuleSet, new: RuleSet) -> Iterator[dict[str, str]]:
    """Plain events per source, each rule's ways, then every two of those merged."""
    yield {}
    for source in dict.fromkeys([*old.sources, *new.sources]):
        yield {"source": source}
    singles = [w for rule in (*old.rules, *new.rules) for w in rule_witnesses(rule) if w]
    yield from singles
    pairs = itertools.chain.from_iterable(({**second, **first}, {**first, **second}) for first, second in itertools.combinations(singles, 2))
    yield from itertools.islice(pairs, MAX_WITNESSES)


def as_event(witness: Mapping[str, str]) -> tuple[dict[str, Any], EventContext]:
    """The event and request context a witness describes (a track call unless it says otherwise)."""
    context: dict[str, Any] = {}
    for section, attribute, key in (("app", "app_version", "version"), ("os", "os", "name"), ("library", "library", "name")):
        if attribute in witness:
            context[section] = {key: witness[attribute]}
    event: dict[str, Any] = {"type": witness.get("type", "track"), "context": context}
    if "event" in witness:
        event["event"] = witness["event"]
    return event, EventContext(witness.get("source"), witness.get("region"), witness.get("country"))


def classes(old: RuleSet, new: RuleSet) -> dict[tuple[str, str], dict[str, str]]:
    """(old rule, new rule) -> the first witness those two rules decide."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    for witness in witnesses(old, new):
        event, ctx = as_event(witness)
        pair = (_first_match(old, event, ctx).name, _first_match(new, event, ctx).name)
        found.setdefault(pair, witness)
    return found


def _first_match(rules: RuleSet, event: Mapping[str, Any], ctx: EventContext) -> Rule:
    """`decide`'s first match without its memory of signatures: made-up events must not fill the
    live rules' cache."""
    for rule in rules.candidates(ctx).rules:
        if all(condition(event, ctx) for condition in rule.event_conditions):
            return rule
    raise AssertionError("unreachable: the last rule has no conditions")
