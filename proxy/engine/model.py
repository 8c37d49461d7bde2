"""The compiled, immutable form of a rules file: what `decide()` reads on every event.

Everything here is frozen and slotted and built once by `compile_rules`; a reload builds a new
`RuleSet` and swaps it in whole, so a request never sees half of an old file and half of a new one.
Split percentages are stored as integer bucket bounds, so the hot path compares integers only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from proxy.engine.catalog_schema import CatalogSettings

if TYPE_CHECKING:
    from proxy.engine.ramp import Ramp
    from proxy.engine.recording import RecordSettings
    from proxy.engine.tracking import TrackingPlan
    from proxy.engine.transforms import TransformTable
    from proxy.engine.webhook_schema import DedupSettings

DestinationKind = Literal["segment", "rudderstack"]
EVENT_TYPES = ("track", "identify", "page", "screen", "group", "alias")


@dataclass(frozen=True, slots=True)
class EventContext:
    """What the engine may know about an event beyond its body; built by ingress once per request."""

    source: str | None = None
    region: str | None = None
    country: str | None = None  # from a request header; the event's context.location.country is the fallback


@dataclass(frozen=True, slots=True)
class Destination:
    name: str
    kind: DestinationKind
    url: str
    timeout: float = 10.0
    options: Mapping[str, Any] = field(default_factory=dict)  # delivery settings, read by the delivery layer


@dataclass(frozen=True, slots=True)
class Source:
    name: str
    write_keys: tuple[str, ...] = field(repr=False)  # secrets: never in a repr, a log line or a traceback
    credentials: Mapping[str, str] = field(repr=False)  # destination name -> write key that destination receives
    webhook_secret: str | None = field(default=None, repr=False)  # Segment webhook intake (engine/webhook_schema.py)

    def credential_for(self, destination: str, presented_key: str) -> str:
        """The key to send upstream; without a configured one the client's own key passes through."""
        return self.credentials.get(destination, presented_key)


@dataclass(frozen=True, slots=True)
class Cohort:
    fields: tuple[str, ...]
    paths: tuple[tuple[str, tuple[str, ...]], ...]  # (field name, dotted path split once)
    salt: str
    reshuffle: bool = False


@dataclass(frozen=True, slots=True)
class Split:
    """Ordered arms with cumulative exclusive upper bounds in buckets: [(dest, 500), (dest2, 10000)]."""

    arms: tuple[tuple[str, int], ...]

    @property
    def percents(self) -> tuple[tuple[str, float], ...]:
        lower, out = 0, []
        for destination, upper in self.arms:
            out.append((destination, (upper - lower) / 100))
            lower = upper
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Route:
    to: tuple[str, ...] = ()
    split: Split | None = None
    mirror: tuple[str, ...] = ()
    ramp: Ramp | None = None  # split changes over time (engine/ramp.py); `split` is the one in effect

    @property
    def destinations(self) -> tuple[str, ...]:
        """Every destination the route can send to, as primary or mirror, in the order written."""
        split = tuple(destination for destination, _ in self.split.arms) if self.split else ()
        return tuple(dict.fromkeys((*self.to, *split, *self.mirror)))

    def arms_for(self, rule: str) -> tuple[tuple[int, Decision], ...]:
        """Per split arm: its exclusive upper bucket and the decision it makes (built once, shared by
        every event that lands in the arm)."""
        return tuple((upper, Decision(rule, *self.outcome(destination))) for destination, upper in self.split.arms) if self.split else ()

    def outcome(self, chosen: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(primary, mirror) once the split chose `chosen`; a mirror already primary is not sent twice."""
        primary = self.to if chosen is None or chosen in self.to else (chosen, *self.to)
        return primary, tuple(m for m in self.mirror if m not in primary)


Predicate = Callable[[Mapping[str, Any], EventContext], bool]
_NO_EVENT: Mapping[str, Any] = {}


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    index: int
    route: Route
    cohort: Cohort
    reshuffle: bool
    line: int
    when_text: Mapping[str, Any] = field(default_factory=dict)  # the `when` as written, for explain/admin
    decision: Decision | None = None  # precomputed for routes without a split: no per-event allocation
    arms: tuple[tuple[int, Decision], ...] = ()  # split: (exclusive upper bucket, the arm's decision without bucket)
    context_conditions: tuple[Predicate, ...] = ()  # source/region: the same for every event of a request
    event_conditions: tuple[Predicate, ...] = ()  # the rest, evaluated per event


class Decision(NamedTuple):
    """Where one event goes. `bucket`/`cohort_key` are None when the rule has no split.

    A NamedTuple rather than a frozen dataclass: a split rule makes one per event, and a tuple is
    built several times faster while being just as immutable.
    """

    rule: str
    primary: tuple[str, ...]
    mirror: tuple[str, ...]
    bucket: int | None = None
    cohort_key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "primary": list(self.primary),
            "mirror": list(self.mirror),
            "bucket": self.bucket,
            "cohort_key": self.cohort_key,
        }


@dataclass(frozen=True, slots=True)
class Candidates:
    """The rules that can match events of one (source, region), and which of them matched events
    with a given routing signature (see `decide`): most traffic repeats a few signatures."""

    rules: tuple[Rule, ...]
    first_match: dict[tuple[Any, ...], Rule] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RuleSet:
    version: int
    filename: str
    sha256: str
    destinations: Mapping[str, Destination]
    sources: Mapping[str, Source]
    sources_by_key: Mapping[str, Source]
    cohort: Cohort
    rules: tuple[Rule, ...]
    country_headers: tuple[str, ...]
    text: str = ""  # the file as read, for /admin/config
    dedup: DedupSettings | None = None  # messageId de-duplication per destination; None: off
    transforms: TransformTable = field(default_factory=dict)  # (rule, destination) -> Chain; empty: none configured
    tracking_plans: Mapping[str, TrackingPlan] = field(default_factory=dict)  # source name -> plan; empty: no checks
    catalog: CatalogSettings = field(default_factory=CatalogSettings)  # the event catalog's caps and sampling
    recording: RecordSettings | None = None  # `record:`: which users' events serve records for simulate; None: none
    _candidates: dict[tuple[str | None, str | None], Candidates] = field(default_factory=dict, compare=False, repr=False)

    def candidates(self, ctx: EventContext) -> Candidates:
        """The rules whose request-level conditions (source, region) hold for `ctx`, in order.

        Computed once per (source, region) and cached: a 10-rule file where half the rules are for
        other sources costs each event only the rules that can still match it.
        """
        key = (ctx.source, ctx.region)
        found = self._candidates.get(key)
        if found is None:
            found = Candidates(tuple(rule for rule in self.rules if all(condition(_NO_EVENT, ctx) for condition in rule.context_conditions)))
            if len(self._candidates) < 1024:  # sources x regions is small; the bound only guards odd callers
                self._candidates[key] = found
        return found

    @property
    def secrets(self) -> frozenset[str]:
        """Every write key, credential and webhook secret: what nothing splitter shows may contain."""
        return frozenset(secret for source in self.sources.values()
                         for secret in (*source.write_keys, *source.credentials.values(), *filter(None, (source.webhook_secret,))))

    def rule_named(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)

    def source_for_key(self, write_key: str | None) -> Source | None:
        return self.sources_by_key.get(write_key) if write_key else None

    def country_from_headers(self, headers: Mapping[str, str]) -> str | None:
        """The first configured geo header present: the CDN in front of splitter knows best."""
        for name in self.country_headers:
            value = (headers.get(name) or "").strip()
            if value:
                return value.upper()
        return None
