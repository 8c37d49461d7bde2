"""structlog, configured once: JSON lines on stdout, write keys masked by a processor.

Masking is a processor rather than a habit at call sites, so a key can't leak through a log call
someone forgets to wrap: any field whose name says it holds a credential is masked on the way out.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from proxy.engine import mask

SECRET_FIELDS = frozenset({"write_key", "writekey", "writeKey", "credential", "authorization", "token", "admin_token"})


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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
