"""The ramp parts of the `splitter` command: `--at TIME` and the schedule that `check` prints.

`explain` and `simulate` evaluate the rules as the proxy would at a time: `--at` when given, else
now. So a future step can be rehearsed on a sample before it lands, and without `--at` the output
matches what the running proxy does today.
"""

from __future__ import annotations

from datetime import UTC, datetime

import click

from proxy.engine import RampView, RuleSet, iso, ramp_views


def _parse_at(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time such as 2026-12-01T00:00:00Z") from None
    if when.utcoffset() is None:
        raise click.BadParameter(f"{value!r} has no timezone: add Z (UTC) or an offset such as +01:00")
    return when.astimezone(UTC)


at_option = click.option("--at", "at", metavar="TIME", default=None, callback=_parse_at,
                         help="Evaluate ramp schedules at this ISO 8601 time (e.g. 2026-12-08T00:00:00Z) instead of now.")


def _percents(percents: tuple[tuple[str, float], ...]) -> str:
    return ", ".join(f"{destination} {percent:g} %" for destination, percent in percents)


def _position(view: RampView) -> str:
    if view.current is None:
        return f"before its first step ({_percents(view.start)})"
    return f"step {view.current + 1} of {len(view.steps)} ({_percents(view.steps[view.current][1])})"


def schedule_lines(rules: RuleSet, now: datetime) -> list[str]:
    """Each ramp as a table of times and percents, the step in effect at `now` marked."""
    lines = []
    for view in ramp_views(rules, now):
        lines.append(f"ramp of rule {view.rule!r}:")
        rows = [("before", view.start), *((iso(at), percents) for at, percents in view.steps)]
        current = 0 if view.current is None else view.current + 1
        for index, (when, percents) in enumerate(rows):
            lines.append(f"  {when:<22}{_percents(percents)}{'   <- now' if index == current else ''}")
    return lines


def position_lines(rules: RuleSet, at: datetime) -> list[str]:
    """Where each ramp stands at `at`, one line per ramped rule, for `simulate`."""
    return [f"at {iso(at)}: rule {view.rule!r} is {_position(view)}" for view in ramp_views(rules, at)]
