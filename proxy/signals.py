"""The process's signals, the same for `serve`, the `--workers` supervisor and a spool drainer."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable


def stop_on_signals(reload: Callable[[str], object] | None = None) -> asyncio.Event:
    """An event SIGTERM and SIGINT set; with `reload`, SIGHUP calls `reload("sighup")`.

    The handlers stay installed to the end: a second SIGTERM while draining must not kill the
    process with the default action (losing the drain); it only sets an already-set event."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload, "sighup")
    return stop
