"""Compile `transforms` (per destination and per rule) into one `Chain` per (rule, destination).

Declared in two places (docs/configuration.md, "Transforms"):

    destinations: {rudderstack: {..., transforms: [OP, ...]}}      every event the destination receives
    rules: [{name: r, ..., transforms: {rudderstack: [OP, ...]}}]  events of rule r going there

The rule's ops run first, then the destination's: the destination's list is its policy (hash PII,
say) and must see the field names the rule's fixes produced. Both lists are joined here, once, so
the hot path does one dictionary look-up per destination. Problems are reported through the same
`NodeReader` as the rest of the file, as `FILE:LINE: path: message`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import yaml

from proxy.engine import conditions
from proxy.engine.model import Predicate, Rule
from proxy.engine.transforms import (
    Chain,
    DropProperty,
    HashProperty,
    Operation,
    Path,
    RenameEvent,
    RenameProperty,
    SetProperty,
    TransformTable,
)
from proxy.engine.yaml_reader import NodeReader

KEY = "transforms"
PATH_ROOTS = ("properties", "traits", "context")
WHEN_KEYS = ("type", "event")
IF_EXISTS = ("keep", "overwrite")
# Top-level fields a destination needs to accept and de-duplicate the event: never transformable.
PROTECTED = {
    "messageId": "messageId is never transformed: warehouses de-duplicate on it, so every destination must receive the same one",
    "type": "type is never transformed: it is part of the wire contract (destinations read the event by it)",
    "userId": "userId is never transformed: destinations refuse an event without userId or anonymousId",
    "anonymousId": "anonymousId is never transformed: destinations refuse an event without userId or anonymousId",
    "event": "the event name is changed with rename_event, not as a property",
}


def compile_transforms(reader: NodeReader, top: dict[str, yaml.Node], text: str, rules: tuple[Rule, ...],
                       unknown_destination: Callable[[str], str]) -> TransformTable:
    """Every `transforms` in the file, checked; the joined chains of the rules that compiled."""
    compiler = _TransformCompiler(reader, text)
    declared: list[str] = []
    by_destination: dict[str, tuple[Operation, ...]] = {}
    destinations = top.get("destinations")
    for name, spec in _entries(destinations):
        declared.append(name)
        node = _value_of(spec, KEY)
        if node is not None:
            by_destination[name] = compiler.operations(node, f"destinations.{name}.{KEY}")
    compiled = {rule.index: rule for rule in rules}
    table: dict[tuple[str, str], Chain] = {}
    rules_node = top.get("rules")
    for index, item in enumerate(rules_node.value if isinstance(rules_node, yaml.SequenceNode) else ()):
        node = _value_of(item, KEY)
        rule = compiled.get(index)
        by_rule = compiler.per_rule(node, f"rules[{index}].{KEY}", declared, rule, unknown_destination) if node is not None else {}
        if rule is None:
            continue  # the rule has problems of its own: the file will be refused anyway
        for destination in rule.route.destinations:
            operations = by_rule.get(destination, ()) + by_destination.get(destination, ())
            if operations:
                table[(rule.name, destination)] = Chain(operations)
    return table


def checked_path(reader: NodeReader, text: str, node: yaml.Node, path: str) -> Path | None:
    """A field path checked as transforms check theirs (under properties, traits or context, never a
    protected field), for other sections that name event fields: the recording's hashed paths."""
    return _TransformCompiler(reader, text)._path(node, path)


def env_salt(reader: NodeReader, text: str, node: yaml.Node, path: str) -> str | None:
    """A salt checked as hash_property's: from the environment, never written in the file, not empty."""
    return _TransformCompiler(reader, text)._salt(node, path)


