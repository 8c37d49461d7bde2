"""What the two users of the `dedup.store` Redis share: how a client is retired, and how a failure is named.

De-duplication (proxy/delivery/dedup_store.py) and the tier view (proxy/observe/tier.py) each keep
their own client, with their own timeouts and retry rules, but they retire a client the same way
(closed once what it runs is over, never in the middle of a command) and name a failure with the
same `reason` label of `splitter_dedup_store_errors_total`.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


async def close_client(client: aioredis.Redis, delay: float = 0.0) -> None:
    """Close `client` and its pool after `delay` seconds (the commands it still runs end within it); errors are moot then."""
    await asyncio.sleep(delay)
    with contextlib.suppress(Exception):
        await client.aclose()
        await client.connection_pool.aclose()


def failure_reason(exc: BaseException) -> str:
    """`timeout`, `connection` or `error`: the label a failed call is counted under."""
    if isinstance(exc, (TimeoutError, RedisTimeoutError)):
        return "timeout"
    if isinstance(exc, (RedisConnectionError, OSError)):
        return "connection"
    return "error"
