"""`splitter check / explain / simulate`, run as users run them: a real process, real files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from proxy.engine import bucket
from tests.conftest import RULES_DIR, splitter_command

SHIPPED = sorted(RULES_DIR.glob("*.yaml"))
EXAMPLE = """\
version: 1
destinations:
  segment:     {kind: segment,     url: https://api.segment.io}
  rudderstack: {kind: rudderstack, url: "${RUDDERSTACK_DATA_PLANE_URL}"}
sources:
  - name: ios
    write_keys: ["${SEGMENT_WRITE_KEY_IOS}"]
    credentials: {segment: "${SEGMENT_WRITE_KEY_IOS}", rudderstack: "${RUDDERSTACK_WRITE_KEY_IOS}"}
cohort:
  key: [anonymousId, userId]
  salt: "segment-to-rudderstack"
rules:
  - name: legacy-ios
    when: {source: ios, app_version: "<4.2.0"}
    route: segment
  - name: eu-pilot
    when: {country: [DE, FR]}
    route:
      split: {rudderstack: 50, segment: 50}
      mirror: [segment]
  - name: everyone-else
    route:
      split: {rudderstack: 5, segment: 95}
"""


def run(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(splitter_command(*args), input=stdin, capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def example(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(EXAMPLE)
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_rules_file_passes_check(path: Path, rules_env: dict[str, str]) -> None:
    result = run(["check", str(path)], rules_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok: ")
    extra = result.stdout.strip().splitlines()[1:]  # only a ramp adds lines: its schedule
    assert extra == [] or (extra[0].startswith("ramp of rule ") and "   <- now" in result.stdout), result.stdout


def test_shipped_rules_cover_every_strategy() -> None:
    assert {p.name for p in SHIPPED} >= {
        "default.yaml", "cohort-percent.yaml", "region.yaml", "app-version.yaml", "parallel-mirror.yaml", "server-cutover.yaml",
    }


def test_check_reports_every_problem_with_file_and_line(tmp_path: Path, rules_env: dict[str, str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.replace("rudderstack: 5, segment: 95", "rudderstack: 5, segment: 85").replace("name: eu-pilot", "name: legacy-ios"))
    result = run(["check", str(bad)], rules_env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{bad}:16: rules[1].name: duplicate rule name 'legacy-ios'",
        f"{bad}:23: rules[2].route.split: percents sum to 90, must be 100",
    ]


def test_check_names_a_missing_environment_variable(example: Path, rules_env: dict[str, str]) -> None:
    del rules_env["RUDDERSTACK_DATA_PLANE_URL"]
    result = run(["check", str(example)], rules_env)
    assert result.returncode == 2
    assert "environment variable RUDDERSTACK_DATA_PLANE_URL is not set and has no default" in result.stderr
    assert f"{example}:4:" in result.stderr


def test_check_of_a_missing_file(tmp_path: Path, rules_env: dict[str, str]) -> None:
    result = run(["check", str(tmp_path / "nope.yaml")], rules_env)
    assert result.returncode == 2
    assert "cannot read rules" in result.stderr


def test_explain_prints_exactly_the_documented_keys(example: Path, rules_env: dict[str, str]) -> None:
    events = [
        {"type": "track", "event": "Opened", "anonymousId": "dev-1", "context": {"app": {"version": "4.1.9"}}},
        {"type": "page", "userId": 42, "context": {"location": {"country": "de"}}},
        {"type": "identify", "userId": "u-7"},
        {"type": "track", "event": "no key"},
    ]
    ndjson = "\n".join(json.dumps(e) for e in events) + "\n"
    result = run(["explain", str(example), "-", "--write-key", rules_env["SEGMENT_WRITE_KEY_IOS"]], rules_env, stdin=ndjson)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0] == {"rule": "legacy-ios", "primary": ["segment"], "mirror": [], "bucket": None, "cohort_key": None}
    b42 = bucket("segment-to-rudderstack", "42")
    assert lines[1] == {
        "rule": "eu-pilot", "primary": ["rudderstack" if b42 < 5000 else "segment"],
        "mirror": ["segment"] if b42 < 5000 else [], "bucket": b42, "cohort_key": "userId",
    }
    b7 = bucket("segment-to-rudderstack", "u-7")
    assert lines[2] == {"rule": "everyone-else", "primary": ["rudderstack" if b7 < 500 else "segment"], "mirror": [], "bucket": b7, "cohort_key": "userId"}
    assert lines[3] == {"rule": "everyone-else", "primary": ["segment"], "mirror": [], "bucket": 9999, "cohort_key": None}
    assert all(list(line) == ["rule", "primary", "mirror", "bucket", "cohort_key"] for line in lines)


def test_explain_without_a_key_does_not_match_source_conditions(example: Path, rules_env: dict[str, str]) -> None:
    event = {"type": "track", "event": "Opened", "anonymousId": "dev-1", "context": {"app": {"version": "4.1.9"}}}
    result = run(["explain", str(example)], rules_env, stdin=json.dumps(event))
    assert json.loads(result.stdout)["rule"] == "everyone-else"


def test_explain_reads_a_batch_body_with_its_write_key_and_envelope(example: Path, rules_env: dict[str, str], tmp_path: Path) -> None:
    body = {
        "writeKey": rules_env["SEGMENT_WRITE_KEY_IOS"],
        "context": {"app": {"version": "3.9"}},
        "batch": [{"type": "track", "event": "A", "userId": "x"}, {"type": "track", "event": "B", "userId": "y", "context": {"app": {"version": "5.0"}}}],
    }
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(body, indent=2))
    result = run(["explain", str(example), str(path)], rules_env)
    assert [json.loads(line)["rule"] for line in result.stdout.splitlines()] == ["legacy-ios", "everyone-else"]


def test_explain_country_from_a_header(example: Path, rules_env: dict[str, str]) -> None:
    result = run(["explain", str(example), "--header", "CloudFront-Viewer-Country: fr"], rules_env, stdin='{"type":"page","userId":"u"}')
    assert json.loads(result.stdout)["rule"] == "eu-pilot"


def test_explain_unknown_write_key_exits_2(example: Path, rules_env: dict[str, str]) -> None:
    result = run(["explain", str(example), "--write-key", "who-is-this"], rules_env, stdin='{"type":"page","userId":"u"}')
    assert result.returncode == 2
    assert "unknown write key" in result.stderr


def test_explain_bad_input_names_the_line(example: Path, rules_env: dict[str, str]) -> None:
    result = run(["explain", str(example)], rules_env, stdin='{"type":"page","userId":"u"}\n{oops\n')
    assert result.returncode == 2
    assert "<stdin>:2: invalid JSON" in result.stderr


def test_simulate_tallies_and_rehearses_a_rollout(example: Path, rules_env: dict[str, str], tmp_path: Path) -> None:
    sample = tmp_path / "events.ndjson"
    sample.write_text("\n".join(json.dumps({"type": "track", "event": "E", "userId": f"user-{i % 2000}"}) for i in range(6000)) + "\n")
    wider = tmp_path / "wider.yaml"
    wider.write_text(EXAMPLE.replace("rudderstack: 5, segment: 95", "rudderstack: 20, segment: 80"))
    result = run(["simulate", str(wider), str(sample), "--against", str(example)], rules_env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.splitlines()[0] == f"6000 events, 2000 distinct cohort keys ({wider})"
    moved = sum(1 for i in range(2000) if 500 <= bucket("segment-to-rudderstack", f"user-{i}") < 2000)
    assert f": {moved} of 2000 cohort keys" in out
    assert f"  segment -> rudderstack: {moved} keys" in out
    assert "rudderstack -> segment" not in out  # widening only ever adds users to the first-listed side
    row = next(line.split() for line in out.splitlines() if line.startswith("everyone-else") and " rudderstack " in line)
    assert abs(float(row[-1].rstrip("%")) - 20.0) < 3.0


def test_explain_and_simulate_take_a_source_by_name_for_webhook_sources(rules_env: dict[str, str], tmp_path: Path) -> None:
    shipped = str(Path(__file__).resolve().parents[1] / "rules" / "webhook-intake.yaml")
    event = '{"type":"track","event":"Opened","userId":"u-1","messageId":"m-1"}'
    result = run(["explain", shipped, "--source", "legacy-apps"], rules_env, stdin=event)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rule"] == "legacy-via-segment"
    assert json.loads(run(["explain", shipped], rules_env, stdin=event).stdout)["rule"] == "apps"  # no source: not the webhook's rule
    unknown = run(["explain", shipped, "--source", "nope"], rules_env, stdin=event)
    assert unknown.returncode == 2 and "--source 'nope': no such source" in unknown.stderr
    both = run(["explain", shipped, "--source", "legacy-apps", "--write-key", "k"], rules_env, stdin=event)
    assert both.returncode == 2 and "not both" in both.stderr
    sample = tmp_path / "sample.ndjson"
    sample.write_text(event + "\n")
    simulated = run(["simulate", shipped, str(sample), "--source", "legacy-apps"], rules_env)
    assert simulated.returncode == 0, simulated.stderr
    assert "legacy-via-segment" in simulated.stdout and "\napps " not in simulated.stdout
