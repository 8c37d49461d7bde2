"""Where `serve --workers N` keeps each worker's spool and dead letters, and what earlier runs left.

A spool directory has one writer (`Delivery.start` locks it), so worker i owns
`<spool-dir>/worker-<i>` and writes its dead letters under `<dead-letter-dir>/worker-<i>`. A single
process (`--workers 1`) keeps the original layout, `<spool-dir>/<destination>`. Lowering N, or
switching between one and several workers, leaves spools that no running worker owns any more:
`leftovers()` names them so that the supervisor drains them instead of forgetting them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from proxy.delivery.spool import MAGIC

WORKER_PREFIX = "worker-"
SEGMENT_HEADER_BYTES = len(MAGIC)  # a segment file holding no record is only its format marker


def worker_dir(base: str | Path, index: int) -> Path:
    return Path(base) / f"{WORKER_PREFIX}{index}"


def spool_name(spool_dir: str | Path) -> str | None:
    """`worker-<i>` for a worker's spool (a drainer's of one too), None for a single process's: what
    the files kept per spool in the state directory are named after (the delivery ledger's)."""
    return Path(spool_dir).name if _worker_index(Path(spool_dir)) is not None else None


def _worker_index(directory: Path) -> int | None:
    suffix = directory.name.removeprefix(WORKER_PREFIX)
    return int(suffix) if directory.name.startswith(WORKER_PREFIX) and suffix.isdigit() else None


def _has_records(segments: Iterable[Path]) -> bool:
    return any(p.stat().st_size > SEGMENT_HEADER_BYTES for p in segments)


def holds_records(directory: Path) -> bool:
    """Whether any destination spool under `directory` has a segment with records (acked or not)."""
    return _has_records(directory.glob("*/*.seg"))


def worker_spools(spool_dir: Path, *, from_index: int = 0) -> list[Path]:
    """`worker-<i>` spools with i >= `from_index` that hold records, in index order."""
    if not spool_dir.is_dir():
        return []
    found = [(index, path) for path in spool_dir.iterdir() if path.is_dir() and (index := _worker_index(path)) is not None]
    return [path for index, path in sorted(found) if index >= from_index and holds_records(path)]


def single_process_spool_holds_records(spool_dir: Path) -> bool:
    """Whether a `--workers 1` run left records in `<spool-dir>/<destination>`."""
    return spool_dir.is_dir() and _has_records(p for p in spool_dir.glob("*/*.seg") if _worker_index(p.parent) is None)


def leftovers(spool_dir: Path, workers: int) -> list[Path]:
    """Spools none of `workers` workers owns that hold records: a single process's, and workers' >= N."""
    single = [spool_dir] if single_process_spool_holds_records(spool_dir) else []
    return single + worker_spools(spool_dir, from_index=workers)
