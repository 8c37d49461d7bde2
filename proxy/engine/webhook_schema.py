"""Compile the Segment webhook intake settings: `sources[].webhook` and the top-level `dedup`.

A source with a webhook receives events that Segment already has (it forwards them), so two
things are checked here rather than discovered in production: every destination such a source's
events can reach has a credential of the source (there is no client write key to pass through),
and none of those destinations is a Segment one (that would send Segment its own events again).

De-duplication is on by default as soon as one source has a webhook, because that is when the same
event can arrive twice (directly from an app, and again through Segment's webhook). `dedup.store`
names a Redis server that the processes and replicas of a tier share; it is only parsed here (no
connection: the engine does no I/O), and its password never appears in a repr or a message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

import yaml

from proxy.engine import store_schema
from proxy.engine.errors import Problem
from proxy.engine.model import Destination, Rule, Source
from proxy.engine.yaml_reader import NodeReader

WEBHOOK_KEYS = ("secret",)
DEDUP_KEYS = ("window", "max_ids", "store", "store_timeout")
MIN_SECRET_LENGTH = 16
DEFAULT_WINDOW = 600.0  # seconds: Segment forwards within seconds; this leaves room for its retries and our restarts
MAX_WINDOW = 86400.0
DEFAULT_MAX_IDS = 200_000
MAX_MAX_IDS = 10_000_000


@dataclass(frozen=True, slots=True)
class DedupSettings:
    """messageId de-duplication per destination: ids are remembered `window` seconds, at most `max_ids` each
    in the process; with a `store` (a redis:// or rediss:// URL) also there, shared by every process using it."""

    window: float = DEFAULT_WINDOW
    max_ids: int = DEFAULT_MAX_IDS
    store: str | None = field(default=None, repr=False)  # may carry a password: see shown_store
    store_timeout: float = store_schema.DEFAULT_STORE_TIMEOUT

    @property
    def shown_store(self) -> str | None:
        """The store's URL fit for logs, errors and /admin/config: a password in it is masked."""
        return store_schema.shown_store_url(self.store) if self.store is not None else None

    def __repr__(self) -> str:
        return f"DedupSettings(window={self.window!r}, max_ids={self.max_ids!r}, store={self.shown_store!r}, store_timeout={self.store_timeout!r})"


def webhook_secret(reader: NodeReader, node: yaml.Node, path: str) -> str | None:
    """`webhook: {secret: ...}`: the shared secret Segment signs each request body with."""
    spec = reader.mapping(node, path, WEBHOOK_KEYS)
    if spec is None:
        return None
    if "secret" not in spec:
        reader.problem(node, f"{path}.secret", "is required (the Shared Secret set in Segment's Webhooks destination)")
        return None
    secret = reader.string(spec["secret"], f"{path}.secret")
    if secret is not None and len(secret) < MIN_SECRET_LENGTH:
        reader.problem(spec["secret"], f"{path}.secret", f"is {len(secret)} characters; use at least {MIN_SECRET_LENGTH} (a random string)")
        return None
    return secret


def dedup_settings(reader: NodeReader, node: yaml.Node | None, sources: Mapping[str, Source]) -> DedupSettings | None:
    """None means off. Absent: on with defaults when any source has a webhook. `off`/`false`: off."""
    if node is None:
        return DedupSettings() if any(s.webhook_secret for s in sources.values()) else None
    if isinstance(node, yaml.ScalarNode):
        enabled = reader.boolean(node, "dedup")
        return DedupSettings() if enabled else None
    spec = reader.mapping(node, "dedup", DEDUP_KEYS)
    if spec is None:
        return None
    window = _window(reader, spec["window"]) if "window" in spec else DEFAULT_WINDOW
    store = store_schema.store_url(reader, spec["store"]) if "store" in spec else None
    timeout = store_schema.DEFAULT_STORE_TIMEOUT
    if "store_timeout" in spec:
        timeout = store_schema.store_timeout(reader, spec["store_timeout"]) or timeout
        if "store" not in spec:
            reader.problem(spec["store_timeout"], "dedup.store_timeout", "has no effect without dedup.store")
    max_ids = DEFAULT_MAX_IDS
    if "max_ids" in spec:
        number = reader.number(spec["max_ids"], "dedup.max_ids")
        if number is not None and (number != number.to_integral_value() or not 1 <= number <= MAX_MAX_IDS):
            reader.problem(spec["max_ids"], "dedup.max_ids", f"must be a whole number between 1 and {MAX_MAX_IDS}, not {number.normalize():f}")
        elif number is not None:
            max_ids = int(number)
    return DedupSettings(window, max_ids, store, timeout) if window is not None else None


def _window(reader: NodeReader, node: yaml.Node) -> float | None:
    seconds = reader.duration(node, "dedup.window")
    if seconds is None:
        return None
    if not 0 < seconds <= Decimal(int(MAX_WINDOW)):
        reader.problem(node, "dedup.window", f"must be more than 0 and at most 24h, not {reader.scalar(node, 'dedup.window')!r}")
        return None
    return float(seconds)


def check_webhook_routes(reader: NodeReader, sources: Mapping[str, Source], places: Mapping[str, tuple[str, int]],
                         destinations: Mapping[str, Destination], rules: tuple[Rule, ...]) -> None:
    """Every destination a webhook source's events can reach needs its credential and must not be Segment.

    `places` gives each webhook source's YAML path and line, for the missing-credential problem.
    """
    for source in sources.values():
        if source.webhook_secret is None:
            continue
        missing: dict[str, Rule] = {}
        for rule in reachable_rules(rules, source.name):
            for name in rule.route.destinations:
                destination = destinations.get(name)
                if destination is not None and destination.kind == "segment":
                    reader.problems.append(Problem(
                        reader.filename, rule.line, f"rules[{rule.index}].route",
                        f"events of webhook source {source.name!r} can reach segment destination {name!r}: Segment forwarded them, "
                        f"so it would receive them twice; give this source a rule (before this one) that routes to other destinations only",
                    ))
                elif name not in source.credentials:
                    missing.setdefault(name, rule)
        if missing:
            names = ", ".join(f"{name} (rule {rule.name!r})" for name, rule in missing.items())
            path, line = places[source.name]
            reader.problems.append(Problem(
                reader.filename, line, f"{path}.credentials",
                f"webhook source {source.name!r} needs a credential for every destination its events can reach; missing: {names}",
            ))


def reachable_rules(rules: tuple[Rule, ...], source: str) -> list[Rule]:
    """The rules that can decide for events of `source`, up to the first that takes all of them."""
    found = []
    for rule in rules:
        named = rule.when_text.get("source")
        if named is not None and source not in (named if isinstance(named, list) else [named]):
            continue
        found.append(rule)
        if not rule.event_conditions and "region" not in rule.when_text:
            break
    return found

