"""Recorded traffic: which users a running proxy records for `simulate`, and what each recorded line holds.

The rules file's `record:` section (docs/configuration.md, "Recorded traffic") compiles into
`RecordSettings`, immutable like the rest of the `RuleSet`: a reload turns recording on or off, or
changes its share, as it changes the routing, with no restart; `splitter check` reports its problems
with their lines like any others.

- **Whole users.** An event is recorded when the cohort hash of its key (the file's `cohort.key`,
  `mmh3("{salt}:{key}") % 10000`, cohort.py) with the recording's own salt is below `percent` x 100:
  every event of a recorded user is recorded, none of the others. The salt must differ from every
  cohort salt in the file; with the same salt the recorded users would be exactly the low buckets,
  which every split sends to its first destination, and the sample would not be a sample.
- **Privacy.** A recorded line is the event as routed (envelope merged, type implied, messageId
  stamped, the client's writeKey already dropped by `prepare()`; dropped again here), with each
  configured PII path hashed by transforms' own `HashProperty` (sha256 of salt + value, the salt from
  the environment), plus `_splitter: {source, country, region}`, what the request told the proxy,
  so `simulate` replays the event with the same context. A path that routing reads (a condition's
  field or a cohort key) cannot be hashed: the replay would no longer route as the proxy did.

Pure: deciding and building lines; the proxy's recorder (proxy/observe/recording.py) queues, encodes,
compresses and writes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import mmh3
import yaml

from proxy.engine.cohort import BUCKETS, NO_KEY_BUCKET, bucket, cohort_key, field_value, key_text
from proxy.engine.model import Cohort, EventContext, Rule
from proxy.engine.moves import ROUTING_CONTEXT_FIELDS
from proxy.engine.transform_schema import checked_path, env_salt
from proxy.engine.transforms import Chain, HashProperty, Path
from proxy.engine.yaml_reader import NodeReader
from proxy.engine.yaml_reader import plain as _plain

KEY = "record"
RECORD_KEYS = ("percent", "salt", "dir", "hash", "hash_salt", "file_mb", "file_minutes", "max_mb", "queue")
ANNOTATION = "_splitter"  # the key `splitter explain` and `simulate` read each event's context from (proxy/cli/samples.py)
DEFAULT_SALT = "recording"
DEFAULT_DIR = "recordings"  # relative: under `serve --state-dir`
MB = 1024 * 1024
# key -> (default, smallest, largest)
_SIZES = {"file_mb": (16, Decimal("0.001"), Decimal(10**5)), "max_mb": (256, Decimal("0.002"), Decimal(10**7))}
_FILE_MINUTES = (60, Decimal("0.01"), Decimal(7 * 24 * 60))
_QUEUE = (10_000, 1, 1_000_000)


@dataclass(frozen=True, slots=True)
class RecordSettings:
    """What to record and where; `RuleSet.recording` is None when the file has no `record:`."""

    below: int  # an event is recorded when its bucket is below this: percent x 100 (0 to 10000)
    salt: str
    key: tuple[tuple[str, tuple[str, ...]], ...]  # the file's cohort key fields, as `Cohort.paths`
    directory: str = DEFAULT_DIR  # as written; a relative one is under `serve --state-dir`
    pii: Chain | None = None  # one HashProperty per hashed path; its salt stays out of repr()
    hashed: tuple[str, ...] = ()  # the hashed paths as written
    file_bytes: int = 16 * MB  # a file is finished at this size (compressed) ...
    file_seconds: float = 3600.0  # ... or age
    max_bytes: int = 256 * MB  # every recording file in the directory together; the oldest go first
    queue: int = 10_000  # events waiting to be written; more are not recorded (and counted)

    @property
    def percent(self) -> float:
        return self.below / 100


def is_recorded(settings: RecordSettings, event: Mapping[str, Any]) -> bool:
    """Whether `event`'s user is recorded: the cohort hash with the recording's salt (no key: the last bucket)."""
    key = cohort_key(event, settings.key)[1]
    return (NO_KEY_BUCKET if key is None else bucket(settings.salt, key)) < settings.below


def picked(settings: RecordSettings, events: Iterable[Any], skip: frozenset[int] | set[int] = frozenset()) -> list[dict[str, Any]]:
    """The events of one request to record: objects, not at an index in `skip` (the rejected), whose user is recorded.

    Runs per event on the request path while the rules record: `is_recorded` written out, with the
    cohort hash of cohort.py as one expression (`bucket()`'s call and f-string cost a third of the
    loop), and no hashing at all at 0 or 100 %."""
    below, prefix, paths = settings.below, f"{settings.salt}:", settings.key
    if below <= 0:
        return []
    everyone = below >= BUCKETS
    chosen: list[dict[str, Any]] = []
    for index, event in enumerate(events):
        if type(event) is not dict or index in skip:
            continue
        if everyone:
            chosen.append(event)
            continue
        key = None
        for _, path in paths:
            value = event.get(path[0]) if len(path) == 1 else field_value(event, path)
            if type(value) is str:
                if value.strip():
                    key = value
                    break
            elif value is not None and (key := key_text(value)) is not None:
                break
        if (NO_KEY_BUCKET if key is None else mmh3.hash(prefix + key, 0, False) % BUCKETS) < below:  # bucket(salt, key)
            chosen.append(event)
    return chosen


def recorded_line(settings: RecordSettings, event: Mapping[str, Any], ctx: EventContext) -> dict[str, Any]:
    """The line written for `event`: PII paths hashed (copy on write: `event` is not modified), no
    writeKey, and `_splitter` with what the request told the proxy (values it did not know are left out)."""
    line = settings.pii.apply(event) if settings.pii is not None else dict(event)
    line.pop("writeKey", None)
    annotation = {name: value for name, value in (("source", ctx.source), ("country", ctx.country), ("region", ctx.region)) if value is not None}
    line[ANNOTATION] = annotation
    return line


def record_settings(reader: NodeReader, node: yaml.Node | None, text: str, cohort: Cohort, rules: tuple[Rule, ...]) -> RecordSettings | None:
    """The `record` section, checked; None when absent. Problems go to `reader` like the rest of the file's."""
    if node is None:
        return None
    spec = reader.mapping(node, KEY, RECORD_KEYS)
    if spec is None:
        return None
    below = 0
    if "percent" not in spec:
        reader.problem(node, f"{KEY}.percent", "is required: the share of users to record, e.g. 1")
    else:
        percent, fine = reader.percent(spec["percent"], f"{KEY}.percent")
        below = int(percent * 100) if percent is not None and fine else 0
    salt = _salt(reader, spec.get("salt"), cohort, rules)
    directory = reader.string(spec["dir"], f"{KEY}.dir") if "dir" in spec else DEFAULT_DIR
    pii, hashed = _pii(reader, spec, text, cohort, rules)
    file_mb = _size(reader, spec, "file_mb")
    max_mb = _size(reader, spec, "max_mb")
    if max_mb < 2 * file_mb:
        reader.problem(spec.get("max_mb", node), f"{KEY}.max_mb",
                       f"must be at least twice file_mb ({_plain(file_mb)}), so a finished file can be kept beside the one being written, not {_plain(max_mb)}")
    minutes = _number(reader, spec, "file_minutes", *_FILE_MINUTES)
    queue = _number(reader, spec, "queue", *_QUEUE, whole=True)
    if salt is None or directory is None:
        return None
    return RecordSettings(below, salt, cohort.paths, directory, pii, hashed, int(file_mb * MB), float(minutes * 60), int(max_mb * MB), int(queue))


