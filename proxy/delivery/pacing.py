"""Intake takes turns with senders that fell behind for lack of CPU (`--durability interval`).

Saturated, one turn of the event loop serves every connection that has a request ready: thirty
batches of 50 events at about 400 µs each, some 13 ms. A sender's upstream round trip spans a few
such turns (its read, the answer, the ack), so under a sustained overload the senders deliver a few
percent of what intake accepts. The rest waits on disk, the spool grows toward its quota while the
upstreams sit idle, and it is read back later at about a third more CPU per event than records
handed over in memory.

So while a sender whose upstream answers has fallen behind half the records its spool keeps in
memory, each new request first waits for its turn: one request is let through per loop turn, in
arrival order. The senders' callbacks then run between requests instead of after thirty of them,
they keep up from memory, and the intake settles at what the process can deliver. Nothing is
refused and the CPU is never left idle for it: a turn is one pass of the loop, not a timer. When
no sender lags, a request pays one call and a comparison.

Not in `--durability fsync`: there a request already yields while its group-commit round syncs,
which lets the senders run, and letting requests through one by one would split the rounds (more
fsyncs per request). A sender whose upstream is down (breaker open) does not pace intake: the
spool is there for outages.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class Pacer:
    """Turns for requests while `lagging()` says a sender is behind; one request per loop turn."""

    def __init__(self, lagging: Callable[[], bool], on_paced: Callable[[], None] | None = None) -> None:
        self._lagging = lagging
        self._on_paced = on_paced
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._letting = False  # a `_let_one` is scheduled

    def turn(self) -> asyncio.Future[None] | None:
        """None: go on now. Else a future to await: it is done at this request's turn."""
        if not self._waiting and not self._lagging():
            return None  # requests already waiting keep their order: a newcomer queues behind them
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiting.append(waiter)
        if self._on_paced is not None:
            self._on_paced()
        if not self._letting:
            self._letting = True
            loop.call_soon(self._let_one)
        return waiter

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _let_one(self) -> None:
        """One request's turn, then the next at the next pass of the loop (a callback scheduled from a
        callback runs after the I/O and timers of the next pass)."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():  # its client went away meanwhile (cancelled): its turn goes to the next
                waiter.set_result(None)
                break
        if self._waiting:
            asyncio.get_running_loop().call_soon(self._let_one)
        else:
            self._letting = False
