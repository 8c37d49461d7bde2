"""Reading sample events for `splitter explain` and `splitter simulate`.

Accepts what an operator has at hand: one event as JSON, a Segment batch body (`{"batch": [...]}`,
envelope merged as the proxy would), or NDJSON where each line is either. Bad lines are reported
with their line number rather than skipped, so a sample is never silently smaller than it looks.

Each event may also say what its request would have told the proxy, so one sample can mix sources
and countries (a warehouse export has a source name column, no write key):

- `"_splitter": {"source": "ios", "country": "DE", "region": "eu-west-1"}` on an event, or on a batch
  body for all of its items (an item's own `_splitter` keys win);
- the fields `--source-field` / `--country-field` name, such as a warehouse column `source_name`
  (`_splitter` wins over them).

For that event these win over the command line's `--source` / `--write-key` / `--header` / `--region`,
and a source name wins over the event's own `writeKey`. A null or empty value counts as not given.
With `--geoip-db`, an event whose country none of these names gets the country of its own
`context.ip`, as the proxy looks up the client's address: after a header, before the event's
`context.location.country` (which the engine reads when the context has no country).
The rules never see them: `_splitter` and the named fields are removed from the event, and so is
`writeKey`, as the proxy removes it (so `explain` never prints a write key).

Several inputs may be given, and each may be a directory: its event files are read in the order of
their paths (recursively), which for the files a running proxy records (proxy/observe/recording.py:
`events-<start time>-...ndjson.gz`) is the order they were written in. Compressed files (gzip, by
their first bytes, whatever their name) are read as they are; one cut short (a crash of its writer,
or the file still being written: `.part`) is read up to its last whole line, with a warning.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from proxy.engine import EventContext, RuleSet, Sample, Source, events_of_body, mask

ANNOTATION = "_splitter"
ANNOTATION_KEYS = ("source", "country", "region")
# What a `country` condition accepts: ISO 3166 alpha-2, and the codes CDNs add (Cloudflare's T1, XX).
_COUNTRY = re.compile(r"[A-Za-z][A-Za-z0-9]")


class InputError(ValueError):
    """An input file that is not events; the message names the line."""


@dataclass(frozen=True, slots=True)
class SampleEvent:
    event: dict[str, Any]  # as the rules see it: without `_splitter`, the named fields or `writeKey`
    write_key: str | None  # the writeKey the body named, if any
    where: str  # "NAME:LINE" or "NAME:LINE[index]", for messages
    source: str | None = None  # per-event source name, country (upper case) and region; None: not given
    country: str | None = None
    region: str | None = None


@dataclass(frozen=True, slots=True)
class SampleFields:
    """The fields of each event that name its source and country (`--source-field`, `--country-field`)."""

    source: tuple[str, ...] | None = None
    country: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class SampleDefaults:
    """What the command line says about every event that does not say it itself."""

    write_key: str | None = None
    source: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    region: str | None = None
    geoip: Callable[[str | None], str | None] | None = None  # `--geoip-db`: the country of an address (proxy/geoip.py)


def field_path(text: str) -> tuple[str, ...]:
    """`context.source_name` -> ("context", "source_name"); ValueError for an empty name or part."""
    parts = tuple(part.strip() for part in text.split("."))
    if not all(parts):
        raise ValueError(f"{text!r} is not a field name or a dotted path such as context.source_name")
    return parts


def read_events(text: str, name: str, fields: SampleFields | None = None) -> list[SampleEvent]:
    fields = fields or SampleFields()
    stripped = text.strip()
    if not stripped:
        raise InputError(f"{name}: no events in input")
    try:
        bodies = [(1, orjson.loads(stripped))]
    except orjson.JSONDecodeError:
        bodies = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                bodies.append((number, orjson.loads(line)))
            except orjson.JSONDecodeError as exc:
                raise InputError(f"{name}:{number}: invalid JSON: {exc}") from None
    samples: list[SampleEvent] = []
    for number, body in bodies:
        if not isinstance(body, dict):
            raise InputError(f"{name}:{number}: expected a JSON object (an event or a batch), got {type(body).__name__}")
        is_batch = isinstance(body.get("batch"), list)
        # Off the body before its envelope is merged; for a single event the body is the event, below.
        for_all = _annotation(body, f"{name}:{number}") if is_batch else {}
        events, write_key = events_of_body(body)
        for index, event in enumerate(events):
            where = f"{name}:{number}[{index}]" if is_batch else f"{name}:{number}"
            if not isinstance(event, dict):
                raise InputError(f"{where}: event is not a JSON object")
            given = {**_fields(event, fields, where), **for_all, **_annotation(event, where)}
            event.pop("writeKey", None)
            samples.append(SampleEvent(event, write_key, where, given.get("source"), given.get("country"), given.get("region")))
    return samples


EVENT_FILES = (".ndjson", ".jsonl", ".json")  # in a directory, files with these names are read, each also as .gz
RECORDING_PART = ".ndjson.gz.part"  # a recording file still being written (proxy/observe/recording.py)
_GZIP_MAGIC = b"\x1f\x8b"


def read_inputs(paths: Sequence[str], fields: SampleFields | None, read_stdin: Callable[[], str], warn: Callable[[str], None]) -> list[SampleEvent]:
    """The events of every input in order: `-` (read with `read_stdin`), files, and directories of event files.

    InputError names the file (and line) of a problem; `warn` gets a line for each file cut short."""
    samples: list[SampleEvent] = []
    for path in paths:
        if path == "-":
            samples.extend(read_events(read_stdin(), "<stdin>", fields))
            continue
        if not Path(path).is_dir():
            samples.extend(read_events(_file_text(Path(path), warn), path, fields))
            continue
        files = event_files(Path(path))
        if not files:
            raise InputError(f"{path}: no event files in this directory (names ending {', '.join(EVENT_FILES)}, each also .gz)")
        before = len(samples)
        for file in files:
            text = _file_text(file, warn)
            if text.strip():  # an empty one: a recording whose writer stopped before its first line
                samples.extend(read_events(text, str(file), fields))
        if len(samples) == before:
            raise InputError(f"{path}: no events in its {len(files)} event files")
    return samples


def event_files(directory: Path) -> list[Path]:
    """The event files under `directory`, sorted by path; hidden files and directories are skipped."""
    suffixes = (*EVENT_FILES, *(suffix + ".gz" for suffix in EVENT_FILES), RECORDING_PART)
    try:
        found = [p for p in directory.rglob("*") if p.name.endswith(suffixes) and p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(directory).parts)]
    except OSError as exc:
        raise InputError(f"{directory}: cannot read: {exc.strerror or exc}") from None
    return sorted(found)


def _file_text(path: Path, warn: Callable[[str], None]) -> str:
    """A file's text, gunzipped when it is gzip; a cut-short one up to its last whole line (and `warn` says so)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if data.startswith(_GZIP_MAGIC):
        data, whole = _gunzip(data)
        if not whole:
            data = data[:data.rfind(b"\n") + 1]
            why = "still being written, or its writer stopped" if path.name.endswith(".part") else "cut short"
            lines = data.count(b"\n")
            warn(f"{path}: {why}: read up to its last whole line ({lines} lines)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def _gunzip(data: bytes) -> tuple[bytes, bool]:
    """The content of one or more gzip members, and whether the last one was whole (False: cut short or damaged)."""
    out: list[bytes] = []
    while data:
        stream = zlib.decompressobj(wbits=31)
        try:
            out.append(stream.decompress(data))
        except zlib.error:
            return b"".join(out), False
        if not stream.eof:
            return b"".join(out), False
        data = stream.unused_data.lstrip(b"\0")  # some writers pad; another member may follow
        if data and not data.startswith(_GZIP_MAGIC):
            return b"".join(out), False
    return b"".join(out), True


def contexts(rules: RuleSet, samples: Iterable[SampleEvent], defaults: SampleDefaults) -> list[Sample]:
    """Pair each event with the context the proxy would give it; unknown keys and sources are an InputError."""
    if defaults.write_key and defaults.source:
        raise InputError("give --write-key or --source, not both")
    fallback: Source | None = None
    if defaults.source is not None:
        fallback = _source_named(rules, defaults.source, "--source")
    elif defaults.write_key:
        fallback = _source_keyed(rules, defaults.write_key, "--write-key")
    country = rules.country_from_headers(defaults.headers)
    out: list[Sample] = []
    for sample in samples:
        if sample.source is not None:
            source = _source_named(rules, sample.source, f"{sample.where}: source")
        elif fallback is not None:
            source = fallback
        elif sample.write_key:
            source = _source_keyed(rules, sample.write_key, f"{sample.where}: writeKey")
        else:
            source = None
        given = sample.country or country
        if given is None and defaults.geoip is not None:
            given = defaults.geoip(_context_ip(sample.event))
        ctx = EventContext(source.name if source else None, sample.region or defaults.region, given)
        out.append((sample.event, ctx))
    return out


def _context_ip(event: Mapping[str, Any]) -> str | None:
    context = event.get("context")
    ip = context.get("ip") if isinstance(context, dict) else None
    return ip.strip() if isinstance(ip, str) else None


def _source_named(rules: RuleSet, name: str, label: str) -> Source:
    source = rules.sources.get(name)
    if source is not None:
        return source
    if (keyed := rules.source_for_key(name)) is not None:  # never echo a key, even one given where a name belongs
        raise InputError(f"{label} {mask(name)}: that is a write key of source {keyed.name!r}, not a source name")
    raise InputError(f"{label} {name!r}: no such source in {rules.filename} ({_known(rules)})")


def _source_keyed(rules: RuleSet, key: str, label: str) -> Source:
    source = rules.source_for_key(key)
    if source is None:
        raise InputError(f"{label} {mask(key)}: unknown write key (no source in {rules.filename} has it; {_known(rules)})")
    return source


def _known(rules: RuleSet) -> str:
    return f"sources: {', '.join(rules.sources)}" if rules.sources else "the file declares no sources"


def _annotation(holder: dict[str, Any], where: str) -> dict[str, str]:
    """The `_splitter` object of an event or batch body, checked, and taken off it."""
    raw = holder.pop(ANNOTATION, None)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f'{where}: {ANNOTATION} must be an object such as {{"source": "ios", "country": "DE"}}, got {type(raw).__name__}')
    unknown = sorted(set(raw) - set(ANNOTATION_KEYS))
    if unknown:
        raise InputError(f"{where}: {ANNOTATION}.{unknown[0]}: unknown key (known: {', '.join(ANNOTATION_KEYS)})")
    given = {key: _checked(key, raw.get(key), f"{where}: {ANNOTATION}.{key}") for key in ANNOTATION_KEYS}
    return {key: value for key, value in given.items() if value is not None}


def _fields(event: dict[str, Any], fields: SampleFields, where: str) -> dict[str, str]:
    """The values of the `--source-field` / `--country-field` fields of `event`, taken off it."""
    given: dict[str, str] = {}
    for key, path, option in (("source", fields.source, "--source-field"), ("country", fields.country, "--country-field")):
        if path is None:
            continue
        holder: Any = event
        for part in path[:-1]:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and path[-1] in holder:
            value = _checked(key, holder.pop(path[-1]), f"{where}: {'.'.join(path)} ({option})")
            if value is not None:
                given[key] = value
    return given


def _checked(key: str, value: Any, label: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise InputError(f"{label}: expected a string, got {type(value).__name__} {orjson.dumps(value).decode()[:40]}")
    text: str = value.strip()
    if key == "country":
        if not _COUNTRY.fullmatch(text):
            raise InputError(f"{label}: {text!r} is not a two-letter country code (ISO 3166 alpha-2, such as DE)")
        return text.upper()
    return text
