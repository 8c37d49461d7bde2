"""Golden decision cases: one folder per routing strategy, checked through `decide()` and `splitter explain`.

Each `tests/golden/decisions/<case>/` holds `rules.yaml`, `events.ndjson` (events or batch bodies,
as an operator would feed `explain`), `context.json` (what the proxy would know besides the event:
`write_key`, `region`, `headers`, `at`, and `env` for the file's `${VARS}`) and `expected.ndjson` (one `explain` line per event). Both
paths must print exactly the expected lines, so the engine and the CLI cannot drift apart, and a
change in any decision (rule order, a bucket, a transform) shows up as a diff of a reviewed file.

After an intended change of behaviour, rewrite the expectations with
`SPLITTER_GOLDEN_WRITE=1 pytest tests/test_golden_decisions.py` and review the diff line by line.
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from proxy.cli.samples import read_events
from proxy.engine import EventContext, RuleSet, decide, load_rules, transformed_events
from proxy.engine.ramp import effective_rules
from tests.conftest import compiled_twin, splitter_command

CASES_DIR = Path(__file__).resolve().parent / "golden" / "decisions"
CASES = sorted(path.name for path in CASES_DIR.iterdir() if (path / "rules.yaml").exists())
STRATEGIES = {"cohort-split", "region", "country-header", "app-version", "legacy-source", "mirror", "ramp-at-time", "transforms"}


def context_of(case: Path) -> dict[str, Any]:
    context: dict[str, Any] = orjson.loads((case / "context.json").read_bytes())
    return context


def explain_arguments(context: dict[str, Any]) -> list[str]:
    arguments: list[str] = []
    if "write_key" in context:
        arguments += ["--write-key", context["write_key"]]
    if "region" in context:
        arguments += ["--region", context["region"]]
    for name, value in context.get("headers", {}).items():
        arguments += ["--header", f"{name}: {value}"]
    if "at" in context:
        arguments += ["--at", context["at"]]
    return arguments


def through_explain(case: Path) -> list[dict[str, Any]]:
    finished = subprocess.run(
        splitter_command("explain", str(case / "rules.yaml"), str(case / "events.ndjson"), *explain_arguments(context_of(case))),
        capture_output=True, timeout=60, env={**{k: v for k, v in os.environ.items() if not k.startswith("SPLITTER_")}, **context_of(case).get("env", {})},
    )
    assert finished.returncode == 0, finished.stderr.decode()
    return [orjson.loads(line) for line in finished.stdout.splitlines()]


def decided(case: Path) -> list[tuple[RuleSet, EventContext, Any]]:
    """(rules in effect, request context, event) for each of the case's events."""
    context = context_of(case)
    at = datetime.fromisoformat(context["at"]) if "at" in context else datetime.now(UTC)
    rules = effective_rules(load_rules(str(case / "rules.yaml"), context.get("env", {})), at)
    country = rules.country_from_headers(CIMultiDict(context.get("headers", {})))
    found: list[tuple[RuleSet, EventContext, Any]] = []
    for sample in read_events((case / "events.ndjson").read_text(), "events.ndjson"):
        source = rules.source_for_key(context.get("write_key") or sample.write_key)
        found.append((rules, EventContext(source.name if source else None, context.get("region"), country), sample.event))
    return found


def through_decide(case: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for rules, ctx, event in decided(case):
        decision = decide(rules, event, ctx)
        row = decision.as_dict()
        if rules.transforms:
            row["transformed"] = transformed_events(rules.transforms, decision, event)
        rows.append(orjson.loads(orjson.dumps(row)))  # the same JSON types explain prints
    return rows


def expected(case: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (case / "expected.ndjson").read_bytes().splitlines() if line.strip()]


def test_every_strategy_has_a_case() -> None:
    assert set(CASES) >= STRATEGIES


@pytest.mark.parametrize("name", CASES)
def test_explain_prints_the_golden_decisions(name: str) -> None:
    case = CASES_DIR / name
    rows = through_explain(case)
    if os.environ.get("SPLITTER_GOLDEN_WRITE") == "1":
        (case / "expected.ndjson").write_bytes(b"".join(orjson.dumps(row, option=orjson.OPT_SORT_KEYS) + b"\n" for row in rows))
    assert rows == expected(case)


@pytest.mark.parametrize("name", CASES)
def test_decide_gives_the_golden_decisions(name: str) -> None:
    case = CASES_DIR / name
    assert through_decide(case) == expected(case)


@pytest.mark.parametrize("name", CASES)
def test_the_compiled_decision_gives_the_golden_routes(name: str) -> None:
    """The decision compiled into `prepare()`'s twin (proxy/ingress/_compiled.pyx) routes every golden event as the engine does."""
    case = CASES_DIR / name
    routes = [[decision.rule, list(decision.primary), list(decision.mirror)] for decision in
              (compiled_twin().shared_decision(rules, event, ctx) for rules, ctx, event in decided(case))]
    assert routes == [[row["rule"], row["primary"], row["mirror"]] for row in expected(case)]
