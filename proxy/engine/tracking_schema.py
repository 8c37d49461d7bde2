"""Compile `sources[].tracking_plan` (inline, or a plan file next to the rules file) into `TrackingPlan`s.

Problems are reported like every other rules-file problem, `FILE:LINE: path: message`, with FILE the
file the mistake is in: the rules file for an inline plan, the plan file otherwise. JSON Schemas are
checked against their meta-schema here, once, and the line reported is the one of the offending
keyword. Plan files are read through a `read_file` callable that `load_rules` supplies, so the
engine stays pure; a plan file is compiled once even when several sources share it.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import yaml
from jsonschema import Draft202012Validator, SchemaError
from jsonschema.validators import validator_for
from jsonschema_specifications import REGISTRY as _META_REGISTRY
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import specification_with

from proxy.engine.errors import Problem, RulesError
from proxy.engine.tracking import TYPE_NAMES, EventCheck, FieldsCheck, FieldSpec, Mode, SchemaCheck, TrackingPlan, enum_key, shown, type_allowed, type_of
from proxy.engine.yaml_reader import NodeReader
from proxy.engine.yaml_source import compose

ReadFile = Callable[[str], bytes]
PLAN_KEYS = ("mode", "allow_unplanned_events", "events", "identify")
FIELD_KEYS = ("type", "enum")
MODES = ("observe", "block")
_JSON_SCALARS = (str, int, float, bool, type(None))
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})  # values there are instances, not schemas


class PlanCompiler:
    """Collects the compiled plan of each source while `schema.py` walks `sources`."""

    def __init__(self, reader: NodeReader, env: Mapping[str, str], read_file: ReadFile | None) -> None:
        self.r = reader  # the rules file's reader: inline plans and file references are reported against it
        self.env = env
        self.read_file = read_file
        self.plans: dict[str, TrackingPlan] = {}  # source name -> plan
        self._files: dict[str, TrackingPlan | None] = {}  # resolved path -> plan (None: it had problems)

    def add(self, source: str | None, node: yaml.Node, path: str) -> None:
        """Compile one source's `tracking_plan` value; `source` is None when the source itself is invalid."""
        if isinstance(node, yaml.ScalarNode):
            plan = self._from_file(node, path)
        else:
            plan = _compile(self.r, node, path, self.r.filename, "")
        if plan is not None and source is not None:
            self.plans[source] = plan

    def _from_file(self, node: yaml.ScalarNode, path: str) -> TrackingPlan | None:
        ref = self.r.string(node, path)
        if ref is None:
            return None
        resolved = posixpath.join(posixpath.dirname(self.r.filename), ref)
        if resolved not in self._files:
            self._files[resolved] = self._read(node, path, resolved)
        return self._files[resolved]

    def _read(self, node: yaml.Node, path: str, resolved: str) -> TrackingPlan | None:
        if self.read_file is None:
            self.r.problem(node, path, f"plan file {resolved} cannot be read: these rules were not loaded from a file (use an inline plan)")
            return None
        try:
            data = self.read_file(resolved)
        except OSError as exc:
            self.r.problem(node, path, f"cannot read plan file {resolved}: {exc.strerror or exc}")
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.r.problem(node, path, f"plan file {resolved} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})")
            return None
        document = compose(text, filename=resolved, env=self.env)
        self.r.problems.extend(document.problems)
        if document.root is None:
            if not document.problems:
                self.r.problem(node, path, f"plan file {resolved} is empty")
            return None
        reader = NodeReader(resolved, self.r.problems, document.unresolved)
        return _compile(reader, document.root, "", resolved, hashlib.sha256(data).hexdigest())