def _salt(reader: NodeReader, node: yaml.Node | None, cohort: Cohort, rules: tuple[Rule, ...]) -> str | None:
    if node is None:
        salt: str | None = DEFAULT_SALT
    else:
        salt = reader.string(node, f"{KEY}.salt")
    used = {cohort.salt, *(rule.cohort.salt for rule in rules)}
    if salt is not None and salt in used:
        reader.problem(node, f"{KEY}.salt", f"{salt!r} is a cohort salt of this file: the recorded users would be the low buckets every split "
                                            "sends to its first destination, not a sample; give the recording a salt of its own")
        return None
    return salt


def _pii(reader: NodeReader, spec: dict[str, yaml.Node], text: str, cohort: Cohort, rules: tuple[Rule, ...]) -> tuple[Chain | None, tuple[str, ...]]:
    """`hash` (the paths) and `hash_salt` (from the environment), checked as hash_property's are."""
    if "hash" not in spec:
        if "hash_salt" in spec:
            reader.problem(spec["hash_salt"], f"{KEY}.hash_salt", "hashes nothing without `hash`, the paths to hash (e.g. [traits.email])")
        return None, ()
    read = _routing_read(cohort, rules)
    paths: list[tuple[str, Path]] = []
    for text_path, item in reader.strings(spec["hash"], f"{KEY}.hash"):
        path = checked_path(reader, text, item, f"{KEY}.hash")
        if path is None:
            continue
        clash = next((other for other in read if other[:len(path)] == path or path[:len(other)] == other), None)
        if clash is not None:
            reader.problem(item, f"{KEY}.hash", f"{text_path!r} cannot be hashed: routing reads {'.'.join(clash)!r}, so a replay of the "
                                                "recorded events would not route as the proxy did")
            continue
        paths.append((text_path, path))
    if "hash_salt" not in spec:
        reader.problem(spec["hash"], f"{KEY}.hash_salt", 'is required with `hash`, from the environment, e.g. "${PII_SALT}" '
                                                         "(the variable your hash_property transforms use gives the same hashes)")
        return None, ()
    salt = env_salt(reader, text, spec["hash_salt"], f"{KEY}.hash_salt")
    if salt is None or not paths:
        return None, ()
    encoded = salt.encode("utf-8")
    return Chain(tuple(HashProperty(path, encoded) for _, path in paths)), tuple(written for written, _ in paths)


def _routing_read(cohort: Cohort, rules: tuple[Rule, ...]) -> list[tuple[str, ...]]:
    """Every event path a decision reads below properties, traits and context: conditions' context fields and cohort keys."""
    read: list[tuple[str, ...]] = [("context", section, name) for section, name in ROUTING_CONTEXT_FIELDS]
    for owner in (cohort, *(rule.cohort for rule in rules)):
        read.extend(path for _, path in owner.paths)
    return read


def _size(reader: NodeReader, spec: dict[str, yaml.Node], key: str) -> Decimal:
    default, low, high = _SIZES[key]
    return _number(reader, spec, key, default, low, high)


def _number(reader: NodeReader, spec: dict[str, yaml.Node], key: str, default: int, low: Decimal | int, high: Decimal | int,
            *, whole: bool = False) -> Decimal:
    if key not in spec:
        return Decimal(default)
    number = reader.number(spec[key], f"{KEY}.{key}")
    if number is None:
        return Decimal(default)
    if (whole and number != number.to_integral_value()) or not Decimal(low) <= number <= Decimal(high):
        kind = "a whole number" if whole else "a number"
        reader.problem(spec[key], f"{KEY}.{key}", f"must be {kind} between {_plain(Decimal(low))} and {_plain(Decimal(high))}, not {_plain(number)}")
        return Decimal(default)
    return number

