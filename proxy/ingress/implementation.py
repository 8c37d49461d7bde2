"""Which `prepare()` runs: the compiled twin when it was built, else the pure-Python one. Chosen once.

The compiled module (proxy/ingress/_compiled.pyx) is optional: pip builds it when Cython and a C
compiler are there (setup.py), and a failed build leaves the pure-Python `prepare()`, which behaves
identically. `SPLITTER_NO_EXTENSIONS=1` forces the pure-Python one (to rule the compiled one out
when chasing a problem, or to compare); any value but empty or `0` does, at install and here alike.
The choice is made at import, before the first request; the server names it in its `started` line
(a worker's `worker_started`) as `prepare`, and warns (`compiled_prepare_unavailable`) when the
compiled module is missing without being switched off.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from proxy.engine import Decision, EventContext, RuleSet, Source, shared_decision
from proxy.ingress import prepare as pure
from proxy.ingress.prepare import CallShape, Prepared
from proxy.observe.catalog import Catalog

DISABLE = "SPLITTER_NO_EXTENSIONS"


def disabled(env: Mapping[str, str]) -> bool:
    """SPLITTER_NO_EXTENSIONS set to anything but empty or `0` (setup.py reads it the same way)."""
    return env.get(DISABLE, "") not in ("", "0")


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
    if disabled(env):
        return PYTHON
    try:
        return compiled()
    except ImportError as exc:
        why = f"the compiled module is not built ({exc}); reinstall where a C compiler and Python's headers are (Debian: build-essential, python3-dev)"
        return replace(PYTHON, why_python=why)


CHOSEN = choose(os.environ)
