"""An event's name and the shape of its data: what the event catalog learns from one event.

The catalog keeps no values, only shapes: which property paths an event has and the JSON type of
each, so that a team can see what its apps send (and write a tracking plan from it) without the
proxy holding anyone's data. The one exception, a sample payload a rules file may ask for, is built
here with every string masked except the paths the file allows.

Pure functions of a parsed event, called by the catalog only for the events it samples. The name
rule (`NAME_FIELDS`) is also what `prepare()` files each event under for delivery, so the catalog,
the spool and the ledger call an event by the same name.

**Paths.** `properties.*` and `traits.*` (and `context.traits.*`) are walked into nested objects,
written with dots (`properties.cart.currency`), up to `max_depth` keys below the container. Arrays
are a type of their own; their items' types are recorded under `PATH[]` and objects in them are
walked too (`properties.products[].sku`), looking at the first `MAX_ITEMS` items. Of `context`, only
its own keys are recorded (`context.ip`, `context.library`: what the SDK fills in), plus its
`traits`. A container that is not an object (`properties: "x"`) is recorded as itself, since that is
what a plan would flag. Types are the JSON Schema ones of the tracking plans (`tracking.type_of`):
`string`, `number`, `integer` (a number without a fraction: `3` and `3.0`), `boolean`, `object`,
`array`, `null`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.engine.masking import MASK
from proxy.engine.tracking import type_of

NAME_FIELDS = {"track": "event", "page": "name", "screen": "name"}  # an event's name: this field if a string, else its type
CONTAINERS = ("properties", "traits")  # walked into; plus context.traits
OTHER = "(other)"  # paths (and event names) past a cap are counted under this
MAX_ITEMS = 10  # items of one array looked into
MAX_PATH_CHARS = 200  # a longer path (an odd key) is counted under OTHER
MAX_SAMPLE_STRING = 200  # an unmasked string in a sample payload is cut to this many characters

Shape = dict[str, set[str]]  # path -> the JSON types it had in one event (several for mixed array items)


def event_name(event: Mapping[str, Any], event_type: str) -> str:
    """Track `event`, page and screen `name`; else, or when that is not a string, the type."""
    field = NAME_FIELDS.get(event_type)
    if field is None:
        return event_type
    name = event.get(field)
    return name if type(name) is str else event_type


class _Walk:
    """One event's walk: the shape so far and its limits."""

    __slots__ = ("max_depth", "max_paths", "shape")

    def __init__(self, max_depth: int, max_paths: int) -> None:
        self.shape: Shape = {}
        self.max_depth = max_depth
        self.max_paths = max_paths

    def add(self, path: str, json_type: str) -> None:
        shape = self.shape
        types = shape.get(path)
        if types is None:
            if len(shape) >= self.max_paths or len(path) > MAX_PATH_CHARS:
                path = OTHER
                types = shape.get(OTHER)
            if types is None:
                types = shape[path] = set()
        types.add(json_type)

    def value(self, path: str, value: Any, depth: int) -> None:
        """Record `value` at `path` (`depth` keys below its container) and walk into it if it is an object or an array."""
        json_type = type_of(value)
        self.add(path, json_type)
        if depth >= self.max_depth:
            return
        if json_type == "object":
            self.members(path, value, depth + 1)
        elif json_type == "array":
            item_path = path + "[]"
            for item in value[:MAX_ITEMS]:  # an item sits at its array's depth (`products[].sku` is two keys deep), an array in an array one deeper
                self.value(item_path, item, depth + 1 if type(item) is list else depth)

    def members(self, prefix: str, value: Mapping[str, Any], depth: int) -> None:
        for key, member in value.items():
            self.value(f"{prefix}.{key}", member, depth)


def event_shape(event: Mapping[str, Any], max_depth: int, max_paths: int) -> Shape:
    """The property paths of one event and their JSON types; at most `max_paths` paths, the rest under OTHER."""
    walk = _Walk(max_depth, max_paths)
    for container in CONTAINERS:
        if container in event:
            _container(walk, container, event[container])
    context = event.get("context")
    if type(context) is dict:
        for key, value in context.items():
            path = f"context.{key}"
            if key == "traits":
                _container(walk, path, value)
            else:
                walk.add(path, type_of(value))
    elif context is not None:
        walk.add("context", type_of(context))
    return walk.shape


def _container(walk: _Walk, path: str, value: Any) -> None:
    if type(value) is dict:
        walk.members(path, value, 1)
    else:
        walk.add(path, type_of(value))


def masked_sample(event: Mapping[str, Any], unmasked: frozenset[str], secrets: frozenset[str]) -> dict[str, Any]:
    """A copy of `event` fit to keep: every string is MASK except at a path in `unmasked` (written as
    in the catalog: `properties.plan`, `context.library.name`, `properties.products[].sku`), `type` and
    the event's name field. A string equal to one of `secrets` (the write keys and credentials) is
    masked even there, and any `writeKey` member is left out. Numbers, booleans and null are kept;
    arrays are cut to their first MAX_ITEMS items."""
    event_type = event.get("type")
    kept = {"type"}
    if isinstance(event_type, str) and event_type in NAME_FIELDS:
        kept.add(NAME_FIELDS[event_type])
    return {key: _masked(value, key, unmasked | kept, secrets) for key, value in event.items() if key != "writeKey"}


def _masked(value: Any, path: str, unmasked: frozenset[str] | set[str], secrets: frozenset[str]) -> Any:
    if type(value) is str:
        if path in unmasked and value not in secrets:
            return value if len(value) <= MAX_SAMPLE_STRING else value[: MAX_SAMPLE_STRING - 3] + "..."
        return MASK
    if type(value) is dict:
        return {key: _masked(member, f"{path}.{key}", unmasked, secrets) for key, member in value.items() if key != "writeKey"}
    if type(value) is list:
        return [_masked(item, path + "[]", unmasked, secrets) for item in value[:MAX_ITEMS]]
    return value
