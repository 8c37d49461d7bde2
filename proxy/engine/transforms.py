"""Per-destination transforms: the compiled operations and how they rewrite one destination's copy.

A destination being migrated to often needs the data fixed on the way (a legacy event name, PII
that must be hashed). The copy other destinations receive must stay exactly as it came, so
applying a `Chain` never mutates its input: it returns a new event built copy-on-write, where only
the objects along a written path are copied and everything else is shared with the input. Shared
objects are never written to, so the input and every other copy stay intact.

Paths are split once at compile time. A path whose value is absent, or whose parent is not an
object, leaves the event as it is: a transform never fails an event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.engine.evaluate import NO_CONTEXT
from proxy.engine.model import Decision, Predicate

Path = tuple[str, ...]
_MISSING: Any = object()


class _Draft:
    """The new event under construction: `root` and every object reached through `writable` are copies."""

    __slots__ = ("_owned", "root")

    def __init__(self, event: Mapping[str, Any]) -> None:
        self.root: dict[str, Any] = dict(event)
        self._owned = {id(self.root)}  # objects of the draft's own: safe to write

    def writable(self, path: Path, *, create: bool) -> dict[str, Any] | None:
        """The object that holds `path[-1]`, copied if it was shared; None when it cannot be reached.

        With `create`, missing objects on the way are added; an existing non-object is never replaced.
        """
        node = self.root
        for name in path[:-1]:
            child = node.get(name, _MISSING)
            if child is _MISSING and create:
                child = {}
            elif not isinstance(child, dict):
                return None
            elif id(child) in self._owned:
                node = child
                continue
            else:
                child = dict(child)
            self._owned.add(id(child))
            node[name] = child
            node = child
        return node


def _lookup(event: Mapping[str, Any], path: Path) -> Any:
    """The value at `path`, or `_MISSING` when it is absent or a parent is not an object. Reads only."""
    node: Any = event
    for name in path:
        if not isinstance(node, dict):
            return _MISSING
        node = node.get(name, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


@dataclass(frozen=True, slots=True)
class RenameEvent:
    """`event: old` becomes `event: new`; any other event name is left alone."""

    old: str
    new: str
    when: tuple[Predicate, ...] = ()

    def apply(self, draft: _Draft) -> None:
        if draft.root.get("event") == self.old:
            draft.root["event"] = self.new


@dataclass(frozen=True, slots=True)
class RenameProperty:
    """Move a value from `source` to `target`. When `target` already holds one, `overwrite` decides
    which value survives; either way `source` is gone afterwards, so the old name is retired."""

    source: Path
    target: Path
    overwrite: bool = False
    when: tuple[Predicate, ...] = ()

    def apply(self, draft: _Draft) -> None:
        value = _lookup(draft.root, self.source)
        if value is _MISSING:
            return
        target = draft.writable(self.target, create=True)
        if target is None:
            return  # a non-object is in the way of the new name: keep the value where it is
        source = draft.writable(self.source, create=False)
        assert source is not None  # `_lookup` found it, and writing the target cannot remove it (paths never overlap)
        del source[self.source[-1]]
        if self.overwrite or self.target[-1] not in target:
            target[self.target[-1]] = value


@dataclass(frozen=True, slots=True)
class DropProperty:
    path: Path
    when: tuple[Predicate, ...] = ()

    def apply(self, draft: _Draft) -> None:
        if _lookup(draft.root, self.path) is not _MISSING:
            parent = draft.writable(self.path, create=False)
            assert parent is not None
            del parent[self.path[-1]]


@dataclass(frozen=True, slots=True)
class HashProperty:
    """Replace the value with `sha256(salt + value)` in lowercase hex. null stays null (nothing to hide).

    A string is hashed as its UTF-8 bytes; any other value (number, boolean, list, object) as its
    canonical JSON text (sorted keys, no spaces), so `42` hashes as `"42"` does. The salt is kept
    out of `repr()`, so it never reaches a log line or a traceback.
    """

    path: Path
    salt: bytes = field(default=b"", repr=False)
    when: tuple[Predicate, ...] = ()

    def apply(self, draft: _Draft) -> None:
        value = _lookup(draft.root, self.path)
        if value is _MISSING or value is None:
            return
        parent = draft.writable(self.path, create=False)
        assert parent is not None
        parent[self.path[-1]] = hash_value(self.salt, value)


def hash_value(salt: bytes, value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(salt + text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class SetProperty:
    """Write `value` at `path`, adding missing objects on the way (a non-object on the way: no-op)."""

    path: Path
    value: Any
    when: tuple[Predicate, ...] = ()

    def apply(self, draft: _Draft) -> None:
        parent = draft.writable(self.path, create=True)
        if parent is not None:
            parent[self.path[-1]] = self.value  # shared config: a later op that writes inside it copies it first (_Draft.writable)


Operation = RenameEvent | RenameProperty | DropProperty | HashProperty | SetProperty


@dataclass(frozen=True, slots=True)
class Chain:
    """The operations one destination applies to the events of one rule, in order."""

    operations: tuple[Operation, ...]

    def apply(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """A new event with every operation applied; `event` itself is never modified.

        An op's `when` sees the event as the ops before it left it (after a rename_event, the new name).
        """
        draft = _Draft(event)
        for operation in self.operations:
            if all(condition(draft.root, NO_CONTEXT) for condition in operation.when):  # `when` reads the event only
                operation.apply(draft)
        return draft.root


TransformTable = Mapping[tuple[str, str], Chain]  # (rule name, destination) -> chain; only non-empty chains


def transformed_events(table: TransformTable, decision: Decision, event: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The transformed copy for each destination of `decision` that has transforms for its rule.

    Destinations left out receive `event` as it is.
    """
    copies: dict[str, dict[str, Any]] = {}
    for destinations in (decision.primary, decision.mirror):
        for destination in destinations:
            chain = table.get((decision.rule, destination))
            if chain is not None:
                copies[destination] = chain.apply(event)
    return copies
