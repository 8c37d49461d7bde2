"""Per-event source, country and region in the samples of `splitter explain` and `splitter simulate`.

A warehouse export has no write key but a source name column and often a country: each event says
them itself (`"_splitter": {...}`, or the fields `--source-field` / `--country-field` name), over the
command line's `--source` / `--write-key` / `--header` / `--region`. Run as users run it: a real
process, real files.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RULES_ENV
from tests.test_cli_engine import run

RULES = """\
version: 1
destinations:
  segment:     {kind: segment,     url: https://api.segment.io}
  rudderstack: {kind: rudderstack, url: "${RUDDERSTACK_DATA_PLANE_URL}"}
sources:
  - name: web
    write_keys: ["${SEGMENT_WRITE_KEY_WEB}"]
    credentials: {segment: "${SEGMENT_WRITE_KEY_WEB}", rudderstack: "${RUDDERSTACK_WRITE_KEY_WEB}"}
  - name: ios
    write_keys: ["${SEGMENT_WRITE_KEY_IOS}"]
    credentials: {segment: "${SEGMENT_WRITE_KEY_IOS}", rudderstack: "${RUDDERSTACK_WRITE_KEY_IOS}"}
  - name: backend
    write_keys: ["${SEGMENT_WRITE_KEY_BACKEND}"]
    credentials: {segment: "${SEGMENT_WRITE_KEY_BACKEND}", rudderstack: "${RUDDERSTACK_WRITE_KEY_BACKEND}"}
cohort:
  key: [anonymousId, userId]
  salt: "segment-to-rudderstack"
rules:
  - name: eu-web
    when: {source: web, country: [DE, FR]}
    route: rudderstack
  - name: ios-apps
    when: {source: ios}
    route: {to: [segment], mirror: [rudderstack]}
  - name: eu-replicas
    when: {region: eu-west-1}
    route: rudderstack
  - name: everyone-else
    route: segment
"""
# The same routing, with a transform on everything RudderStack receives: `explain` then prints that copy.
TRANSFORMED = RULES.replace(
    '  rudderstack: {kind: rudderstack, url: "${RUDDERSTACK_DATA_PLANE_URL}"}\n',
    '  rudderstack:\n    kind: rudderstack\n    url: "${RUDDERSTACK_DATA_PLANE_URL}"\n'
    "    transforms:\n      - set_property: {path: context.splitter.transformed, value: true}\n",
)
assert TRANSFORMED != RULES
DECISION_KEYS = ["rule", "primary", "mirror", "bucket", "cohort_key"]
KNOWN = "(sources: web, ios, backend)"


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


def ndjson(*events: dict[str, Any]) -> str:
    return "".join(json.dumps(event) + "\n" for event in events)


def explain(env: dict[str, str], rules: Path, text: str, *flags: str) -> list[dict[str, Any]]:
    result = run(["explain", str(rules), "-", *flags], env, stdin=text)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def fails(env: dict[str, str], args: list[str], text: str | None = None) -> str:
    """The one line of stderr of a command that must exit 2 and print nothing."""
    result = run(args, env, stdin=text)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    return result.stderr.strip()


def table(result: subprocess.CompletedProcess[str]) -> dict[tuple[str, str, str], int]:
    """simulate's rows as (rule, destination, role) -> events."""
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    return {(row[0], row[1], row[2]): int(row[3]) for row in rows if len(row) == 7 and row[2] in ("primary", "mirror")}


def test_explain_takes_each_events_source_and_country(rules_env: dict[str, str], rules: Path) -> None:
    text = ndjson(
        {"type": "page", "userId": "u-1", "_splitter": {"source": "web", "country": "de"}},
        {"type": "page", "userId": "u-2", "_splitter": {"source": "web", "country": "US"}},
        {"type": "screen", "anonymousId": "a-3", "_splitter": {"source": "ios"}},
        {"type": "track", "event": "Paid", "userId": "u-4", "_splitter": {"source": "backend", "region": "eu-west-1"}},
        {"type": "track", "event": "Paid", "userId": "u-5", "_splitter": {"source": "web"}, "context": {"location": {"country": "FR"}}},
        {"type": "track", "event": "Paid", "userId": "u-6"},
    )
    lines = explain(rules_env, rules, text)
    assert [(line["rule"], line["primary"], line["mirror"]) for line in lines] == [
        ("eu-web", ["rudderstack"], []),
        ("everyone-else", ["segment"], []),  # web, but not from DE or FR
        ("ios-apps", ["segment"], ["rudderstack"]),
        ("eu-replicas", ["rudderstack"], []),
        ("eu-web", ["rudderstack"], []),  # no country given: the event's own context.location.country, as the proxy does
        ("everyone-else", ["segment"], []),  # nothing given: no source, no country
    ]
    assert all(list(line) == DECISION_KEYS for line in lines)  # the annotations add nothing to the output


def test_the_rules_never_see_the_annotation_or_a_write_key(rules_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "transformed.yaml"
    path.write_text(TRANSFORMED)
    event = {"type": "page", "userId": "u-1", "writeKey": RULES_ENV["SEGMENT_WRITE_KEY_WEB"], "_splitter": {"country": "DE"}}
    [line] = explain(rules_env, path, ndjson(event))
    assert line["rule"] == "eu-web"  # the source from the event's writeKey, the country from _splitter
    assert line["transformed"] == {"rudderstack": {"type": "page", "userId": "u-1", "context": {"splitter": {"transformed": True}}}}


def test_per_event_values_win_over_the_command_line(rules_env: dict[str, str], rules: Path) -> None:
    web_key = RULES_ENV["SEGMENT_WRITE_KEY_WEB"]
    text = ndjson(
        {"type": "page", "userId": "u-1"},  # takes the flags: ios
        {"type": "page", "userId": "u-2", "_splitter": {"source": "web"}},  # web, and the --header's DE
        {"type": "page", "userId": "u-3", "_splitter": {"source": "web", "country": "US"}},  # its own country over the header
        {"type": "page", "userId": "u-4", "_splitter": {"source": "backend", "region": "eu-west-1"}},  # its own region
        {"type": "page", "userId": "u-5", "_splitter": {"source": None, "country": ""}},  # null and empty: not given
    )
    flags = ["--source", "ios", "--header", "CF-IPCountry: DE", "--region", "us-east-1"]
    assert [line["rule"] for line in explain(rules_env, rules, text, *flags)] == ["ios-apps", "eu-web", "everyone-else", "eu-replicas", "ios-apps"]
    flags = ["--write-key", RULES_ENV["SEGMENT_WRITE_KEY_IOS"], "--header", "CF-IPCountry: FR"]
    assert [line["rule"] for line in explain(rules_env, rules, text, *flags)] == ["ios-apps", "eu-web", "everyone-else", "eu-replicas", "ios-apps"]
    # A per-event writeKey still selects the source; a per-event source name wins over it, and --source over it too.
    keyed = ndjson({"type": "page", "userId": "u-6", "writeKey": web_key}, {"type": "page", "userId": "u-7", "writeKey": web_key, "_splitter": {"source": "ios"}})
    assert [line["rule"] for line in explain(rules_env, rules, keyed, "--header", "CF-IPCountry: DE")] == ["eu-web", "ios-apps"]
    assert [line["rule"] for line in explain(rules_env, rules, keyed, "--source", "backend")] == ["everyone-else", "ios-apps"]


def test_a_batch_body_gives_its_items_a_source_and_each_item_may_say_its_own(rules_env: dict[str, str], rules: Path, tmp_path: Path) -> None:
    body = {
        "_splitter": {"source": "web", "country": "DE"},
        "context": {"library": {"name": "analytics.js"}},
        "batch": [
            {"type": "page", "userId": "u-1"},
            {"type": "page", "userId": "u-2", "_splitter": {"country": "US"}},
            {"type": "page", "userId": "u-3", "_splitter": {"source": "ios"}},
        ],
    }
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(body, indent=2))  # one pretty-printed body, the way an export tool writes it
    result = run(["explain", str(rules), str(path)], rules_env)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["rule"] for line in result.stdout.splitlines()] == ["eu-web", "everyone-else", "ios-apps"]
    # NDJSON of batch bodies: the item's position names it in an error.
    bad = {"batch": [{"type": "page", "userId": "u-1"}, {"type": "page", "userId": "u-2", "_splitter": {"source": "android"}}]}
    lines = tmp_path / "batches.ndjson"
    lines.write_text(ndjson(body, bad))
    assert fails(rules_env, ["explain", str(rules), str(lines)]) == f"splitter: {lines}:2[1]: source 'android': no such source in {rules} {KNOWN}"


