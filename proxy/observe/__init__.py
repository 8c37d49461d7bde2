"""What splitter has seen and what became of it: the event catalog and the delivery ledger.

Below delivery in the layers (delivery records into the ledger; ingress into the catalog), above
metrics and logging. Each process keeps its own counts in memory and snapshots them to the state
directory (`files.py`), where a restart finds them and a `--workers N` supervisor merges them.
"""
