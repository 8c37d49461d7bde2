"""Every way `compile_rules` refuses a rules file, each with its full `FILE:LINE: path: message`."""

from __future__ import annotations

import textwrap

import pytest

from proxy.engine import Problem, RulesError, compile_rules

HEAD = """\
version: 1
destinations:
  segment: {kind: segment, url: "http://seg.test"}
  rudderstack: {kind: rudderstack, url: "http://rs.test"}
sources:
  - name: web
    write_keys: [web-key-000001]
"""  # lines 1-7; a `rules:` block appended to it starts on line 8
DEFAULT_RULE = "rules:\n  - name: default\n    route: segment\n"
DESTS_HEAD = "".join(HEAD.splitlines(keepends=True)[:4])  # lines 1-4, for files with their own sources
UNKNOWN_DEST = "unknown destination {!r} (destinations: segment, rudderstack)"


def with_rules(block: str) -> str:
    return HEAD + textwrap.dedent(block).lstrip("\n")


def errors(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(RulesError) as info:
        compile_rules(text, filename="rules.yaml", env=env or {})
    assert str(info.value) == "\n".join(info.value.lines)
    return info.value.lines


def test_the_base_file_compiles() -> None:
    rules = compile_rules(HEAD + DEFAULT_RULE, env={})
    assert [r.name for r in rules.rules] == ["default"]


def test_problem_text_and_rules_error_shape() -> None:
    assert str(Problem("r.yaml", 3, "rules[0]", "oops")) == "r.yaml:3: rules[0]: oops"
    assert str(Problem("r.yaml", 3, "", "oops")) == "r.yaml:3: oops"
    error = RulesError([Problem("f", 9, "b", "x"), Problem("f", 2, "z", "y"), Problem("f", 2, "a", "w")])
    assert error.lines == ["f:2: a: w", "f:2: z: y", "f:9: b: x"]
    assert [p.line for p in error.problems] == [2, 2, 9]


def test_filename_is_used_in_every_line() -> None:
    with pytest.raises(RulesError) as info:
        compile_rules("", filename="conf/prod.yaml", env={})
    assert info.value.lines == ["conf/prod.yaml:1: the file is empty"]


# --- the file as a whole --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("version: 1\ndestinations:\n  segment: {kind: segment\nsources: []\n",
         "rules.yaml:4: invalid YAML: while parsing a flow mapping expected ',' or '}', but got ':'"),
        ("version: 1\ndestinations:\n  a: b\n   c: d\n", "rules.yaml:4: invalid YAML: mapping values are not allowed here"),
        ("version: 1\n\tfoo: 1\n",
         "rules.yaml:2: invalid YAML: while scanning for the next token found character '\\t' that cannot start any token"),
    ],
)
def test_invalid_yaml(text: str, expected: str) -> None:
    assert errors(text) == [expected]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(text: str) -> None:
    assert errors(text) == ["rules.yaml:1: the file is empty"]


@pytest.mark.parametrize("text, kind", [("- version: 1\n", "a list"), ("just text\n", "a value")])
def test_top_level_must_be_a_mapping(text: str, kind: str) -> None:
    assert errors(text) == [f"rules.yaml:1: must be a mapping, not {kind}"]


def test_missing_required_top_level_keys_are_each_reported_at_the_mapping() -> None:
    assert errors("# header\nversion: 1\n") == [
        "rules.yaml:2: destinations: is required",
        "rules.yaml:2: rules: is required",
        "rules.yaml:2: sources: is required",
    ]


def test_unknown_top_level_key() -> None:
    assert errors(HEAD + "defaults: {}\n" + DEFAULT_RULE) == [
        "rules.yaml:8: defaults: unknown key 'defaults' (expected one of: version, destinations, sources, cohort, rules, country_headers, dedup, catalog, record)"
    ]


def test_duplicate_top_level_key() -> None:
    assert errors(HEAD + DEFAULT_RULE + "version: 1\n") == ["rules.yaml:11: version: duplicate key"]


def test_version_missing() -> None:
    assert errors(HEAD[len("version: 1\n"):] + DEFAULT_RULE) == ["rules.yaml:1: version: is required"]