def test_bad_annotations_are_errors_that_name_the_line(rules_env: dict[str, str], rules: Path, tmp_path: Path) -> None:
    good = {"type": "page", "userId": "u-1", "_splitter": {"source": "web"}}
    sample = tmp_path / "sample.ndjson"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"_splitter": {"source": "android"}}, f"source 'android': no such source in {rules} {KNOWN}"),
        ({"_splitter": {"country": "Germany"}}, "_splitter.country: 'Germany' is not a two-letter country code (ISO 3166 alpha-2, such as DE)"),
        ({"_splitter": {"country": 49}}, "_splitter.country: expected a string, got int 49"),
        ({"_splitter": {"contry": "DE"}}, "_splitter.contry: unknown key (known: source, country, region)"),
        ({"_splitter": "web"}, '_splitter must be an object such as {"source": "ios", "country": "DE"}, got str'),
        ({"writeKey": "live-secret-write-key"}, f"writeKey live****: unknown write key (no source in {rules} has it; sources: web, ios, backend)"),
    ]
    for extra, message in cases:
        sample.write_text(ndjson(good, good, {"type": "page", "userId": "u-3", **extra}))
        for command in ("explain", "simulate"):
            assert fails(rules_env, [command, str(rules), str(sample)]) == f"splitter: {sample}:3: {message}", (command, extra)


