"""The engine is pure: no event loop, no network, no metrics, no process environment.

Reading `os.environ` inside the engine would make decisions depend on where they run; callers
pass an environment mapping in. This test reads the engine's source, so it fails the moment
someone adds such an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "proxy" / "engine"
FORBIDDEN_MODULES = {"asyncio", "aiohttp", "uvloop", "prometheus_client", "structlog", "socket", "os", "random", "time"}


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_engine_imports_nothing_with_side_effects() -> None:
    offenders = {}
    for path in sorted(ENGINE.glob("*.py")):
        bad = _imports(ast.parse(path.read_text())) & FORBIDDEN_MODULES
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_engine_imports_nothing_from_the_rest_of_splitter() -> None:
    for path in sorted(ENGINE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proxy"):
                assert node.module.startswith("proxy.engine"), f"{path.name} imports {node.module}"