@pytest.mark.parametrize("value, shown", [("2", "2"), ("0", "0"), ('"1"', "'1'"), ("one", "'one'")])
def test_version_not_1(value: str, shown: str) -> None:
    text = HEAD.replace("version: 1", f"version: {value}") + DEFAULT_RULE
    assert errors(text) == [f"rules.yaml:1: version: unsupported schema version {shown}; this splitter reads version 1"]


def test_version_true_is_not_version_1() -> None:
    text = HEAD.replace("version: 1", "version: true") + DEFAULT_RULE
    assert errors(text) == ["rules.yaml:1: version: unsupported schema version True; this splitter reads version 1"]


# --- destinations ---------------------------------------------------------------------------------


def dest_errors(line3: str) -> list[str]:
    """The base file with the `segment` destination (line 3) replaced."""
    lines = HEAD.splitlines(keepends=True)
    lines[2] = f"  segment: {line3}\n"
    return errors("".join(lines) + DEFAULT_RULE)


@pytest.mark.parametrize(
    "spec, message",
    [
        ('{kind: segment, url: "http://s.test", retries: 3}',
         "destinations.segment.retries: unknown key 'retries' (expected one of: kind, url, timeout, delivery, transforms)"),
        ('{kind: mixpanel, url: "http://s.test"}', "destinations.segment.kind: must be segment or rudderstack, not 'mixpanel'"),
        ('{url: "http://s.test"}', "destinations.segment.kind: is required (segment or rudderstack)"),
        ("{kind: segment}", "destinations.segment.url: is required"),
        ('{kind: segment, url: "ftp://s.test"}',
         "destinations.segment.url: must be an http:// or https:// URL with a host, not 'ftp://s.test'"),
        ('{kind: segment, url: "s.test/path"}',
         "destinations.segment.url: must be an http:// or https:// URL with a host, not 's.test/path'"),
        ('{kind: segment, url: "http://"}', "destinations.segment.url: must be an http:// or https:// URL with a host, not 'http://'"),
        ('{kind: segment, url: "https://s.test/v1"}',
         "destinations.segment.url: must not end in /v1 (splitter appends /v1/batch): 'https://s.test/v1'"),
        ('{kind: segment, url: "https://s.test/x/v1/"}',
         "destinations.segment.url: must not end in /v1 (splitter appends /v1/batch): 'https://s.test/x/v1/'"),
        ('{kind: segment, url: "ftp://user:pw@s.test/x"}',
         "destinations.segment.url: must be an http:// or https:// URL with a host, not 'ftp://****@s.test/x'"),
        ('{kind: segment, url: "https://user:pw@s.test/v1"}',
         "destinations.segment.url: must not end in /v1 (splitter appends /v1/batch): 'https://****@s.test/v1'"),
        ('{kind: segment, url: "https://user:pw@s.test"}',
         "destinations.segment.url: must not carry a user or password ('https://****@s.test'): the credential comes from sources[].credentials"),
        ('{kind: segment, url: "http://s.test", timeout: 0}', "destinations.segment.timeout: must be a number greater than 0, not 0"),
        ('{kind: segment, url: "http://s.test", timeout: -2.5}',
         "destinations.segment.timeout: must be a number greater than 0, not -2.5"),
        ('{kind: segment, url: "http://s.test", timeout: soon}', "destinations.segment.timeout: must be a number, not 'soon'"),
        ('{kind: segment, url: "http://s.test", delivery: [1]}', "destinations.segment.delivery: must be a mapping, not a list"),
        ("[segment]", "destinations.segment: must be a mapping, not a list"),
    ],
)
def test_destination_problems(spec: str, message: str) -> None:
    assert dest_errors(spec) == [f"rules.yaml:3: {message}"]


def test_destination_url_trailing_slash_is_dropped_and_timeout_read() -> None:
    lines = HEAD.splitlines(keepends=True)
    lines[2] = '  segment: {kind: segment, url: "https://s.test/base/", timeout: 2.5, delivery: {max_in_flight: 3, retry_base: 0.25}}\n'
    dest = compile_rules("".join(lines) + DEFAULT_RULE, env={}).destinations["segment"]
    assert (dest.url, dest.timeout, dict(dest.options)) == ("https://s.test/base", 2.5, {"max_in_flight": 3, "retry_base": 0.25})


