"""Typed reads from YAML nodes that record a located `Problem` instead of raising.

`schema.py` walks the composed tree with these helpers; each returns None (or a safe empty value)
when the node is wrong and appends a problem naming the YAML path, so one pass reports everything.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml

from proxy.engine.errors import Problem
from proxy.engine.yaml_source import line_of

_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_KIND_NAMES = {yaml.ScalarNode: "a value", yaml.SequenceNode: "a list", yaml.MappingNode: "a mapping"}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600), None: Decimal(1)}


class NodeReader:
    """Collects problems for one file while reading values out of its nodes."""

    def __init__(self, filename: str, problems: list[Problem], unresolved: set[int] | None = None) -> None:
        self.filename = filename
        self.problems = problems
        self.unresolved = unresolved or set()
        self.key_of: dict[int, yaml.Node] = {}  # collection value -> its key, whose line is the one to report

    def problem(self, node: yaml.Node | None, path: str, message: str) -> None:
        if id(node) in self.unresolved:
            return  # its missing environment variable was already reported
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            node = self.key_of.get(id(node), node)
        self.problems.append(Problem(self.filename, line_of(node) if node is not None else 1, path, message))

    def mapping(self, node: yaml.Node, path: str, allowed: tuple[str, ...] | None = None) -> dict[str, yaml.Node] | None:
        """Keys to value nodes, in file order; unknown and duplicate keys are problems."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, path, f"must be a mapping, not {_KIND_NAMES.get(type(node), 'this')}")
            return None
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, path)
            if not isinstance(key, (str, int, float)) or isinstance(key, bool):
                self.problem(key_node, path, f"keys must be names, not {key!r}")
                continue
            key = str(key)
            child = f"{path}.{key}" if path else key
            if key in out:
                self.problem(key_node, child, "duplicate key")
                continue
            if allowed is not None and key not in allowed:
                self.problem(key_node, child, f"unknown key {key!r} (expected one of: {', '.join(allowed)})")
                continue
            out[key] = value_node
            self.key_of[id(value_node)] = key_node
        return out

    def scalar(self, node: yaml.Node, path: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.problem(node, path, f"must be a single value, not {_KIND_NAMES.get(type(node), 'this')}")
            return None
        try:
            return _CONSTRUCTOR.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.problem(node, path, f"unreadable value: {exc}")
            return None

    def string(self, node: yaml.Node, path: str, *, allow_empty: bool = False) -> str | None:
        value = self.scalar(node, path)
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
            if isinstance(node, yaml.ScalarNode):
                self.problem(node, path, f"must be a string, not {_describe(value)}")
            return None
        text = str(value) if not isinstance(value, str) else value
        if not allow_empty and not text.strip():
            self.problem(node, path, "must not be empty")
            return None
        return text

    def boolean(self, node: yaml.Node, path: str) -> bool | None:
        value = self.scalar(node, path)
        if not isinstance(value, bool):
            if isinstance(node, yaml.ScalarNode):
                self.problem(node, path, f"must be true or false, not {_describe(value)}")
            return None
        return value

    def number(self, node: yaml.Node, path: str, *, minimum: float | None = None, positive: bool = False) -> Decimal | None:
        value = self.scalar(node, path)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            if isinstance(node, yaml.ScalarNode):
                self.problem(node, path, f"must be a number, not {_describe(value)}")
            return None
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            self.problem(node, path, f"must be a number, not {value!r}")
            return None
        if not number.is_finite() or (positive and number <= 0) or (minimum is not None and number < Decimal(str(minimum))):
            bound = "greater than 0" if positive else f"at least {minimum}"
            self.problem(node, path, f"must be a number {bound}, not {value!r}")
            return None
        return number

    def percent(self, node: yaml.Node, path: str) -> tuple[Decimal | None, bool]:
        """A split percent: 0 to 100 in steps of 0.01, as (value, within those rules).

        A value over 100 or finer than 0.01 is reported but still returned, so that a split can also
        say what its percents sum to.
        """
        percent = self.number(node, path, minimum=0)
        if percent is None:
            return None, False
        fine = True
        if percent > 100:
            self.problem(node, path, f"percent {plain(percent)} is over 100")
            fine = False
        if percent != percent.quantize(Decimal("0.01")):
            self.problem(node, path, f"percent {plain(percent)} has more than two decimals (the finest step is 0.01)")
            fine = False
        return percent, fine

    def duration(self, node: yaml.Node, path: str) -> Decimal | None:
        """Seconds from `90s`, `10m`, `1h`, `250ms` or a bare number (seconds); callers check the range."""
        value = self.scalar(node, path)
        match = _DURATION.match(str(value)) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
        if match is None:
            if isinstance(node, yaml.ScalarNode):
                self.problem(node, path, f"must be a duration such as 90s, 10m or 1h (a bare number is seconds), not {value!r}")
            return None
        return Decimal(match.group(1)) * _UNIT_SECONDS[match.group(2)]

    def strings(self, node: yaml.Node, path: str) -> list[tuple[str, yaml.Node]]:
        """A string or a list of strings (a list means any of); each with its node for locating."""
        if isinstance(node, yaml.SequenceNode):
            items = []
            if not node.value:
                self.problem(node, path, "must not be an empty list")
            for index, item in enumerate(node.value):
                text = self.string(item, f"{path}[{index}]")
                if text is not None:
                    items.append((text, item))
            return items
        text = self.string(node, path)
        return [(text, node)] if text is not None else []


def plain(number: Decimal) -> str:
    """A number as written by a person: `25`, not `25.00` or `2.5E+1`."""
    return format(number.normalize(), "f")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)
