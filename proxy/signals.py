"""The process's signals, the same for `serve`, the `--workers` supervisor and a spool drainer.

SIGHUP's default action is to end the process, and an operator's reload (systemd's `ExecReload=kill
-HUP`, a ConfigMap watcher) can come at any moment, including the first half second while Python
imports and the rules load. So the console script's first statement is `hold_sighup()`: a SIGHUP
from then until the event loop's handler is installed is remembered, and `stop_on_signals` turns
it into one reload as soon as the reloader can take it (the file may have changed after it was read).
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # asyncio is imported when needed: hold_sighup runs before any slow import
    import asyncio
    from collections.abc import Callable
    from types import FrameType

_held = {"sighup": False}  # a SIGHUP seen before the loop's handler was installed


def _remember_sighup(signum: int, frame: FrameType | None) -> None:
    _held["sighup"] = True


def hold_sighup() -> None:
    """Catch SIGHUP from now on instead of dying of it; call before anything slow."""
    signal.signal(signal.SIGHUP, _remember_sighup)


def stop_on_signals(reload: Callable[[str], object] | None = None) -> asyncio.Event:
    """An event SIGTERM and SIGINT set; with `reload`, SIGHUP calls `reload("sighup")`.

    The handlers stay installed to the end: a second SIGTERM while draining must not kill the
    process with the default action (losing the drain); it only sets an already-set event.
    Without `reload` (a drainer) SIGHUP is ignored rather than fatal."""
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload, "sighup")
        if _held["sighup"]:
            _held["sighup"] = False
            loop.call_soon(reload, "sighup")
    else:
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
    return stop