def _entries(node: yaml.Node | None) -> Iterator[tuple[str, yaml.Node]]:
    """(name, value) of a mapping node's entries as written; the schema reports anything malformed."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                yield key.value, value


def _value_of(node: yaml.Node, key: str) -> yaml.Node | None:
    return next((value for name, value in _entries(node) if name == key), None)


class _TransformCompiler:
    def __init__(self, reader: NodeReader, text: str) -> None:
        self.r = reader
        self.text = text  # the file as written, to tell a salt from the environment from a literal one

    def per_rule(self, node: yaml.Node, path: str, declared: list[str], rule: Rule | None,
                 unknown_destination: Callable[[str], str]) -> dict[str, tuple[Operation, ...]]:
        out: dict[str, tuple[Operation, ...]] = {}
        if isinstance(node, yaml.SequenceNode):
            self.r.problem(node, path, "must map destination names to their transforms, e.g. {rudderstack: [...]}")
            return out
        for destination, ops_node in (self.r.mapping(node, path) or {}).items():
            where = f"{path}.{destination}"
            if destination not in declared:
                self.r.problem(ops_node, where, unknown_destination(destination))
            elif rule is not None and destination not in rule.route.destinations:
                routed = ", ".join(rule.route.destinations)
                self.r.problem(ops_node, where, f"this rule never sends to {destination!r} (it routes to: {routed}), so these transforms would never run")
            out[destination] = self.operations(ops_node, where)
        return out

    def operations(self, node: yaml.Node, path: str) -> tuple[Operation, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.r.problem(node, path, "must be a non-empty list of transforms, e.g. [{drop_property: properties.card_number}]")
            return ()
        compiled = (self._operation(item, f"{path}[{index}]") for index, item in enumerate(node.value))
        return tuple(op for op in compiled if op is not None)

    def _operation(self, item: yaml.Node, path: str) -> Operation | None:
        spec = self.r.mapping(item, path)
        if spec is None:
            return None
        when = self._when(spec.pop("when"), f"{path}.when") if "when" in spec else ()
        names = list(spec)
        for name in names:
            if name not in OPERATIONS:
                self.r.problem(spec[name], f"{path}.{name}", f"unknown transform {name!r} (expected one of: {', '.join(OPERATIONS)})")
        known = [name for name in names if name in OPERATIONS]
        if not names:
            self.r.problem(item, path, f"must hold one transform (one of: {', '.join(OPERATIONS)})")
        if len(known) > 1:
            self.r.problem(item, path, f"holds {len(known)} transforms ({', '.join(known)}): write one per list item, so their order is explicit")
        if len(known) != 1 or len(names) != 1 or when is None:
            return None
        name = known[0]
        return self._BUILDERS[name](self, spec[name], f"{path}.{name}", when)

    def _when(self, node: yaml.Node, path: str) -> tuple[Predicate, ...] | None:
        spec = self.r.mapping(node, path, WHEN_KEYS)
        if spec is None:
            return None
        if not node.value:  # not `spec`: unknown keys are already reported
            self.r.problem(node, path, f"must hold at least one condition ({', '.join(WHEN_KEYS)})")
            return None
        predicates: list[Predicate] = []
        for name, value_node in spec.items():
            values = [text for text, _ in self.r.strings(value_node, f"{path}.{name}")]
            if not values:
                continue
            try:
                predicates.append(conditions.BUILDERS[name](values))
            except ValueError as exc:
                self.r.problem(value_node, f"{path}.{name}", str(exc))
        return tuple(predicates) if len(predicates) == len(spec) else None

    def _args(self, node: yaml.Node, path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, yaml.Node] | None:
        spec = self.r.mapping(node, path, required + optional)
        if spec is None:
            return None
        missing = [name for name in required if name not in spec]
        for name in missing:
            self.r.problem(node, f"{path}.{name}", "is required")
        return None if missing else spec

    def _path(self, node: yaml.Node, path: str) -> Path | None:
        text = self.r.string(node, path)
        if text is None:
            return None
        parts = tuple(text.split("."))
        if any(not part.strip() for part in parts):
            self.r.problem(node, path, f"{text!r} is not a field path (use names separated by dots)")
        elif parts[0] in PROTECTED:
            self.r.problem(node, path, PROTECTED[parts[0]])
        elif parts[0] not in PATH_ROOTS:
            self.r.problem(node, path, f"{text!r} is not under {', '.join(PATH_ROOTS)}: transforms change event data, not the envelope")
        elif len(parts) == 1:
            self.r.problem(node, path, f"{text!r} names the whole object: give a field inside it, e.g. {text}.plan")
        else:
            return parts
        return None

    def _rename_event(self, node: yaml.Node, path: str, when: tuple[Predicate, ...]) -> Operation | None:
        spec = self._args(node, path, ("from", "to"))
        if spec is None:
            return None
        old, new = self.r.string(spec["from"], f"{path}.from"), self.r.string(spec["to"], f"{path}.to")
        if old is not None and old == new:
            self.r.problem(spec["to"], f"{path}.to", f"is the same as from ({old!r}): the rename does nothing")
            return None
        return RenameEvent(old, new, when) if old is not None and new is not None else None

    def _rename_property(self, node: yaml.Node, path: str, when: tuple[Predicate, ...]) -> Operation | None:
        spec = self._args(node, path, ("from", "to"), ("if_exists",))
        if spec is None:
            return None
        source, target = self._path(spec["from"], f"{path}.from"), self._path(spec["to"], f"{path}.to")
        if_exists = self.r.string(spec["if_exists"], f"{path}.if_exists") if "if_exists" in spec else "keep"
        if if_exists is not None and if_exists not in IF_EXISTS:
            self.r.problem(spec["if_exists"], f"{path}.if_exists", f"must be keep or overwrite, not {if_exists!r}")
            return None
        if source is None or target is None or if_exists is None:
            return None
        shorter = min(len(source), len(target))
        if source[:shorter] == target[:shorter]:
            relation = "the same field as" if source == target else "inside" if len(target) > len(source) else "a parent of"
            self.r.problem(spec["to"], f"{path}.to", f"{'.'.join(target)!r} is {relation} from ({'.'.join(source)!r}): rename to a separate field")
            return None
        return RenameProperty(source, target, if_exists == "overwrite", when)

    def _drop_property(self, node: yaml.Node, path: str, when: tuple[Predicate, ...]) -> Operation | None:
        target = self._path(node, path)
        return DropProperty(target, when) if target is not None else None

    def _hash_property(self, node: yaml.Node, path: str, when: tuple[Predicate, ...]) -> Operation | None:
        spec = self._args(node, path, ("path",), ("salt",))
        if spec is None:
            return None
        target = self._path(spec["path"], f"{path}.path")
        salt = self._salt(spec["salt"], f"{path}.salt") if "salt" in spec else ""
        return HashProperty(target, salt.encode("utf-8"), when) if target is not None and salt is not None else None

    def _salt(self, node: yaml.Node, path: str) -> str | None:
        """A salt must come from the environment: written into the file, anyone who reads the file could
        hash candidate values and reverse the hashes. The file's text (kept for the rules' sha256) holds
        only the reference; the value lives in the compiled op, out of its repr."""
        if id(node) in self.r.unresolved:
            return None  # the missing variable is already reported
        if "${" not in self.text[node.start_mark.index:node.end_mark.index]:
            self.r.problem(node, path, 'must come from the environment, e.g. "${PII_SALT}": a salt written in the rules file '
                                       "lets anyone who reads the file reverse the hashes")
            return None
        if not isinstance(node, yaml.ScalarNode):
            return self.r.string(node, path)  # reports a list or a mapping
        # The variable's text exactly: an unquoted reference is retyped like a literal (0x1F2E would
        # hash with "7982", 1:30 with "90"), and a non-string would be quoted back in the error.
        if not node.value.strip():
            self.r.problem(node, path, "must not be empty")  # a variable set to "", or an empty default
            return None
        text: str = node.value
        return text

    def _set_property(self, node: yaml.Node, path: str, when: tuple[Predicate, ...]) -> Operation | None:
        spec = self._args(node, path, ("path", "value"))
        if spec is None:
            return None
        target = self._path(spec["path"], f"{path}.path")
        value = self._json_value(spec["value"], f"{path}.value")
        return SetProperty(target, value, when) if target is not None and value is not _INVALID else None

    def _json_value(self, node: yaml.Node, path: str) -> Any:
        try:
            value = _CONSTRUCTOR.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.r.problem(node, path, f"unreadable value: {exc}")
            return _INVALID
        problem = _not_json(value)
        if problem:
            self.r.problem(node, path, f"must be JSON data (string, number, true/false, null, list or mapping with string keys): {problem}")
            return _INVALID
        return value

    _BUILDERS: ClassVar[dict[str, Callable[[_TransformCompiler, yaml.Node, str, tuple[Predicate, ...]], Operation | None]]] = {
        "rename_event": _rename_event,
        "rename_property": _rename_property,
        "drop_property": _drop_property,
        "hash_property": _hash_property,
        "set_property": _set_property,
    }


OPERATIONS = tuple(_TransformCompiler._BUILDERS)  # the names, in the order error messages list them
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_INVALID: Any = object()
JSON_INT_RANGE = (-(2**63), 2**64 - 1)  # what orjson.dumps accepts


def _not_json(value: Any) -> str | None:
    """Why `value` (built by YAML) cannot be sent as JSON, or None when it can."""
    if value is None or isinstance(value, (str, bool)):
        return None
    if isinstance(value, int):  # orjson encodes events, and only 64-bit integers
        return None if JSON_INT_RANGE[0] <= value <= JSON_INT_RANGE[1] else f"{value} is outside the 64-bit integer range"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value!r} is not a finite number"
    if isinstance(value, list):
        return next((reason for reason in map(_not_json, value) if reason), None)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"key {key!r} is not a string"
            reason = _not_json(item)
            if reason:
                return reason
        return None
    return f"{value!r} is a {type(value).__name__} (quote it to send it as a string)"
