"""Which rules a process starts on: the rules file, or the last good rules when a reload would refuse the file.

A file that a reload refused stays on disk. At start-up the file is judged against the last good
rules (proxy/control/last_good.py) exactly as a reload judges it against the active rules:
`verdict(last_good, file)`, the engine's `compare` with each ramp at the step due now. If a reload
would refuse it, the process starts on the last good rules and says so until the file is fixed or
the change is consented to (`reshuffle: true`): an error line `config_refused_at_start` with the
reasons, a `/readyz` detail (still ready: the last good rules are the safe state), and the gauge
`splitter_config_file_refused` at 1. `splitter check --against` gives the same verdict offline.

The last good text is compiled with the same environment and plan files as the file. If it no
longer compiles (a `${VAR}` gone), or the record cannot be read, that is logged and the process
starts on the file, as it did before there was a record.

What happens next, until the file is fixed, is followed by proxy/control/standing.py. This module
imports no metrics library: `splitter check --against` uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from proxy.control.last_good import LastGood, LastGoodStore, LastGoodUnreadable
from proxy.engine import RulesError, RuleSet, compare, compile_rules, effective_rules
from proxy.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a reload from `old` to `new` would answer: refused (reasons), or accepted with these rollbacks."""

    refused: tuple[str, ...]
    rollbacks: tuple[dict[str, Any], ...]  # as in the reload answer and its `config_rollback` lines


def verdict(old: RuleSet, new: RuleSet, at: datetime) -> Verdict:
    """The reload check, offline: `compare` on both rule sets with each ramp at the step due at `at`
    (no traffic sample: a process starting, or CI, has none; the rules' own made-up events are judged)."""
    report = compare(effective_rules(old, at), effective_rules(new, at))
    return Verdict(tuple(report.refused), report.rollback_entries())


@dataclass(frozen=True, slots=True)
class FileRefused:
    """The rules file would be refused against the last good rules, which serve instead."""

    file: str
    file_sha256: str
    active_sha256: str  # of the last good rules' text
    reasons: tuple[str, ...]

    def detail(self) -> dict[str, Any]:
        """For `/readyz`."""
        return {"rules": "last_good", "file": self.file, "file_sha256": self.file_sha256, "active_sha256": self.active_sha256,
                "refused": list(self.reasons)}


@dataclass(frozen=True, slots=True)
class StartRules:
    rules: RuleSet
    refused: FileRefused | None = None
    last_good: RuleSet | None = None  # the last good rules, compiled, when there were any: the change history's start is against them


def _read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def compile_last_good(record: LastGood, file_rules: RuleSet, env: Mapping[str, str]) -> RuleSet:
    """The record's text compiled as `file_rules` were: the same environment, plan files beside the file. RulesError if it does not compile."""
    return compile_rules(record.text, filename=file_rules.filename, env=env, sha256=record.sha256, read_file=_read_bytes)


def last_good_rules(file_rules: RuleSet, store: LastGoodStore, env: Mapping[str, str]) -> RuleSet | None:
    """The last good rules, compiled; None, logged, when there are none or they cannot be used."""
    try:
        record = store.load()
    except LastGoodUnreadable as exc:
        log.error("last_good_unreadable", record=str(store.path), error=str(exc), hint="starting on the rules file")
        return None
    if record is None:
        return None
    try:
        return compile_last_good(record, file_rules, env)
    except RulesError as exc:
        log.error("last_good_unusable", record=str(store.path), sha256=record.sha256[:12], errors=list(exc.lines),
                  hint="the last good rules no longer compile here (lines are the record's text); starting on the rules file")
        return None


def start_rules(file_rules: RuleSet, store: LastGoodStore, env: Mapping[str, str], at: datetime) -> StartRules:
    """The file's rules, unless a reload from the last good rules would refuse them. Reads files: call it in a thread."""
    try:
        last_good = last_good_rules(file_rules, store, env)
        if last_good is None or last_good.sha256 == file_rules.sha256:
            return StartRules(file_rules, last_good=last_good)
        judged = verdict(last_good, file_rules, at)
    except Exception:  # an engine bug must not stop a start on a file that compiles, as it does not stop a reload
        log.exception("last_good_check_crashed", record=str(store.path), hint="starting on the rules file")
        return StartRules(file_rules)
    if not judged.refused:
        log.info("config_changed_since_last_good", path=file_rules.filename, last_good_sha256=last_good.sha256[:12], sha256=file_rules.sha256[:12])
        for rollback in judged.rollbacks:
            log.warning("config_rollback", trigger="start", **rollback)
        return StartRules(file_rules, last_good=last_good)
    refused = FileRefused(file_rules.filename, file_rules.sha256, last_good.sha256, judged.refused)
    log.error("config_refused_at_start", path=file_rules.filename, sha256=file_rules.sha256[:12], serving="last_good",
              last_good_sha256=last_good.sha256[:12], record=str(store.path), errors=list(judged.refused),
              hint="serving the last good rules until the file is fixed or says `reshuffle: true`")
    return StartRules(last_good, refused, last_good)
