"""The change history: one entry for every rule set that takes effect and every reload that fails.

A data anomaly is matched to the change that caused it by time, so every change is written down
with when, what and why (`<state-dir>/history.ndjson`, proxy/observe/history_file.py; served at
`GET /admin/history`, printed by `splitter history`):

- `started`: a process started, on the rules file or, because a reload from the last good rules
  would refuse the file, on those (`"status": "refused", "serving": "last_good"` with the reasons);
  its changes are against the last good rules, i.e. what was edited while the proxy was down;
- `installed`: a reload (SIGHUP, file change, admin POST) or a ramp step took effect: its changes,
  bucket movements, moves and rollbacks, and any reshuffle consented to with `reshuffle: true`;
- `failed`: a reload that put nothing into effect (`error`: the file does not compile; `refused`:
  a reshuffle not consented to), with the engine's messages. The same failure seen again (the
  file watcher after an operator's POST) is the same change and is not written twice. A reload
  that finds the rules `unchanged` changes nothing and is not written.

Each entry: `time` (UTC), `trigger`, `status`, `sha256` (of the rules file the entry is about),
`active_sha256` (the rules in effect after it), and `previous_sha256`/`changes` or `errors`. What
changed comes from the engine (`diff_rules`, proxy/engine/rules_diff.py): names, percents, counts.
The rules text may hold literal write keys, and destination URLs credentials: neither the text nor
anything from it but its sha256 is written here, and the engine's messages mask keys already.

Writing is best effort: an entry that cannot be written (a full disk, a state directory that is
not writable) is logged as `history_write_failed` and the change goes ahead; the history must
never be why a reload fails. Only the process that writes the last good rules writes the history.
"""

from __future__ import annotations

import asyncio
import hashlib
import stat
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.control.start_rules import FileRefused
from proxy.engine import RolloutReport, RuleSet, compare, diff_rules
from proxy.log import get_logger
from proxy.observe.history_file import MAX_BYTES, HistoryFile

log = get_logger(__name__)
START = "start"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ChangeHistory:
    def __init__(self, state_dir: str | Path, config: str, *, max_bytes: int = MAX_BYTES, now: Callable[[], str] = utc_now) -> None:
        """`config`: the rules file, whose sha256 a failed reload is recorded with."""
        self.store = HistoryFile(state_dir, max_bytes)
        self._config = config
        self._now = now

    def started(self, rules: RuleSet, previous: RuleSet | None, refused: FileRefused | None) -> None:
        """The process started on `rules` (each ramp at its step due now); `previous`: the last good
        rules as they would be now, when there are any; `refused`: why the file does not serve."""
        def entry() -> dict[str, Any]:
            if refused is not None:
                return {"trigger": START, "status": "refused", "sha256": refused.file_sha256, "active_sha256": rules.sha256,
                        "serving": "last_good", "errors": list(refused.reasons)}
            started: dict[str, Any] = {"trigger": START, "status": "success", "sha256": rules.sha256, "active_sha256": rules.sha256}
            if previous is not None:  # none: a first start, or no usable last good rules
                started["previous_sha256"] = previous.sha256
                if previous.sha256 != rules.sha256:
                    started["changes"] = diff_rules(previous, rules, compare(previous, rules)).as_dict()
            return started

        self._record(START, entry)

    def installed(self, trigger: str, old: RuleSet, new: RuleSet, report: RolloutReport | None) -> None:
        """`new` took effect over `old`; `report` is the reload's `compare` (a ramp step has none: it is compared here)."""
        def entry() -> dict[str, Any]:
            judged = report if report is not None else compare(old, new)
            return {"trigger": trigger, "status": "success", "sha256": new.sha256, "active_sha256": new.sha256,
                    "previous_sha256": old.sha256, "changes": diff_rules(old, new, judged).as_dict()}

        self._record(trigger, entry)

    def failed(self, trigger: str, status: str, errors: Sequence[str], sha256: str | None, active: RuleSet) -> None:
        """A reload that installed nothing; `sha256` of the file refused, or None when it did not compile (read here)."""
        self._record(trigger, lambda: {"trigger": trigger, "status": status, "sha256": sha256 or file_sha256(self._config),
                                       "active_sha256": active.sha256, "errors": list(errors)})

    async def entries(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` entries, newest first (`GET /admin/history`), read in a thread."""
        return await asyncio.to_thread(self.store.read, limit)

    def _record(self, trigger: str, entry: Callable[[], dict[str, Any]]) -> None:
        """Build and append one entry; any failure is logged, never raised: the change has taken effect."""
        time = self._now()
        try:
            built = {"time": time, **entry()}
        except Exception:  # an engine bug describing the change must not undo or fail it
            log.exception("history_entry_failed", trigger=trigger)
            return
        try:
            self.store.append(built)
        except OSError as exc:
            log.error("history_write_failed", file=str(self.store.path), error=str(exc), trigger=trigger, status=built["status"],
                      hint="the change took effect; it is missing from the change history. Check --state-dir (space, permissions)")


def file_sha256(path: str) -> str | None:
    """The sha256 of a regular file's bytes (never a FIFO's, which would block), or None."""
    try:
        target = Path(path)
        if not stat.S_ISREG(target.stat().st_mode):
            return None
        return hashlib.sha256(target.read_bytes()).hexdigest()
    except OSError:
        return None
