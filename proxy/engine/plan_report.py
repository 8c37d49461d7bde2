"""Tracking-plan violations over a sample of events, for `splitter simulate`.

Checks each sample event against its source's plan (both modes alike: the report answers "what
would this plan flag?") and tallies violations per source, kind and event name, with a few example
messages each. Pure: returns rows and text lines; the CLI prints them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from proxy.engine.model import RuleSet
from proxy.engine.simulate import Sample

EXAMPLES = 3  # distinct example messages kept per row


@dataclass(frozen=True, slots=True)
class ViolationRow:
    source: str
    kind: str
    event: str
    violations: int
    examples: tuple[str, ...]


@dataclass
class PlanReport:
    checked: int = 0  # sample events whose source has a plan
    failing: int = 0  # of those, events with at least one violation
    rows: list[ViolationRow] = field(default_factory=list)  # most violations first


def check_plans(rules: RuleSet, samples: Iterable[Sample]) -> PlanReport:
    report = PlanReport()
    counts: Counter[tuple[str, str, str]] = Counter()
    examples: dict[tuple[str, str, str], list[str]] = {}
    for event, ctx in samples:
        source = ctx.source
        plan = rules.tracking_plans.get(source) if source is not None else None
        if plan is None or source is None:
            continue
        report.checked += 1
        found = plan.violations(event)
        report.failing += bool(found)
        for violation in found:
            key: tuple[str, str, str] = (source, violation.kind, violation.event)
            counts[key] += 1
            kept = examples.setdefault(key, [])
            if len(kept) < EXAMPLES and violation.message not in kept:
                kept.append(violation.message)
    for key, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        report.rows.append(ViolationRow(*key, count, tuple(examples[key])))
    return report


def plan_report_lines(rules: RuleSet, samples: Iterable[Sample]) -> list[str]:
    """The report as text; no lines at all when no source has a plan, so other output is unchanged."""
    if not rules.tracking_plans:
        return []
    report = check_plans(rules, samples)
    lines = [
        "",
        f"tracking plans: {report.checked} events checked, {report.failing} with violations",
    ]
    if report.rows:
        lines.append(f"{'source':<16} {'kind':<18} {'event':<32} {'violations':>10}")
    for row in report.rows:
        lines.append(f"{row.source:<16} {row.kind:<18} {row.event:<32} {row.violations:>10}")
        lines.extend(f"    e.g. {message}" for message in row.examples)
    return lines