@pytest.mark.parametrize(
    "delivery, message",
    [
        ("{retries: 3}", "destinations.segment.delivery.retries: unknown key 'retries' (expected one of: batch_max_events, batch_max_bytes, "
                         "flush_interval, max_in_flight, retry_base, retry_max, breaker_failures, breaker_cooldown, redirect_attempts, spool_quota_mb)"),
        ("{batch_max_events: 2.5}", "destinations.segment.delivery.batch_max_events: must be a whole number, not 2.5"),
        ("{batch_max_events: 3000}", "destinations.segment.delivery.batch_max_events: must be between 1 and 2500, not 3000"),
        ("{flush_interval: -1}", "destinations.segment.delivery.flush_interval: must be between 0 and 5, not -1"),
        ("{spool_quota_mb: lots}", "destinations.segment.delivery.spool_quota_mb: must be a number, not 'lots'"),
    ],
)
def test_delivery_option_problems(delivery: str, message: str) -> None:
    assert dest_errors(f'{{kind: segment, url: "http://s.test", delivery: {delivery}}}') == [f"rules.yaml:3: {message}"]


def test_delivery_options_in_the_schema_are_the_delivery_layers() -> None:
    from dataclasses import fields

    from proxy.delivery.options import DeliveryOptions
    from proxy.engine.schema import DELIVERY_OPTIONS

    assert set(DELIVERY_OPTIONS) == {f.name for f in fields(DeliveryOptions)}


def test_empty_destinations() -> None:
    text = "version: 1\ndestinations: {}\nsources:\n  - name: web\n    write_keys: [k]\nrules:\n  - name: d\n    route: segment\n"
    assert errors(text) == [
        "rules.yaml:2: destinations: must name at least one destination",
        "rules.yaml:8: rules[0].route: unknown destination 'segment' (destinations: none)",
    ]


def test_destinations_not_a_mapping() -> None:
    text = "version: 1\ndestinations: [segment]\nsources: [{name: web, write_keys: [k]}]\nrules: [{name: d, route: segment}]\n"
    assert errors(text) == [
        "rules.yaml:2: destinations: must be a mapping, not a list",
        "rules.yaml:4: rules[0].route: unknown destination 'segment' (destinations: none)",
    ]


def test_invalid_destination_referenced_from_rules_is_not_also_unknown() -> None:
    lines = HEAD.splitlines(keepends=True)
    lines[3] = '  rudderstack: {kind: rudder, url: "http://rs.test"}\n'
    text = "".join(lines) + "rules:\n  - name: d\n    route: {to: [rudderstack], mirror: [segment]}\n"
    assert errors(text) == ["rules.yaml:4: destinations.rudderstack.kind: must be segment or rudderstack, not 'rudder'"]


# --- sources --------------------------------------------------------------------------------------


def source_errors(sources: str) -> list[str]:
    """DESTS_HEAD (lines 1-4) + `sources:` on line 5 + the given items from line 6."""
    return errors(DESTS_HEAD + "sources:\n" + textwrap.dedent(sources).lstrip("\n") + DEFAULT_RULE)


def test_sources_not_a_list() -> None:
    text = DESTS_HEAD + "sources: {web: [k]}\n" + DEFAULT_RULE
    assert errors(text) == ["rules.yaml:5: sources: must be a list of sources"]


