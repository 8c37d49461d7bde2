# The compiled twin's interface (proxy/ingress/_compiled.pyx), for mypy.
from collections.abc import Mapping
from typing import Any

from proxy.engine import Decision, EventContext, RuleSet, Source
from proxy.ingress.prepare import CallShape, Prepared
from proxy.observe.catalog import Catalog

def bucket(salt: str, key: str) -> int: ...
def shared_decision(rules: RuleSet, event: Mapping[str, Any], ctx: EventContext) -> Decision: ...
def prepare(rules: RuleSet, body: Any, shape: CallShape, source: Source, ctx: EventContext, client_ip: str | None, *,
            presented_key: str = "", forwarded_for: str | None = None, catalog: Catalog | None = None) -> Prepared: ...