def compile_plan(data: bytes, filename: str, env: Mapping[str, str]) -> TrackingPlan:
    """A plan file on its own (as `tracking_plan: FILE` would read it), or RulesError with every problem."""
    problems: list[Problem] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError([Problem(filename, 1, "", f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})")]) from None
    document = compose(text, filename=filename, env=env)
    problems.extend(document.problems)
    if document.root is None:
        raise RulesError(problems or [Problem(filename, 1, "", "the file is empty")])
    plan = _compile(NodeReader(filename, problems, document.unresolved), document.root, "", filename, hashlib.sha256(data).hexdigest())
    if plan is None or problems:
        raise RulesError(problems)
    return plan


def _compile(r: NodeReader, node: yaml.Node, path: str, origin: str, digest: str) -> TrackingPlan | None:
    """A plan from its mapping node, or None (with problems recorded) when anything in it is wrong."""
    before = len(r.problems)
    spec = r.mapping(node, path, PLAN_KEYS)
    if spec is None:
        return None
    mode: Mode = "observe"
    if "mode" in spec:
        written = r.string(spec["mode"], _join(path, "mode"))
        if written is not None and written not in MODES:
            r.problem(spec["mode"], _join(path, "mode"), f"must be observe or block, not {written!r}")
        mode = "block" if written == "block" else "observe"
    allow_unplanned = True
    if "allow_unplanned_events" in spec:
        allow_unplanned = r.boolean(spec["allow_unplanned_events"], _join(path, "allow_unplanned_events")) is not False
    events: dict[str, EventCheck] = {}
    events_path = _join(path, "events")
    for name, event_node in (r.mapping(spec["events"], events_path) or {}).items() if "events" in spec else ():
        check = _event(r, event_node, f"{events_path}.{name}", "properties")
        if check is not None:
            events[name] = check
    identify = _event(r, spec["identify"], _join(path, "identify"), "traits") if "identify" in spec else None
    if len(r.problems) > before:
        return None
    return TrackingPlan(mode, allow_unplanned, events, identify, origin, digest)


def _event(r: NodeReader, node: yaml.Node, path: str, container: str) -> EventCheck | None:
    """One planned event: `required` + `properties` (`traits` for identify), or a `json_schema`."""
    spec = r.mapping(node, path, ("required", container, "json_schema"))
    if spec is None:
        return None
    if "json_schema" in spec:
        if len(spec) > 1:
            r.problem(node, path, f"give either json_schema or required/{container}, not both")
        return _json_schema(r, spec["json_schema"], f"{path}.json_schema")
    required = tuple(name for name, _ in r.strings(spec["required"], f"{path}.required")) if "required" in spec else ()
    fields_path = f"{path}.{container}"
    fields = [
        _field(r, field_node, f"{fields_path}.{name}", name)
        for name, field_node in ((r.mapping(spec[container], fields_path) or {}).items() if container in spec else ())
    ]
    return FieldsCheck(container, required, tuple(f for f in fields if f is not None))


def _field(r: NodeReader, node: yaml.Node, path: str, name: str) -> FieldSpec | None:
    spec = r.mapping(node, path, FIELD_KEYS)
    if spec is None:
        return None
    written = r.strings(spec["type"], f"{path}.type") if "type" in spec else []
    for type_name, type_node in written:
        if type_name not in TYPE_NAMES:
            r.problem(type_node, f"{path}.type", f"unknown type {type_name!r} (expected one of: {', '.join(TYPE_NAMES)})")
    types = frozenset(t for t, _ in written if t in TYPE_NAMES)
    if "enum" not in spec:
        return FieldSpec(name, types)
    values = list(_enum_values(r, spec["enum"], f"{path}.enum", types))
    return FieldSpec(name, types, frozenset(enum_key(v) for v in values), ", ".join(shown(v) for v in values))


def _enum_values(r: NodeReader, node: yaml.Node, path: str, types: frozenset[str]) -> Iterable[object]:
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        r.problem(node, path, "must be a non-empty list of allowed values")
        return
    for index, item in enumerate(node.value):
        item_path = f"{path}[{index}]"
        value = r.scalar(item, item_path)
        if not isinstance(item, yaml.ScalarNode):
            continue  # already reported: not a single value
        if not isinstance(value, _JSON_SCALARS):
            r.problem(item, item_path, f"{item.value!r} is not a JSON value (quote it to make it a string)")
        elif not type_allowed(type_of(value), types):
            r.problem(item, item_path, f"{shown(value)} is {type_of(value)}, but the type is {' or '.join(sorted(types))}")
        else:
            yield value


def _json_schema(r: NodeReader, node: yaml.Node, path: str) -> SchemaCheck | None:
    """Build the schema from its nodes, check it against its meta-schema, compile its validator once."""
    if not isinstance(node, yaml.MappingNode):
        r.problem(node, path, "must be a JSON Schema object (a mapping)")
        return None
    try:
        schema = yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        r.problem(node, path, f"unreadable JSON Schema: {exc}")
        return None
    if "$schema" in schema and not isinstance(schema["$schema"], str):
        r.problem(_node_at(node, ["$schema"]), f"{path}.$schema", f"must be a string naming a JSON Schema dialect, not {shown(schema['$schema'])}")
        return None
    validator_class = validator_for(schema, default=Draft202012Validator)
    if "$schema" in schema and validator_for(schema, default=None) is None:  # type: ignore[arg-type]  # None is jsonschema's documented "no default"; the stubs omit it
        r.problem(_node_at(node, ["$schema"]), f"{path}.$schema", f"unknown JSON Schema dialect {schema['$schema']!r}")
        return None
    try:
        validator_class.check_schema(schema)
    except SchemaError as exc:
        where = list(exc.absolute_path)
        r.problem(_node_at(node, where), ".".join([path, *map(str, where)]), f"invalid JSON Schema: {exc.message}")
        return None
    # An empty registry: jsonschema's default one fetches a remote $ref with a blocking urlopen, on the
    # event loop; and a $ref that does not resolve would raise from every check. Both are found here.
    registry: Registry = Registry()
    specification = specification_with(validator_class.META_SCHEMA.get("$schema", ""), default=None)  # type: ignore[arg-type]  # as above
    if specification is not None:
        resolver = registry.combine(_META_REGISTRY).resolver_with_root(specification.create_resource(schema))
        before = len(r.problems)
        _check_refs(r, node, path, schema, [], resolver, specification)
        if len(r.problems) > before:
            return None
    return SchemaCheck(validator_class(schema, registry=registry))


def _check_refs(r: NodeReader, node: yaml.Node, path: str, value: object, where: list[object], resolver: Any, specification: Any) -> None:
    """Report each `$ref` in a schema that does not resolve within it (`$id`s taken into account)."""
    if isinstance(value, dict):
        if where and isinstance(specification.id_of(value), str):
            resolver = resolver.in_subresource(specification.create_resource(value))
        for keyword in ("$ref", "$dynamicRef"):
            ref = value.get(keyword)
            if not isinstance(ref, str):
                continue
            try:
                resolver.lookup(ref)
            except Unresolvable:
                at = [*where, keyword]
                r.problem(_node_at(node, at), ".".join([path, *map(str, at)]),
                          f"cannot resolve {ref!r} (a $ref must point into the same schema: nothing is fetched)")
        for key, inner in value.items():
            if key not in _DATA_KEYWORDS:
                _check_refs(r, node, path, inner, [*where, key], resolver, specification)
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            _check_refs(r, node, path, inner, [*where, index], resolver, specification)


def _node_at(node: yaml.Node, parts: Iterable[object]) -> yaml.Node:
    """The node a JSON path points at: a value's own line, or its key's line when the value is a collection."""
    located = node
    for part in parts:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if found is None:
                break
            key, node = found
            located = node if isinstance(node, yaml.ScalarNode) else key
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = located = node.value[part]
        else:
            break
    return located


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