@pytest.mark.parametrize(
    "items, expected",
    [
        ("  - write_keys: [k1]\n", ["rules.yaml:6: sources[0].name: is required"]),
        ("  - name: web\n", ["rules.yaml:6: sources[0].write_keys: is required (the write keys clients of this source present)"]),
        ("  - name: web\n    write_keys: [k1, '']\n", ["rules.yaml:7: sources[0].write_keys[1]: must not be empty"]),
        ("  - name: web\n    write_keys: []\n", ["rules.yaml:7: sources[0].write_keys: must not be an empty list"]),
        ("  - name: web\n    write_keys: [k1]\n    token: x\n",
         ["rules.yaml:8: sources[0].token: unknown key 'token' (expected one of: name, write_keys, credentials, webhook, tracking_plan)"]),
        ("  - name: web\n    write_keys: [k1]\n  - name: web\n    write_keys: [k2]\n",
         ["rules.yaml:8: sources[1].name: duplicate source name 'web'"]),
        ("  - name: web\n    write_keys: [web-key-000001, k2, web-key-000001]\n",
         ["rules.yaml:7: sources[0].write_keys: write key web-**** is twice in this source"]),
        ("  - name: web\n    write_keys: [web-key-000001]\n  - name: ios\n    write_keys: [web-key-000001]\n",
         ["rules.yaml:9: sources[1].write_keys: write key web-**** is already in source 'web'"]),
        ("  - name: web\n    write_keys: [short]\n  - name: ios\n    write_keys:\n      - ios\n      - short\n",
         ["rules.yaml:11: sources[1].write_keys: write key **** is already in source 'web'"]),
        ("  - name: web\n    write_keys: [k1]\n    credentials: {segment: s1, amplitude: a1}\n",
         ["rules.yaml:8: sources[0].credentials.amplitude: " + UNKNOWN_DEST.format("amplitude")]),
        ("  - name: web\n    write_keys: [k1]\n    credentials: {segment: ''}\n",
         ["rules.yaml:8: sources[0].credentials.segment: must not be empty"]),
        ("  - web\n", ["rules.yaml:6: sources[0]: must be a mapping, not a value"]),
    ],
)
def test_source_problems(items: str, expected: list[str]) -> None:
    assert source_errors(items) == expected


def test_a_write_key_in_two_sources_is_never_printed_in_full() -> None:
    lines = source_errors("  - name: web\n    write_keys: [sk_live_SECRET123]\n  - name: ios\n    write_keys: [sk_live_SECRET123]\n")
    assert lines == ["rules.yaml:9: sources[1].write_keys: write key sk_l**** is already in source 'web'"]
    assert "SECRET" not in "".join(lines)


def test_repeated_key_in_an_unnamed_source_is_twice_in_this_source() -> None:
    assert source_errors("  - write_keys: [k1, k1]\n") == [
        "rules.yaml:6: sources[0].name: is required",
        "rules.yaml:6: sources[0].write_keys: write key **** is twice in this source",
    ]


def test_source_maps_keys_and_credentials() -> None:
    text = DESTS_HEAD + "sources:\n  - name: web\n    write_keys: [k1, k2]\n    credentials: {rudderstack: rs-1}\n" + DEFAULT_RULE
    rules = compile_rules(text, env={})
    web = rules.sources["web"]
    assert web.write_keys == ("k1", "k2")
    assert web.credential_for("rudderstack", "k1") == "rs-1"
    assert web.credential_for("segment", "k2") == "k2"


# --- cohort ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cohort, message",
    [
        ("{key: userId, seed: 3}", "cohort.seed: unknown key 'seed' (expected one of: key, salt, reshuffle)"),
        ('{key: "a..b"}', "cohort.key: 'a..b' is not a field path (use names separated by dots)"),
        ("{key: [userId, .traits]}", "cohort.key: '.traits' is not a field path (use names separated by dots)"),
        ("{reshuffle: maybe}", "cohort.reshuffle: must be true or false, not 'maybe'"),
        ("[userId]", "cohort: must be a mapping, not a list"),
    ],
)
def test_cohort_problems(cohort: str, message: str) -> None:
    assert errors(HEAD + f"cohort: {cohort}\n" + DEFAULT_RULE) == [f"rules.yaml:8: {message}"]


@pytest.mark.parametrize(
    "cohort, message",
    [
        ("{key: []}", "cohort.key: must not be an empty list"),
        ("{key: [userId, '']}", "cohort.key[1]: must not be empty"),
        ("{key: {a: 1}}", "cohort.key: must be a single value, not a mapping"),
    ],
)
def test_a_bad_cohort_key_is_reported_once(cohort: str, message: str) -> None:
    assert errors(HEAD + f"cohort: {cohort}\n" + DEFAULT_RULE) == [f"rules.yaml:8: {message}"]


