"""The cohort hash: the one piece of splitter that is a contract, not an implementation detail.

Rules schema version 1 defines (do not change without bumping `version`):

    bucket = mmh3.hash(f"{salt}:{key}".encode("utf-8"), seed=0, signed=False) % 10000

`key` is the first non-empty cohort field of the event, as a string. Every replica, every process
and every release must compute the same bucket for the same key, because the bucket is what keeps
a user on one side of the migration. `shared/golden/cohort-buckets.ndjson` pins it in the tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mmh3

BUCKETS = 10_000
NO_KEY_BUCKET = BUCKETS - 1  # events without a cohort key take the last range: the conservative side


def bucket(salt: str, key: str) -> int:
    """The contract above (mmh3 hashes a str as its UTF-8 bytes, so the encode is left to it)."""
    return mmh3.hash(f"{salt}:{key}", seed=0, signed=False) % BUCKETS


def key_text(value: Any) -> str | None:
    """The cohort key string of a field value, or None when the value cannot be a cohort key.

    Strings are used as they are (blank ones count as empty). Integers are written in decimal, so a
    userId `42` hashes as `"42"`; an integral float (`42.0`, as some SDKs send numeric ids) hashes as
    `"42"` too. Booleans, objects, lists and null are not identifiers and are skipped.
    """
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    return None


def field_value(event: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """Follow a dotted path (pre-split at compile time) into nested objects; None when absent."""
    value: Any = event
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def cohort_key(event: Mapping[str, Any], fields: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[str, str] | tuple[None, None]:
    """(field name, key) of the first usable cohort field, or (None, None)."""
    for name, path in fields:
        text = key_text(event.get(path[0]) if len(path) == 1 else field_value(event, path))
        if text is not None:
            return name, text
    return None, None
