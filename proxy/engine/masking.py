"""Write keys are credentials: everything splitter prints shows them only in this masked form."""

from __future__ import annotations

MASK = "****"


def mask(key: str) -> str:
    """Enough of a write key to tell which one it is, never enough to use it."""
    if len(key) < 12:
        return MASK
    return f"{key[:4]}{MASK}"