def test_write_keys_are_never_printed(rules_env: dict[str, str], rules: Path) -> None:
    key = RULES_ENV["SEGMENT_WRITE_KEY_BACKEND"]
    # A write key where a source name belongs is recognised, and masked.
    stderr = fails(rules_env, ["explain", str(rules)], ndjson({"type": "page", "userId": "u", "_splitter": {"source": key}}))
    assert stderr == "splitter: <stdin>:1: source seg-****: that is a write key of source 'backend', not a source name"
    stderr = fails(rules_env, ["explain", str(rules), "--source", key], ndjson({"type": "page", "userId": "u"}))
    assert stderr == "splitter: --source seg-****: that is a write key of source 'backend', not a source name"
    stderr = fails(rules_env, ["explain", str(rules), "--write-key", "live-secret-write-key"], ndjson({"type": "page", "userId": "u"}))
    assert stderr == f"splitter: --write-key live****: unknown write key (no source in {rules} has it; sources: web, ios, backend)"


def test_warehouse_columns_named_on_the_command_line(rules_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "transformed.yaml"
    path.write_text(TRANSFORMED)
    rows = ndjson(  # a `pages` table exported as NDJSON: a source column, a country column that is sometimes null
        {"type": "page", "userId": "u-1", "source_name": "web", "context": {"geo": {"country": "DE"}}},
        {"type": "page", "userId": "u-2", "source_name": "web", "context": {"geo": {"country": None}}},
        {"type": "page", "userId": "u-3", "source_name": "ios", "context": {"geo": {"country": "FR"}}},
        {"type": "page", "userId": "u-4", "source_name": "web", "context": {"geo": {"country": "DE"}}, "_splitter": {"country": "US"}},
    )
    flags = ["--source-field", "source_name", "--country-field", "context.geo.country", "--header", "CF-IPCountry: FR"]
    lines = explain(rules_env, path, rows, *flags)
    # u-2's null country falls back to the header; _splitter wins over the column.
    assert [line["rule"] for line in lines] == ["eu-web", "eu-web", "ios-apps", "everyone-else"]
    # The named fields are gone from the event the rules (and the transforms) see.
    assert lines[0]["transformed"]["rudderstack"] == {"type": "page", "userId": "u-1", "context": {"geo": {}, "splitter": {"transformed": True}}}
    sample = tmp_path / "rows.ndjson"
    sample.write_text(rows + ndjson({"type": "page", "userId": "u-5", "source_name": "android"}))
    assert fails(rules_env, ["simulate", str(path), str(sample), *flags]) == f"splitter: {sample}:5: source 'android': no such source in {path} {KNOWN}"
    sample.write_text(ndjson({"type": "page", "userId": "u-5", "source_name": "web", "context": {"geo": {"country": "DEU"}}}))
    assert fails(rules_env, ["explain", str(path), str(sample), *flags]) == (
        f"splitter: {sample}:1: context.geo.country (--country-field): 'DEU' is not a two-letter country code (ISO 3166 alpha-2, such as DE)"
    )
    usage = run(["explain", str(path), "--source-field", "context..source"], rules_env, stdin=rows)
    assert usage.returncode == 2 and "is not a field name or a dotted path such as context.source_name" in usage.stderr


def test_simulate_tallies_by_each_events_source_and_country(rules_env: dict[str, str], rules: Path, tmp_path: Path) -> None:
    events = []
    for i in range(40):
        where = [{"source": "web", "country": "DE"}, {"source": "web", "country": "US"}, {"source": "ios"}, {}][i % 4]
        events.append({"type": "track", "event": "E", "userId": f"user-{i % 20}", "_splitter": where})
    sample = tmp_path / "sample.ndjson"
    sample.write_text(ndjson(*events))
    assert table(run(["simulate", str(rules), str(sample)], rules_env)) == {
        ("eu-web", "rudderstack", "primary"): 10,
        ("ios-apps", "segment", "primary"): 10,
        ("ios-apps", "rudderstack", "mirror"): 10,
        ("everyone-else", "segment", "primary"): 20,
    }
    # The flags fill in what an event leaves out, and only that.
    assert table(run(["simulate", str(rules), str(sample), "--source", "backend", "--region", "eu-west-1"], rules_env)) == {
        ("eu-web", "rudderstack", "primary"): 10,
        ("ios-apps", "segment", "primary"): 10,
        ("ios-apps", "rudderstack", "mirror"): 10,
        ("eu-replicas", "rudderstack", "primary"): 20,
    }
    # A batch body per line, its _splitter for all of its items.
    batches = tmp_path / "batches.ndjson"
    batches.write_text(ndjson(
        {"_splitter": {"source": "web", "country": "FR"}, "batch": [{"type": "page", "userId": f"w-{i}"} for i in range(3)]},
        {"_splitter": {"source": "ios"}, "batch": [{"type": "page", "userId": f"i-{i}"} for i in range(2)]},
    ))
    assert table(run(["simulate", str(rules), str(batches)], rules_env)) == {
        ("eu-web", "rudderstack", "primary"): 3,
        ("ios-apps", "segment", "primary"): 2,
        ("ios-apps", "rudderstack", "mirror"): 2,
    }


def test_simulate_against_replays_the_same_contexts_through_both_files(rules_env: dict[str, str], rules: Path, tmp_path: Path) -> None:
    # OLD sends ios to RudderStack and everything else to Segment; NEW adds the EU web cohort and a new source.
    old = tmp_path / "old.yaml"
    eu_web = "  - name: eu-web\n    when: {source: web, country: [DE, FR]}\n    route: rudderstack\n"
    assert eu_web in RULES
    old.write_text(RULES.replace("to: [segment], mirror: [rudderstack]", "to: [rudderstack]").replace(eu_web, ""))
    new = tmp_path / "new.yaml"
    new.write_text(
        RULES.replace("to: [segment], mirror: [rudderstack]", "to: [rudderstack]").replace(
            "cohort:", "  - name: android\n    write_keys: [\"${SEGMENT_WRITE_KEY_ANDROID}\"]\n"
            "    credentials: {segment: \"${SEGMENT_WRITE_KEY_ANDROID}\", rudderstack: \"${RUDDERSTACK_WRITE_KEY_ANDROID}\"}\ncohort:")
    )
    assert run(["check", str(old)], rules_env).returncode == 0 and run(["check", str(new)], rules_env).returncode == 0
    events = [{"type": "track", "event": "E", "userId": f"ios-{i}", "_splitter": {"source": "ios"}} for i in range(7)]
    events += [{"type": "track", "event": "E", "userId": f"web-de-{i}", "_splitter": {"source": "web", "country": "DE"}} for i in range(5)]
    events += [{"type": "track", "event": "E", "userId": f"web-us-{i}", "_splitter": {"source": "web", "country": "US"}} for i in range(4)]
    events += [{"type": "track", "event": "E", "userId": f"android-{i}", "_splitter": {"source": "android"}} for i in range(2)]  # only NEW has it
    sample = tmp_path / "sample.ndjson"
    sample.write_text(ndjson(*events))
    result = run(["simulate", str(new), str(sample), "--against", str(old)], rules_env)
    assert result.returncode == 0, result.stderr
    # Only the EU web users move: the ios users stay on RudderStack because OLD sees their source too.
    assert "  segment -> rudderstack: 5 keys" in result.stdout, result.stdout
    assert "rudderstack -> segment" not in result.stdout
    assert ": 5 of 18 cohort keys" in result.stdout
