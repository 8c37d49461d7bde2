"""`splitter check --against`: the verdict a reload would give, offline, so CI can gate a rules change.

`--against OLD.yaml` judges the file as a reload from OLD.yaml would; `--against-state DIR` as a
restart would, against the last good rules that `serve --state-dir DIR` kept. Both use the checks
`serve` runs (proxy/control/start_rules.py `verdict`, with each ramp at the step due now): a file
that would be refused is reported with the reasons and `check` exits 2; otherwise the rollbacks it
would log are listed and `check` exits 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from proxy.control.last_good import LastGoodStore, LastGoodUnreadable
from proxy.control.start_rules import compile_last_good, verdict
from proxy.engine import RulesError, RuleSet, rollback_line


@dataclass(frozen=True, slots=True)
class Outcome:
    refused: bool
    lines: list[str]  # the verdict: on stderr when refused, else on stdout after the summary
    warnings: list[str] = field(default_factory=list)  # on stderr


def against_rules(new: RuleSet, new_path: str, old: RuleSet, old_name: str, at: datetime) -> Outcome:
    if old.sha256 == new.sha256:
        return Outcome(False, [f"against {old_name}: the same rules (sha256 {new.sha256[:12]})"])
    judged = verdict(old, new, at)
    if judged.refused:
        return Outcome(True, [f"{new_path}: refused against {old_name}: {reason}" for reason in judged.refused])
    if not judged.rollbacks:
        return Outcome(False, [f"against {old_name}: accepted, no rollback"])
    lines = [f"against {old_name}: accepted with {len(judged.rollbacks)} rollback(s), as a reload would log them (config_rollback):"]
    lines += [f"  rollback: {rollback_line(entry)}" for entry in judged.rollbacks]
    return Outcome(False, lines)


def against_state(new: RuleSet, new_path: str, state_dir: str, env: Mapping[str, str], at: datetime) -> Outcome:
    """As `serve` at start-up: a record that is missing, unreadable or no longer compiles is no verdict (serve starts on the file)."""
    store = LastGoodStore(state_dir)
    try:
        record = store.load()
    except LastGoodUnreadable as exc:
        return Outcome(False, [], [f"against {state_dir}: {exc}; `serve` would log it and start on {new_path}"])
    if record is None:
        return Outcome(False, [f"against {state_dir}: no last good rules recorded; `serve` would start on {new_path}"])
    try:
        old = compile_last_good(record, new, env)
    except RulesError as exc:
        return Outcome(False, [], [f"against {store.path}: the last good rules no longer compile here; `serve` would log it and start on {new_path}:",
                                   *(f"  {line}" for line in exc.lines)])
    return against_rules(new, new_path, old, f"{store.path} (last good, sha256 {record.sha256[:12]})", at)
