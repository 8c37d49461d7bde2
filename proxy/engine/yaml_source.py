"""Reading rules YAML into a node tree that remembers where every value came from.

`yaml.safe_load` forgets line numbers, and good errors need them, so the file is *composed* into
nodes (each has a `start_mark`) and values are built from nodes on demand by `schema.py`.

Environment references `${VAR}` and `${VAR:-default}` are expanded here, inside scalar nodes, so a
substituted value keeps the line of the reference. A plain (unquoted) scalar that held a reference
is re-typed after substitution, so `percent: ${PCT}` with `PCT=30` is the number 30, as if it had
been written literally; a quoted one stays a string.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml

from proxy.engine.errors import Problem

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_MALFORMED_REF = re.compile(r"\$\{(?![A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\})[^}]*\}?")
_RESOLVER = yaml.resolver.Resolver()


@dataclass
class Document:
    """A composed rules file plus the problems met while reading it (bad YAML, missing env vars)."""

    filename: str
    root: yaml.Node | None
    problems: list[Problem] = field(default_factory=list)
    unresolved: set[int] = field(default_factory=set)  # ids of nodes already reported: say nothing more of them


def line_of(node: yaml.Node) -> int:
    line: int = node.start_mark.line
    return line + 1


def compose(text: str, *, filename: str, env: Mapping[str, str]) -> Document:
    """Parse `text` to a node tree, expanding `${VAR}` references from `env` in place."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        message = " ".join(part for part in (exc.context, exc.problem) if part)
        return Document(filename, None, [Problem(filename, line, "", f"invalid YAML: {message}")])
    except yaml.YAMLError as exc:
        return Document(filename, None, [Problem(filename, 1, "", f"invalid YAML: {exc}")])
    document = Document(filename, root)
    if root is not None:
        _expand(root, document, env, set())
    return document


def _expand(node: yaml.Node, document: Document, env: Mapping[str, str], seen: set[int]) -> None:
    if id(node) in seen:  # an alias: expanded once; a recursive one (`&r [*r]`) must not loop forever
        return
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        _expand_scalar(node, document, env)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _expand(item, document, env, seen)
    elif isinstance(node, yaml.MappingNode):
        for _key, value in node.value:
            _expand(value, document, env, seen)


def _expand_scalar(node: yaml.ScalarNode, document: Document, env: Mapping[str, str]) -> None:
    text = node.value
    if "${" not in text:
        return
    bad = _MALFORMED_REF.search(text)
    if bad:
        document.problems.append(
            Problem(document.filename, line_of(node), "", f"malformed environment reference {bad.group(0)!r}: use ${{NAME}} or ${{NAME:-default}}")
        )
        document.unresolved.add(id(node))
        return

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                document.problems.append(
                    Problem(document.filename, line_of(node), "",
                            f"environment variable {name} is not set and has no default (write ${{{name}:-default}} to give one)")
                )
                document.unresolved.add(id(node))
                return ""
            value = default
        return value

    node.value = _ENV_REF.sub(substitute, text)
    if node.style is None:  # plain scalar: type it as if the value had been written literally
        node.tag = _RESOLVER.resolve(yaml.ScalarNode, node.value, (True, False))  # type: ignore[no-untyped-call]  # PyYAML's resolver is untyped
