"""`python -m proxy` is the same as the `splitter` console script."""

from proxy.cli import main

main()
