"""Compile the rules file's `catalog:` section into `CatalogSettings`: how the event catalog counts and samples.

In the rules file rather than in `serve` flags: the caps and the sampling are about the data (how
many event names a source may have, which paths may be shown unmasked), they differ per deployment
the way the rules do, and a reload changes them without a restart. Every key has a default, so a
file without the section gets the catalog on with Segment's own bounds (4,000 events per source,
300 properties per event) and no payloads kept. See docs/configuration.md, "Event catalog".
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import yaml

from proxy.engine.yaml_reader import NodeReader

CATALOG_KEYS = ("enabled", "max_events", "max_paths", "max_depth", "schema_samples", "sample_every", "snapshot_interval", "payload_samples",
                "unmasked_paths")
# key -> (smallest, largest) for the whole-number keys
_LIMITS = {"max_events": (1, 100_000), "max_paths": (1, 10_000), "max_depth": (1, 10), "schema_samples": (0, 1_000_000), "sample_every": (1, 1_000_000)}
_INTERVAL = (Decimal("0.1"), Decimal(3600))  # snapshot_interval, seconds


@dataclass(frozen=True, slots=True)
class CatalogSettings:
    """How the event catalog counts and samples; the defaults are what a file without `catalog:` gets."""

    enabled: bool = True
    max_events: int = 4000  # event names (type + name) per source; more are counted under `(other)`
    max_paths: int = 300  # property paths per event name; more are counted under `(other)`
    max_depth: int = 3  # keys below properties/traits/context.traits that paths go down to
    schema_samples: int = 100  # every request's first event of a name has its paths read until the name has this many samples...
    sample_every: int = 100  # ...then about one event in this many
    snapshot_interval: float = 10.0  # seconds between writes of the catalog to the state directory
    payload_samples: bool = False  # keep one masked example payload per event name
    unmasked_paths: frozenset[str] = frozenset()  # paths whose strings a payload sample shows as they are


def catalog_settings(reader: NodeReader, node: yaml.Node | None) -> CatalogSettings:
    """The `catalog` section; absent: the defaults. `catalog: off` (or `false`) turns the catalog off."""
    if node is None:
        return CatalogSettings()
    if isinstance(node, yaml.ScalarNode):
        return CatalogSettings(enabled=reader.boolean(node, "catalog") is not False)
    spec = reader.mapping(node, "catalog", CATALOG_KEYS)
    if spec is None:
        return CatalogSettings()
    values: dict[str, object] = {}
    for key in ("enabled", "payload_samples"):
        if key in spec and (flag := reader.boolean(spec[key], f"catalog.{key}")) is not None:
            values[key] = flag
    for key, (low, high) in _LIMITS.items():
        if key in spec and (number := _whole(reader, spec[key], f"catalog.{key}", low, high)) is not None:
            values[key] = number
    if "snapshot_interval" in spec:
        seconds = reader.duration(spec["snapshot_interval"], "catalog.snapshot_interval")
        if seconds is not None and not _INTERVAL[0] <= seconds <= _INTERVAL[1]:
            reader.problem(spec["snapshot_interval"], "catalog.snapshot_interval", f"must be between 100ms and 1h, not {seconds.normalize():f}s")
        elif seconds is not None:
            values["snapshot_interval"] = float(seconds)
    if "unmasked_paths" in spec:
        values["unmasked_paths"] = frozenset(_paths(reader, spec["unmasked_paths"]))
    return CatalogSettings(**values)  # type: ignore[arg-type]  # each value was read as its field's type above


def _whole(reader: NodeReader, node: yaml.Node, path: str, low: int, high: int) -> int | None:
    number = reader.number(node, path)
    if number is None:
        return None
    if number != number.to_integral_value() or not low <= number <= high:
        reader.problem(node, path, f"must be a whole number between {low} and {high:,}, not {number.normalize():f}")
        return None
    return int(number)


def _paths(reader: NodeReader, node: yaml.Node) -> list[str]:
    paths = []
    for text, item in reader.strings(node, "catalog.unmasked_paths"):
        if any(not part for part in text.removesuffix("[]").replace("[].", ".").split(".")):
            reader.problem(item, "catalog.unmasked_paths",
                           f"{text!r} is not a path (names separated by dots, e.g. properties.plan or properties.products[].sku)")
        else:
            paths.append(text)
    return paths
