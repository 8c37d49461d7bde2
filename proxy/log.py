"""structlog, configured once: JSON lines on stdout, write keys masked by a processor.

Masking is a processor rather than a habit at call sites, so a key can't leak through a log call
someone forgets to wrap: any field whose name says it holds a credential is masked on the way out.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Hashable, MutableMapping
from typing import Any

import structlog

from proxy.engine import mask

SECRET_FIELDS = frozenset({"write_key", "writekey", "writeKey", "credential", "authorization", "token", "admin_token", "secret", "webhook_secret"})


def mask_write_keys(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name, value in event_dict.items():
        event_dict[name] = _masked(name, value)
    return event_dict


def _masked(name: str, value: Any) -> Any:
    """Secrets under a secret-looking name are masked at any depth (lists and nested objects too)."""
    if name in SECRET_FIELDS and isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {key: _masked(str(key), inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [_masked(name, item) for item in value]
    return value


class LogThrottle:
    """At most one log line per key every `interval` seconds, and how many were held back meanwhile.

    For lines that requests or clients can trigger at will (dropped mirror copies, duplicates, bad
    data against a tracking plan): loud enough to be seen, never a line per event."""

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._held_back: Counter[Hashable] = Counter()

    def allow(self, key: Hashable = None) -> int | None:
        """None when a line for `key` was logged less than `interval` ago; else how many were held back since."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held_back[key] += 1
            return None
        self._last[key] = now
        return self._held_back.pop(key, 0)


class LineLogger:
    """Writes each log line to the current `sys.stdout` with one `write()`.

    structlog's PrintLogger calls print(), which writes the line and its newline separately when
    stdout is unbuffered (PYTHONUNBUFFERED=1, as in our image); the workers of `serve --workers N`
    share stdout, and two writes per line let their lines interleave. Like PrintLogger, it looks
    `sys.stdout` up on every call, so whatever replaces it (a test's capture) is followed.
    """

    def __init__(self, *_: object) -> None:  # structlog passes get_logger()'s arguments
        pass

    def msg(self, message: str) -> None:
        stream = sys.stdout
        stream.write(message + "\n")
        stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def configure(level: str = "info") -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            mask_write_keys,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=LineLogger,
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
