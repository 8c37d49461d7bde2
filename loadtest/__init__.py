"""Load-test, demo and stand-in upstream tooling for splitter (not shipped in the package)."""
