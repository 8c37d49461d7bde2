"""Intake takes turns with senders that fell behind for lack of CPU (`--durability interval`).

Saturated, one pass of the event loop serves every connection that has a request ready: thirty
batches of 50 events at about 400 µs each, some 13 ms. A sender's upstream round trip spans a few
such passes (its read, the answer, the ack), so under a sustained overload the senders deliver a few
percent of what intake accepts. The rest waits on disk, the spool grows toward its quota while the
upstreams sit idle, and it is read back later at about a third more CPU per event than records
handed over in memory.

So while a sender whose upstream answers has fallen behind half the records its spool keeps in
memory, and the loop is busy (a probe timer comes around late), each new request first waits for
its turn: one request is let through per pass of the loop, in arrival order. The senders' callbacks
then run between requests instead of after thirty of them, they keep up from memory, and the intake
settles at what the process can deliver. The CPU is never left idle for it: a turn is one pass of
the loop, not a timer. Once the queue exists it lasts while requests keep coming faster than one per
pass, and ends at once when no sender lags any more. When no sender lags, a request pays one call
and a comparison.

Waiting requests count toward `--max-in-flight`, as requests waiting for the CPU do: past it, the
overloaded process answers 429 with Retry-After. Not in `--durability fsync`: there a request
already yields while its group-commit round syncs, which lets the senders run, and letting requests
through one by one would split the rounds (more fsyncs per request). A sender whose upstream is
down (breaker open) does not pace intake: the spool is there for outages.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

PROBE_EVERY = 0.01  # seconds between the probe's ticks, while a sender lags
BUSY_LATE = 0.004  # a tick this late: the loop's passes are long, intake is what fills them


class Pacer:
    """Turns for requests while `lagging()` says a sender is behind and the loop is busy; one request per pass."""

    def __init__(self, lagging: Callable[[], bool], on_paced: Callable[[], None] | None = None) -> None:
        self._lagging = lagging
        self._on_paced = on_paced
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._letting = False  # a `_let_one` is scheduled
        self._probing = False  # a probe tick is scheduled
        self._busy = False  # the last tick came late

    def turn(self) -> asyncio.Future[None] | None:
        """None: go on now. Else a future to await: it is done at this request's turn."""
        if not self._waiting:  # requests already waiting keep their order: a newcomer queues behind them
            if not self._lagging():
                return None
            if not self._busy:
                if not self._probing:
                    self._probing = True
                    self._schedule_tick(asyncio.get_running_loop())
                return None
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiting.append(waiter)
        if not self._letting:
            self._letting = True
            loop.call_soon(self._let_one)
        if self._on_paced is not None:
            self._on_paced()
        return waiter

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _schedule_tick(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_later(PROBE_EVERY, self._tick, loop.time() + PROBE_EVERY)

    def _tick(self, due: float) -> None:
        """How late the loop came around: a busy loop is one whose passes are long. Runs while a sender lags."""
        loop = asyncio.get_running_loop()
        self._busy = loop.time() - due >= BUSY_LATE
        if self._lagging():
            self._schedule_tick(loop)
        else:
            self._probing = self._busy = False

    def _let_one(self) -> None:
        """One request's turn, then the next at the next pass of the loop (a callback scheduled from a
        callback runs after the I/O and timers of the next pass); every one at once when no sender lags."""
        everyone = not self._lagging()
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():  # its client went away meanwhile (cancelled): its turn goes to the next
                waiter.set_result(None)
                if not everyone:
                    break
        if self._waiting:
            asyncio.get_running_loop().call_soon(self._let_one)
        else:
            self._letting = False
