"""Admin answers that each cover a whole tier: merged once, not once per replica asked.

With the tier view (proxy/observe/tier.py) every replica's `/admin/catalog` and `/admin/ledger`
already hold the other replicas' counts. `splitter catalog --from A --from B` and `splitter parity
--from A --from B` merge answers: adding two such answers would count every replica twice. So
before merging, answers that carry a `tier` are taken widest first (most replicas), and one whose
replicas another answer already covers is left out; answers without a `tier` (no store, a snapshot
file, an older splitter) are all kept, as before. No redis here: the CLIs import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

V = TypeVar("V", bound=Mapping[str, Any])


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