def test_when_with_only_unknown_conditions_also_says_it_holds_none() -> None:
    assert errors(HEAD + "rules:\n  - name: a\n    when: {browser: chrome}\n    route: segment\n  - name: d\n    route: segment\n") == [
        "rules.yaml:10: rules[0].when: must hold at least one condition (leave `when` out for the default rule)",
        "rules.yaml:10: rules[0].when.browser: unknown key 'browser' "
        "(expected one of: source, type, event, region, country, app_version, os, library)",
    ]


# --- rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["[]", "{}", "default"])
def test_rules_must_be_a_non_empty_list(value: str) -> None:
    assert errors(HEAD + f"rules: {value}\n") == ["rules.yaml:8: rules: must be a non-empty list of rules"]


@pytest.mark.parametrize(
    "block, expected",
    [
        ("rules:\n  - route: segment\n", ["rules.yaml:9: rules[0].name: is required"]),
        ("rules:\n  - name: d\n", ["rules.yaml:9: rules[0].route: is required"]),
        ("rules:\n  - name: d\n    route: segment\n    weight: 2\n",
         ["rules.yaml:11: rules[0].weight: unknown key 'weight' (expected one of: name, when, route, cohort, reshuffle, transforms)"]),
        ("rules:\n  - name: a\n    when: {type: track}\n    route: segment\n  - name: a\n    route: segment\n",
         ["rules.yaml:12: rules[1].name: duplicate rule name 'a'"]),
        ("rules:\n  - name: a\n    route: segment\n  - name: b\n    route: rudderstack\n",
         ["rules.yaml:9: rules[0]: only the last rule may omit `when`: this one would match every event and hide the rules after it"]),
        ("rules:\n  - name: a\n    when: {type: track}\n    route: segment\n",
         ["rules.yaml:10: rules[0].when: the last rule is the default and must have no `when`, so that every event gets a decision"]),
        ("rules:\n  - name: a\n    when: {}\n    route: segment\n  - name: d\n    route: segment\n",
         ["rules.yaml:10: rules[0].when: must hold at least one condition (leave `when` out for the default rule)"]),
        ("rules:\n  - name: a\n    when:\n      type: track\n      browser: chrome\n    route: segment\n  - name: d\n    route: segment\n",
         ["rules.yaml:12: rules[0].when.browser: unknown key 'browser' "
          "(expected one of: source, type, event, region, country, app_version, os, library)"]),
        ("rules:\n  - name: d\n    route: segment\n    reshuffle: yes please\n", ["rules.yaml:11: rules[0].reshuffle: must be true or false, not 'yes please'"]),
        ("rules:\n  - name: d\n    route: segment\n    cohort: {salt: x, order: 1}\n",
         ["rules.yaml:11: rules[0].cohort.order: unknown key 'order' (expected one of: key, salt, reshuffle)"]),
        ("rules:\n  - segment\n", ["rules.yaml:9: rules[0]: must be a mapping, not a value"]),
    ],
)
def test_rule_problems(block: str, expected: list[str]) -> None:
    assert errors(HEAD + block) == expected


def when_errors(when: str) -> list[str]:
    """One conditional rule (its `when` on line 10) followed by the default rule."""
    return errors(HEAD + f"rules:\n  - name: r\n    when: {when}\n    route: rudderstack\n  - name: d\n    route: segment\n")


