"""`python -m proxy` is the same as the `splitter` console script."""

from proxy.entry import main

main()
