"""Which `prepare()` runs: the compiled twin when it was built, else the pure-Python one. Chosen once.

The compiled module (proxy/ingress/_compiled.pyx) is optional: pip builds it when Cython and a C
compiler are there (setup.py), and a failed build leaves the pure-Python `prepare()`, which behaves
identically. `SPLITTER_NO_EXTENSIONS=1` forces the pure-Python one (to rule the compiled one out
when chasing a problem, or to compare). The choice is made at import, before the first request, and
the server logs it at start-up (`prepare_implementation`), as a warning when the compiled module
is missing without being switched off.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.engine import Decision, EventContext, RuleSet, Source, shared_decision
from proxy.ingress import prepare as pure
from proxy.ingress.prepare import CallShape, Prepared
from proxy.observe.catalog import Catalog

DISABLE = "SPLITTER_NO_EXTENSIONS"


class PrepareFunction(Protocol):
    def __call__(self, rules: RuleSet, body: Any, shape: CallShape, source: Source, ctx: EventContext, client_ip: str | None, *,
                 presented_key: str = "", forwarded_for: str | None = None, catalog: Catalog | None = None) -> Prepared: ...


@dataclass(frozen=True, slots=True)
class Implementation:
    name: str  # "compiled" or "python"
    prepare: PrepareFunction
    shared_decision: Callable[[RuleSet, Mapping[str, Any], EventContext], Decision]  # the decision prepare() makes per event
    why_python: str | None = None  # what kept the compiled one out, when it was not switched off on purpose


PYTHON = Implementation("python", pure.prepare, shared_decision)


def compiled() -> Implementation:
    """The compiled twin; ImportError when it was not built (or not for this Python)."""
    from proxy.ingress import _compiled

    return Implementation("compiled", _compiled.prepare, _compiled.shared_decision)


def choose(env: Mapping[str, str]) -> Implementation:
    if env.get(DISABLE, "") not in ("", "0"):
        return PYTHON
    try:
        return compiled()
    except ImportError as exc:
        return Implementation(PYTHON.name, PYTHON.prepare, PYTHON.shared_decision,
                              f"the compiled module is not built ({exc}); reinstall with Cython and a C compiler to build it")


CHOSEN = choose(os.environ)