@pytest.mark.parametrize(
    "when, message",
    [
        ("{source: android}", "rules[0].when.source: unknown source 'android' (sources: web)"),
        ("{source: [web, ios]}", "rules[0].when.source: unknown source 'ios' (sources: web)"),
        ("{type: Track}", "rules[0].when.type: unknown event type 'Track' (expected one of: track, identify, page, screen, group, alias)"),
        ("{type: [track, purchase]}",
         "rules[0].when.type: unknown event type 'purchase' (expected one of: track, identify, page, screen, group, alias)"),
        ("{country: DEU}", "rules[0].when.country: 'DEU' is not a two-letter ISO 3166 country code"),
        ("{country: [de, '1A']}", "rules[0].when.country: '1A' is not a two-letter ISO 3166 country code"),
        ('{app_version: ">=banana"}', "rules[0].when.app_version: 'banana' in version range '>=banana' is not a version"),
        ('{app_version: ["<3", "four"]}', "rules[0].when.app_version: 'four' in version range 'four' is not a version"),
        ('{app_version: ""}', "rules[0].when.app_version: must not be empty"),
        ('{app_version: ">=3.0,"}', "rules[0].when.app_version: empty comparison in version range '>=3.0,'"),
        ('{event: ""}', "rules[0].when.event: must not be empty"),
        ('{event: [Signed Up, ""]}', "rules[0].when.event[1]: must not be empty"),
        ('{event: " Signed Up"}', "rules[0].when.event: event pattern ' Signed Up' has leading or trailing spaces"),
        ('{event: "Order **"}', "rules[0].when.event: event pattern 'Order **': '**' is not a glob here, use a single '*'"),
        ("{os: []}", "rules[0].when.os: must not be an empty list"),
        ("{region: {eu: 1}}", "rules[0].when.region: must be a single value, not a mapping"),
        ("{library: null}", "rules[0].when.library: must be a string, not null"),
    ],
)
def test_condition_problems(when: str, message: str) -> None:
    assert when_errors(when) == [f"rules.yaml:10: {message}"]


def test_range_with_a_space_instead_of_a_comma_is_an_error() -> None:
    assert when_errors('{app_version: ">=3.0 <4.2.0"}') == [
        "rules.yaml:10: rules[0].when.app_version: '3.0 <4.2.0' in version range '>=3.0 <4.2.0' is not a version"
    ]


# --- routes ---------------------------------------------------------------------------------------


def route_errors(route: str) -> list[str]:
    """A single default rule whose route starts on line 10 (`route: ...`)."""
    return errors(with_rules("rules:\n  - name: d\n    route: " + route + "\n"))


@pytest.mark.parametrize(
    "route, expected",
    [
        ("amplitude", ["rules.yaml:10: rules[0].route: " + UNKNOWN_DEST.format("amplitude")]),
        ("[segment, amplitude]", ["rules.yaml:10: rules[0].route: " + UNKNOWN_DEST.format("amplitude")]),
        ("{to: [amplitude]}", ["rules.yaml:10: rules[0].route.to: " + UNKNOWN_DEST.format("amplitude")]),
        ("{to: segment, mirror: [amplitude]}", ["rules.yaml:10: rules[0].route.mirror: " + UNKNOWN_DEST.format("amplitude")]),
        ("{split: {amplitude: 50, segment: 50}}", ["rules.yaml:10: rules[0].route.split.amplitude: " + UNKNOWN_DEST.format("amplitude")]),
        ("[segment, segment]", ["rules.yaml:10: rules[0].route: 'segment' is listed twice"]),
        ("{to: [rudderstack, rudderstack]}", ["rules.yaml:10: rules[0].route.to: 'rudderstack' is listed twice"]),
        ("{mirror: [segment]}", ["rules.yaml:10: rules[0].route: needs `split` and/or `to`: which destinations are primary"]),
        ("{}", ["rules.yaml:10: rules[0].route: needs `split` and/or `to`: which destinations are primary"]),
        ("{to: [segment, rudderstack], mirror: [rudderstack]}",
         ["rules.yaml:10: rules[0].route.mirror: 'rudderstack' is always primary here (it is in `to`), so mirroring it does nothing"]),
        ("{to: segment, via: x}", ["rules.yaml:10: rules[0].route.via: unknown key 'via' (expected one of: split, to, mirror, ramp)"]),
        ("[]", ["rules.yaml:10: rules[0].route: must not be an empty list"]),
        ("{to: []}", ["rules.yaml:10: rules[0].route.to: must not be an empty list"]),
        ("{split: {}}", ["rules.yaml:10: rules[0].route.split: must give at least one destination and its percent"]),
        ("{split: [segment]}", ["rules.yaml:10: rules[0].route.split: must be a mapping, not a list"]),
        ("{split: {segment: 50, rudderstack: 40}}", ["rules.yaml:10: rules[0].route.split: percents sum to 90, must be 100"]),
        ("{split: {segment: 33.333, rudderstack: 66.667}}", [
            "rules.yaml:10: rules[0].route.split.rudderstack: percent 66.667 has more than two decimals (the finest step is 0.01)",
            "rules.yaml:10: rules[0].route.split.segment: percent 33.333 has more than two decimals (the finest step is 0.01)",
        ]),
        ("{split: {segment: -5, rudderstack: 105}}", [
            "rules.yaml:10: rules[0].route.split.rudderstack: percent 105 is over 100",
            "rules.yaml:10: rules[0].route.split.segment: must be a number at least 0, not -5",
        ]),
        ("{split: {segment: 150, rudderstack: 0}}", [
            "rules.yaml:10: rules[0].route.split: percents sum to 150, must be 100",
            "rules.yaml:10: rules[0].route.split.segment: percent 150 is over 100",
        ]),
        ("{split: {segment: half, rudderstack: 50}}", ["rules.yaml:10: rules[0].route.split.segment: must be a number, not 'half'"]),
        ("{split: {segment: true, rudderstack: 50}}", ["rules.yaml:10: rules[0].route.split.segment: must be a number, not true"]),
    ],
)
def test_route_problems(route: str, expected: list[str]) -> None:
    assert route_errors(route) == expected


