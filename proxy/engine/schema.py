"""Compile a rules file (schema version 1) into an immutable `RuleSet`, or fail with every problem.

Layout of the file and the meaning of each key are documented in docs/configuration.md; this
module is the single place that enforces them. It reads the node tree from `yaml_source.py` so each
problem carries the line it is about, and it never half-builds: any problem raises `RulesError`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from decimal import Decimal
from urllib.parse import urlsplit

import yaml

from proxy.engine import conditions, webhook_schema
from proxy.engine.catalog_schema import catalog_settings
from proxy.engine.errors import Problem, RulesError
from proxy.engine.masking import mask
from proxy.engine.model import Cohort, Decision, Destination, Predicate, Route, Rule, RuleSet, Source, Split
from proxy.engine.ramp import compile_ramp
from proxy.engine.recording import record_settings
from proxy.engine.tracking_schema import PlanCompiler, ReadFile
from proxy.engine.transform_schema import compile_transforms
from proxy.engine.yaml_reader import NodeReader
from proxy.engine.yaml_reader import plain as _plain
from proxy.engine.yaml_source import compose, line_of

SCHEMA_VERSION = 1
TOP_KEYS = ("version", "destinations", "sources", "cohort", "rules", "country_headers", "dedup", "catalog", "record")
DESTINATION_KEYS = ("kind", "url", "timeout", "delivery", "transforms")
SOURCE_KEYS = ("name", "write_keys", "credentials", "webhook", "tracking_plan")
COHORT_KEYS = ("key", "salt", "reshuffle")
RULE_KEYS = ("name", "when", "route", "cohort", "reshuffle", "transforms")
ROUTE_KEYS = ("split", "to", "mirror", "ramp")
DEFAULT_COHORT_KEY = ("anonymousId", "userId")
DEFAULT_SALT = "splitter"
DEFAULT_COUNTRY_HEADERS: tuple[str, ...] = ("CF-IPCountry", "CloudFront-Viewer-Country", "X-Country")
# destinations.NAME.delivery: name -> (integer?, minimum, maximum). Defaults live with the delivery layer.
DELIVERY_OPTIONS: dict[str, tuple[bool, float, float]] = {
    "batch_max_events": (True, 1, 2500),
    "batch_max_bytes": (True, 1024, 500 * 1024),
    "flush_interval": (False, 0, 5),
    "max_in_flight": (True, 1, 64),
    "retry_base": (False, 0.001, 60),
    "retry_max": (False, 0.01, 3600),
    "breaker_failures": (True, 1, 1000),
    "breaker_cooldown": (False, 0.01, 3600),
    "redirect_attempts": (True, 1, 1000),
    "spool_quota_mb": (False, 0.001, 10**7),
}
_HUNDRED = Decimal(100)


def compile_rules(text: str, *, filename: str = "rules.yaml", env: Mapping[str, str] | None = None, sha256: str | None = None,
                  read_file: ReadFile | None = None) -> RuleSet:
    """Pure: text in, RuleSet out. `env` supplies `${VAR}` values (callers pass os.environ).

    `sha256` is the digest of the file's bytes when the caller has them (so it matches `sha256sum`);
    otherwise the digest of the text encoded as UTF-8. `read_file` reads tracking-plan files that the
    rules refer to (paths relative to `filename`); without it, only inline plans compile.
    """
    document = compose(text, filename=filename, env=env or {})
    problems = document.problems
    if document.root is None:
        if not problems:
            problems.append(Problem(filename, 1, "", "the file is empty"))
        raise RulesError(problems)
    reader = NodeReader(filename, problems, document.unresolved)
    compiler = _Compiler(reader, PlanCompiler(reader, env or {}, read_file))
    ruleset = compiler.compile(document.root, filename, sha256 or hashlib.sha256(text.encode("utf-8")).hexdigest(), text)
    if problems or ruleset is None:
        raise RulesError(problems)
    return ruleset


def load_rules(path: str, env: Mapping[str, str]) -> RuleSet:
    """The engine's file reads: read `path` (and the plan files it names) and compile it. The sha256 is of `path`'s bytes."""
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RulesError([Problem(path, line, "", f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})")]) from None
    return compile_rules(text, filename=path, env=env, sha256=hashlib.sha256(data).hexdigest(), read_file=_read_bytes)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


class _Compiler:
    def __init__(self, reader: NodeReader, plans: PlanCompiler) -> None:
        self.r = reader
        self.plans = plans
        self.destinations: dict[str, Destination] = {}
        self.destination_names: list[str] = []  # declared, valid or not: references to them are not "unknown"
        self.sources: dict[str, Source] = {}
        self.webhook_places: dict[str, tuple[str, int]] = {}  # webhook source name -> (YAML path, line)

    def compile(self, root: yaml.Node, filename: str, sha256: str, text: str) -> RuleSet | None:
        top = self.r.mapping(root, "", TOP_KEYS)
        if top is None:
            return None
        for required in ("version", "destinations", "sources", "rules"):
            if required not in top:
                self.r.problem(root, required, "is required")
        if "version" in top:
            version = self.r.scalar(top["version"], "version")
            if isinstance(version, bool) or version != SCHEMA_VERSION:
                self.r.problem(top["version"], "version", f"unsupported schema version {version!r}; this splitter reads version {SCHEMA_VERSION}")
        if "destinations" in top:
            self._destinations(top["destinations"])
        sources_by_key: dict[str, Source] = {}
        if "sources" in top:
            sources_by_key = self._sources(top["sources"])
        cohort = self._cohort(top["cohort"], "cohort", None) if "cohort" in top else _default_cohort()
        headers = DEFAULT_COUNTRY_HEADERS
        if "country_headers" in top:
            headers = tuple(h for h, _ in self.r.strings(top["country_headers"], "country_headers"))
        rules = self._rules(top["rules"], cohort or _default_cohort()) if "rules" in top else ()
        dedup = webhook_schema.dedup_settings(self.r, top.get("dedup"), self.sources)
        webhook_schema.check_webhook_routes(self.r, self.sources, self.webhook_places, self.destinations, rules)
        recording = record_settings(self.r, top.get("record"), text, cohort or _default_cohort(), rules)
        transforms = compile_transforms(self.r, top, text, rules, self._unknown_destination)
        catalog = catalog_settings(self.r, top.get("catalog"))
        if cohort is None or not rules:
            return None
        return RuleSet(SCHEMA_VERSION, filename, sha256, self.destinations, self.sources, sources_by_key, cohort, rules, headers, text, recording=recording,
                       dedup=dedup, transforms=transforms, tracking_plans=self.plans.plans, catalog=catalog)

    def _destinations(self, node: yaml.Node) -> None:
        entries = self.r.mapping(node, "destinations")
        if entries is not None and not entries:
            self.r.problem(node, "destinations", "must name at least one destination")
        self.destination_names = list(entries or {})
        for name, value in (entries or {}).items():
            path = f"destinations.{name}"
            spec = self.r.mapping(value, path, DESTINATION_KEYS)
            if spec is None:
                continue
            kind = self.r.string(spec["kind"], f"{path}.kind") if "kind" in spec else None
            if "kind" not in spec:
                self.r.problem(value, f"{path}.kind", "is required (segment or rudderstack)")
            elif kind is not None and kind not in ("segment", "rudderstack"):
                self.r.problem(spec["kind"], f"{path}.kind", f"must be segment or rudderstack, not {kind!r}")
                kind = None
            url = self._url(spec.get("url"), value, f"{path}.url")
            timeout = Decimal(10)
            if "timeout" in spec:
                timeout = self.r.number(spec["timeout"], f"{path}.timeout", positive=True) or timeout
            options = self._delivery(spec["delivery"], f"{path}.delivery") if "delivery" in spec else {}
            if kind is not None and url is not None:
                self.destinations[name] = Destination(name, kind, url, float(timeout), options)  # type: ignore[arg-type]

    def _delivery(self, node: yaml.Node, path: str) -> dict[str, float | int]:
        options: dict[str, float | int] = {}
        for key, value_node in (self.r.mapping(node, path, tuple(DELIVERY_OPTIONS)) or {}).items():
            integer, low, high = DELIVERY_OPTIONS[key]
            number = self.r.number(value_node, f"{path}.{key}")
            if number is None:
                continue
            if integer and number != number.to_integral_value():
                self.r.problem(value_node, f"{path}.{key}", f"must be a whole number, not {_plain(number)}")
            elif not Decimal(str(low)) <= number <= Decimal(str(high)):
                self.r.problem(value_node, f"{path}.{key}", f"must be between {low:g} and {high:g}, not {_plain(number)}")
            else:
                options[key] = int(number) if integer else float(number)
        return options

    def _url(self, node: yaml.Node | None, parent: yaml.Node, path: str) -> str | None:
        if node is None:
            self.r.problem(parent, path, "is required")
            return None
        url = self.r.string(node, path)
        if url is None:
            return None
        parts = urlsplit(url)
        shown = _without_userinfo(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.r.problem(node, path, f"must be an http:// or https:// URL with a host, not {shown!r}")
            return None
        if parts.path.rstrip("/").endswith("/v1"):
            self.r.problem(node, path, f"must not end in /v1 (splitter appends /v1/batch): {shown!r}")
            return None
        if "@" in parts.netloc:  # the HTTP client refuses userinfo beside an Authorization header: nothing would be delivered
            self.r.problem(node, path, f"must not carry a user or password ({shown!r}): the credential comes from sources[].credentials")
            return None
        return url.rstrip("/")

    def _sources(self, node: yaml.Node) -> dict[str, Source]:
        by_key: dict[str, Source] = {}
        key_owner: dict[str, str] = {}
        if not isinstance(node, yaml.SequenceNode):
            self.r.problem(node, "sources", "must be a list of sources")
            return by_key
        for index, item in enumerate(node.value):
            path = f"sources[{index}]"
            spec = self.r.mapping(item, path, SOURCE_KEYS)
            if spec is None:
                continue
            name = self._unique_name(item, spec, path, self.sources.keys(), "source")
            keys: list[str] = []
            if "write_keys" not in spec and "webhook" not in spec:
                self.r.problem(item, f"{path}.write_keys", "is required (the write keys clients of this source present)")
            owner_name = name or f"sources[{index}]"
            for key, key_node in self.r.strings(spec["write_keys"], f"{path}.write_keys") if "write_keys" in spec else []:
                owner = key_owner.get(key)
                if owner is not None:
                    where = "twice in this source" if owner == owner_name else f"already in source {owner!r}"
                    self.r.problem(key_node, f"{path}.write_keys", f"write key {mask(key)} is {where}")
                    continue
                key_owner[key] = owner_name
                keys.append(key)
            credentials: dict[str, str] = {}
            for dest, cred_node in (self.r.mapping(spec["credentials"], f"{path}.credentials") or {}).items() if "credentials" in spec else ():
                if dest not in self.destination_names:
                    self.r.problem(cred_node, f"{path}.credentials.{dest}", self._unknown_destination(dest))
                credential = self.r.string(cred_node, f"{path}.credentials.{dest}")
                if credential is not None:
                    credentials[dest] = credential
            secret = webhook_schema.webhook_secret(self.r, spec["webhook"], f"{path}.webhook") if "webhook" in spec else None
            if "tracking_plan" in spec:
                self.plans.add(name, spec["tracking_plan"], f"{path}.tracking_plan")
            if name is not None:
                if secret is not None:
                    self.webhook_places[name] = (path, line_of(item))
                source = Source(name, tuple(keys), credentials, secret)
                self.sources[name] = source
                by_key.update((key, source) for key in keys)
        return by_key

    def _unique_name(self, item: yaml.Node, spec: dict[str, yaml.Node], path: str, taken: Iterable[str], what: str) -> str | None:
        """The required `name` of a source or rule; None when missing, invalid or already used."""
        if "name" not in spec:
            self.r.problem(item, f"{path}.name", "is required")
            return None
        name = self.r.string(spec["name"], f"{path}.name")
        if name is not None and name in taken:
            self.r.problem(spec["name"], f"{path}.name", f"duplicate {what} name {name!r}")
            return None
        return name

    def _unknown_destination(self, name: str) -> str:
        return f"unknown destination {name!r} (destinations: {', '.join(self.destination_names) or 'none'})"

    def _cohort(self, node: yaml.Node, path: str, base: Cohort | None) -> Cohort | None:
        spec = self.r.mapping(node, path, COHORT_KEYS)
        if spec is None:
            return None
        fields = base.fields if base else DEFAULT_COHORT_KEY
        if "key" in spec:
            written = self.r.strings(spec["key"], f"{path}.key")
            fields = tuple(text for text, _ in written)
            for text, field_node in written:
                if any(not part for part in text.split(".")):
                    self.r.problem(field_node, f"{path}.key", f"{text!r} is not a field path (use names separated by dots)")
        salt = base.salt if base else DEFAULT_SALT
        if "salt" in spec:
            salt = self.r.string(spec["salt"], f"{path}.salt", allow_empty=True) or ""
        reshuffle = bool("reshuffle" in spec and self.r.boolean(spec["reshuffle"], f"{path}.reshuffle"))
        return Cohort(fields, tuple((f, tuple(f.split("."))) for f in fields), salt, reshuffle)

    def _rules(self, node: yaml.Node, cohort: Cohort) -> tuple[Rule, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.r.problem(node, "rules", "must be a non-empty list of rules")
            return ()
        rules: list[Rule] = []
        names: set[str] = set()
        last = len(node.value) - 1
        for index, item in enumerate(node.value):
            path = f"rules[{index}]"
            spec = self.r.mapping(item, path, RULE_KEYS)
            if spec is None:
                continue
            name = self._unique_name(item, spec, path, names, "rule")
            names.add(name or "")
            predicates: tuple[tuple[str, Predicate], ...] = ()
            when_text: dict[str, object] = {}
            if "when" in spec:
                predicates, when_text = self._when(spec["when"], f"{path}.when")
                if index == last:
                    self.r.problem(spec["when"], f"{path}.when", "the last rule is the default and must have no `when`, so that every event gets a decision")
            elif index != last:
                self.r.problem(item, path, "only the last rule may omit `when`: this one would match every event and hide the rules after it")
            route = self._route(spec["route"], f"{path}.route") if "route" in spec else None
            if "route" not in spec:
                self.r.problem(item, f"{path}.route", "is required")
            rule_cohort = self._cohort(spec["cohort"], f"{path}.cohort", cohort) if "cohort" in spec else cohort
            reshuffle = bool("reshuffle" in spec and self.r.boolean(spec["reshuffle"], f"{path}.reshuffle"))
            if name is not None and route is not None and rule_cohort is not None:
                fixed = None if route.split else Decision(name, *route.outcome(None))
                arms = route.arms_for(name)
                rules.append(Rule(
                    name, index, route, rule_cohort, reshuffle, line_of(item), when_text, fixed, arms,
                    context_conditions=tuple(p for n, p in predicates if n in conditions.CONTEXT_ONLY),
                    event_conditions=tuple(p for n, p in predicates if n not in conditions.CONTEXT_ONLY),
                ))
        return tuple(rules)

    def _when(self, node: yaml.Node, path: str) -> tuple[tuple[tuple[str, Predicate], ...], dict[str, object]]:
        spec = self.r.mapping(node, path, conditions.CONDITION_NAMES)
        if spec is not None and not spec:
            self.r.problem(node, path, "must hold at least one condition (leave `when` out for the default rule)")
        predicates, written = [], {}
        for name, value_node in sorted((spec or {}).items(), key=lambda item: conditions.EVALUATION_ORDER.index(item[0])):
            values = self.r.strings(value_node, f"{path}.{name}")
            if not values:
                continue
            texts = [text for text, _ in values]
            written[name] = texts if isinstance(value_node, yaml.SequenceNode) else texts[0]
            try:
                if name == "source":
                    predicates.append((name, conditions.source_condition(texts, set(self.sources))))
                else:
                    predicates.append((name, conditions.BUILDERS[name](texts)))
            except ValueError as exc:
                self.r.problem(value_node, f"{path}.{name}", str(exc))
        return tuple(predicates), {name: written[name] for name in (spec or {}) if name in written}  # as written

    def _route(self, node: yaml.Node, path: str) -> Route | None:
        if not isinstance(node, yaml.MappingNode):
            to = self._destination_list(node, path)
            return Route(to=to) if to else None
        spec = self.r.mapping(node, path, ROUTE_KEYS)
        if spec is None:
            return None
        if "split" not in spec and "to" not in spec:
            self.r.problem(node, path, "needs `split` and/or `to`: which destinations are primary")
            return None
        split = self._split(spec["split"], f"{path}.split") if "split" in spec else None
        to = self._destination_list(spec["to"], f"{path}.to") if "to" in spec else ()
        mirror = self._destination_list(spec["mirror"], f"{path}.mirror") if "mirror" in spec else ()
        for dest in mirror:
            if dest in to:
                self.r.problem(spec["mirror"], f"{path}.mirror", f"{dest!r} is always primary here (it is in `to`), so mirroring it does nothing")
        if ("split" in spec and split is None) or ("to" in spec and not to):
            return None
        ramp = compile_ramp(self.r, spec["ramp"], f"{path}.ramp", split, "split" in spec, self.destination_names) if "ramp" in spec else None
        return Route(to=to, split=split, mirror=mirror, ramp=ramp)

    def _destination_list(self, node: yaml.Node, path: str) -> tuple[str, ...]:
        names: list[str] = []
        for name, name_node in self.r.strings(node, path):
            if name not in self.destination_names:
                self.r.problem(name_node, path, self._unknown_destination(name))
            elif name in names:
                self.r.problem(name_node, path, f"{name!r} is listed twice")
            else:
                names.append(name)
        return tuple(names)

    def _split(self, node: yaml.Node, path: str) -> Split | None:
        arms = self.r.mapping(node, path)
        if arms is None:
            return None
        if not arms:
            self.r.problem(node, path, "must give at least one destination and its percent")
            return None
        total, bounds, ok, summable = Decimal(0), [], True, True
        for dest, pct_node in arms.items():
            if dest not in self.destination_names:
                self.r.problem(pct_node, f"{path}.{dest}", self._unknown_destination(dest))
                ok = False
            percent, fine = self.r.percent(pct_node, f"{path}.{dest}")
            if percent is None:
                ok = summable = False
                continue
            ok = ok and fine
            total += percent
            bounds.append((dest, int(total * 100)))
        if summable and total != _HUNDRED:
            self.r.problem(node, path, f"percents sum to {_plain(total)}, must be 100")
            ok = False
        return Split(tuple(bounds)) if ok else None


def _without_userinfo(url: str) -> str:
    """A URL fit for an error message: credentials in `user:pass@`, or in the query or fragment (where
    a token can ride along too; /admin/config drops them as well), are not repeated."""
    cut = min((at for at in (url.find("?"), url.find("#")) if at >= 0), default=-1)
    if cut >= 0:
        url = f"{url[:cut]}{url[cut]}****"
    scheme, sep, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    if sep and "@" in authority:
        return f"{scheme}://****@{authority.rpartition('@')[2]}{slash}{tail}"
    return url


def _default_cohort() -> Cohort:
    return Cohort(DEFAULT_COHORT_KEY, tuple((f, (f,)) for f in DEFAULT_COHORT_KEY), DEFAULT_SALT)

