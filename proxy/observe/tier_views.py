"""Admin answers that cover a whole tier: gathered from three places, and merged once, not once per replica asked.

`gathered_views` is what `/admin/catalog` and `/admin/ledger` share: a view of this process's live
data, of each other process file in the state directory, and of each other replica's snapshot the
store has (`TierRead`), each process tagged with its replica, and what could not be read, said.

With the tier view (proxy/observe/tier.py) every replica's `/admin/catalog` and `/admin/ledger`
already hold the other replicas' counts. `splitter catalog --from A --from B` and `splitter parity
--from A --from B` merge answers: adding two such answers would count every replica twice. So
before merging, answers that carry a `tier` are taken widest first (most replicas), and one whose
replicas another answer already covers is left out; answers without a `tier` (no store, a snapshot
file, an older splitter) are all kept, as before. No redis here: the CLIs import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # the CLIs import this module: no redis for them
    from proxy.observe.tier import Tier, TierRead

V = TypeVar("V", bound=Mapping[str, Any])
Snapshot = dict[str, Any]
# What a snapshot that parses but is damaged inside raises while it is turned into a view.
UNREADABLE = (KeyError, TypeError, ValueError, AttributeError, IndexError)


async def tier_read(tier: Tier | None, kind: str) -> TierRead | None:
    """The other replicas' snapshots of `kind`, or None without a tier view."""
    return await tier.read(kind) if tier is not None else None


def gathered_views(own: list[dict[str, Any]], files: Iterable[tuple[Path, Snapshot | str]], tier: TierRead | None, now: float,
                   to_view: Callable[[Snapshot], dict[str, Any]], is_snapshot: Callable[[Snapshot], bool],
                   not_one: str) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """`own` (this process's live view, if it has one) and a view of each file (read_process_files'
    answer) and each tier snapshot `is_snapshot` accepts; and what could not be read, and why."""
    views, unreadable = list(own), []
    for path, found in files:
        try:
            if isinstance(found, str):
                raise ValueError(found)
            views.append(to_view(found))
        except UNREADABLE as exc:
            unreadable.append({"file": path.name, "error": str(exc)})
    if tier is None:
        return views, unreadable
    for view in views:  # this host's processes
        view["processes"] = [{**p, "replica": tier.replica} for p in view["processes"]]
    for snapshot in tier.snapshots:
        try:
            if snapshot.data is None:
                raise ValueError(snapshot.error)
            if not is_snapshot(snapshot.data):
                raise ValueError(not_one)
            view = to_view(snapshot.data)
        except UNREADABLE as exc:
            unreadable.append({"replica": snapshot.replica, "process": snapshot.process, "error": str(exc)})
            continue
        view["processes"] = [{**p, **snapshot.described(now)} for p in view["processes"]]
        views.append(view)
    return views, unreadable


def finished(document: dict[str, Any], tier: TierRead | None, unreadable: list[dict[str, str]]) -> dict[str, Any]:
    """The merged `document` with the tier it covers and what could not be read."""
    if tier is not None:
        document["tier"] = tier.summary(document["processes"])
    if unreadable:
        document["unreadable"] = unreadable
    return document


def covering(views: Iterable[V]) -> list[V]:
    """`views` less the tier answers whose replicas an earlier (wider) one already covers, in their order."""
    views = list(views)
    tiered = [v for v in views if isinstance(v.get("tier"), Mapping)]
    covered: set[str] = set()
    left_out: set[int] = set()
    for view in sorted(tiered, key=lambda v: -len(v["tier"].get("replicas") or ())):
        replicas = {str(r) for r in view["tier"].get("replicas") or ()}
        if replicas & covered:
            left_out.add(id(view))
        covered |= replicas
    return [v for v in views if id(v) not in left_out]
