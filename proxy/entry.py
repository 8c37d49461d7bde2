"""The `splitter` console script and `python -m proxy`: hold SIGHUP, then the CLI.

Kept tiny and imported before anything else, so the window in which a SIGHUP still has its default
(fatal) action is the interpreter's own start-up, not ours (see proxy/signals.py).
"""

from __future__ import annotations

from proxy.signals import hold_sighup


def main() -> None:
    hold_sighup()
    from proxy.cli import main as cli_main  # after the handler: importing the CLI takes a while

    cli_main()