def test_split_sum_is_reported_at_the_split_key_in_block_style() -> None:
    text = with_rules("""
        rules:
          - name: d
            route:
              split:
                segment: 50.5
                rudderstack: 39.5
    """)
    assert errors(text) == ["rules.yaml:11: rules[0].route.split: percents sum to 90, must be 100"]


def test_split_sum_line_in_flow_style_on_a_later_rule() -> None:
    text = with_rules("""
        rules:
          - name: first
            when: {type: track}
            route: segment
          - name: d
            route:
              to: [segment]
              split: {rudderstack: 45, segment: 45}
    """)
    assert errors(text) == ["rules.yaml:15: rules[1].route.split: percents sum to 90, must be 100"]


def test_percents_with_two_decimals_summing_to_100_compile_to_bucket_bounds() -> None:
    rules = compile_rules(with_rules("rules:\n  - name: d\n    route: {split: {rudderstack: 33.33, segment: 66.67}}\n"), env={})
    assert rules.rules[0].route.split.arms == (("rudderstack", 3333), ("segment", 10000))


# --- environment references -----------------------------------------------------------------------


def test_missing_variable_is_named_and_reported_once() -> None:
    text = HEAD.replace('"http://rs.test"', '"${RS_URL}"') + DEFAULT_RULE
    assert errors(text) == ["rules.yaml:4: environment variable RS_URL is not set and has no default (write ${RS_URL:-default} to give one)"]


@pytest.mark.parametrize(
    "block, name, line",
    [
        ("rules:\n  - name: d\n    route:\n      split:\n        segment: ${PCT}\n        rudderstack: 50\n", "PCT", 12),
        ("rules:\n  - name: d\n    route: ${DEST}\n", "DEST", 10),
        ("rules:\n  - name: ${NAME}\n    route: segment\n", "NAME", 9),
        ("rules:\n  - name: d\n    route: segment\n    reshuffle: ${FLAG}\n", "FLAG", 11),
        ("cohort:\n  salt: s\n  key: ${KEY}\n" + DEFAULT_RULE, "KEY", 10),
    ],
)
def test_missing_variable_causes_no_second_problem_for_the_same_value(block: str, name: str, line: int) -> None:
    assert errors(HEAD + block) == [
        f"rules.yaml:{line}: environment variable {name} is not set and has no default (write ${{{name}:-default}} to give one)"
    ]


def test_write_key_from_a_missing_variable() -> None:
    text = DESTS_HEAD + "sources:\n  - name: web\n    write_keys:\n      - ${WEB_KEY}\n" + DEFAULT_RULE
    assert errors(text) == ["rules.yaml:8: environment variable WEB_KEY is not set and has no default (write ${WEB_KEY:-default} to give one)"]


@pytest.mark.parametrize("env", [{}, {"RS_URL": ""}])
def test_default_is_used_when_unset_or_empty(env: dict[str, str]) -> None:
    text = HEAD.replace('"http://rs.test"', '"${RS_URL:-https://rs.default.test}"') + DEFAULT_RULE
    assert compile_rules(text, env=env).destinations["rudderstack"].url == "https://rs.default.test"


def test_a_set_variable_wins_over_the_default_and_keeps_surrounding_text() -> None:
    text = HEAD.replace('"http://rs.test"', '"https://${HOST:-x.test}:${PORT}/p"') + DEFAULT_RULE
    url = compile_rules(text, env={"HOST": "rs.example", "PORT": "8443"}).destinations["rudderstack"].url
    assert url == "https://rs.example:8443/p"


def test_plain_reference_is_retyped_like_a_literal() -> None:
    text = HEAD + "rules:\n  - name: d\n    reshuffle: ${FLAG}\n    route:\n      split:\n        rudderstack: ${PCT}\n        segment: 70\n"
    rules = compile_rules(text, env={"FLAG": "true", "PCT": "30"})
    assert rules.rules[0].reshuffle is True
    assert rules.rules[0].route.split.arms == (("rudderstack", 3000), ("segment", 10000))


def test_quoted_reference_stays_a_string() -> None:
    # A quoted percent still works (numbers are read from strings too); a quoted boolean does not.
    text = HEAD + 'rules:\n  - name: d\n    reshuffle: "${FLAG}"\n    route: {split: {rudderstack: "${PCT}", segment: 70}}\n'
    assert errors(text, {"FLAG": "true", "PCT": "30"}) == ["rules.yaml:10: rules[0].reshuffle: must be true or false, not 'true'"]
    ok = compile_rules(text.replace('"${FLAG}"', "${FLAG}"), env={"FLAG": "true", "PCT": "30"})
    assert ok.rules[0].route.split.arms == (("rudderstack", 3000), ("segment", 10000))


def test_quoted_version_reference_is_the_string_1() -> None:
    text = HEAD.replace("version: 1", 'version: "${V}"') + DEFAULT_RULE
    assert errors(text, {"V": "1"}) == ["rules.yaml:1: version: unsupported schema version '1'; this splitter reads version 1"]
    assert compile_rules(HEAD.replace("version: 1", "version: ${V}") + DEFAULT_RULE, env={"V": "1"}).version == 1


@pytest.mark.parametrize("ref", ["${1KEY}", "${KEY", "${KEY-x}", "${}"])
def test_malformed_reference(ref: str) -> None:
    text = HEAD.replace('"http://rs.test"', f'"{ref}"') + DEFAULT_RULE
    assert errors(text, {"KEY": "v"}) == [
        f"rules.yaml:4: malformed environment reference {ref!r}: use ${{NAME}} or ${{NAME:-default}}"
    ]


# --- many problems at once ------------------------------------------------------------------------


def test_every_problem_is_reported_sorted_by_line() -> None:
    text = textwrap.dedent("""\
        version: 1
        destinations:
          segment: {kind: segment, url: "http://seg.test/v1"}
          rudderstack: {kind: rudderstack, url: "http://rs.test", timeout: 0}
        sources:
          - name: web
            write_keys: [web-key-000001]
          - name: ios
            write_keys: [web-key-000001]
        rules:
          - name: eu
            when: {region: eu, country: EU1}
            route:
              split: {rudderstack: 10, segment: 80}
          - name: eu
            when: {type: track}
            route: amplitude
    """)
    assert errors(text) == [
        "rules.yaml:3: destinations.segment.url: must not end in /v1 (splitter appends /v1/batch): 'http://seg.test/v1'",
        "rules.yaml:4: destinations.rudderstack.timeout: must be a number greater than 0, not 0",
        "rules.yaml:9: sources[1].write_keys: write key web-**** is already in source 'web'",
        "rules.yaml:12: rules[0].when.country: 'EU1' is not a two-letter ISO 3166 country code",
        "rules.yaml:14: rules[0].route.split: percents sum to 90, must be 100",
        "rules.yaml:15: rules[1].name: duplicate rule name 'eu'",
        "rules.yaml:16: rules[1].when: the last rule is the default and must have no `when`, so that every event gets a decision",
        "rules.yaml:17: rules[1].route: " + UNKNOWN_DEST.format("amplitude"),
    ]


def test_recursive_alias_is_a_rules_error_not_a_crash() -> None:
    with pytest.raises(RulesError):
        compile_rules(HEAD + "rules: &r [*r]\n", env={})
