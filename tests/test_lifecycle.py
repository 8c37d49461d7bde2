"""`proxy.server.Server`, the one lifecycle owner, in process: start-up, a failed start's unwind, stop.

Real sockets on loopback and a real spool directory; the only stand-in is a socket that holds a
port, the way another process would. Also the structure the lifecycle relies on: every rule set
goes through the installer (so delivery has a new destination before any request names it), the
server never imports its worker or supervisor, and the exit codes are defined once.
"""

from __future__ import annotations

import ast
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from proxy.exits import BAD_RULES, OK, STARTUP_FAILURE
from proxy.server import Server, StartupFailed, addresses
from proxy.settings import ServeSettings
from tests.proxy_harness import DEFAULT_RULES, proxy_stack

PROXY = Path(__file__).resolve().parent.parent / "proxy"
ENV = {"SEGMENT_URL": "http://127.0.0.1:9", "RUDDERSTACK_URL": "http://127.0.0.1:9"}


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port another process is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def settings(tmp_path: Path, **overrides: object) -> ServeSettings:
    rules = tmp_path / "rules.yaml"
    if not rules.exists():
        rules.write_text(DEFAULT_RULES)
    values: dict[str, object] = {"config": str(rules), "listen": ("127.0.0.1", 0), "admin": ("127.0.0.1", 0), "drain_timeout": 0.5,
                                 "spool_dir": str(tmp_path / "spool"), "dead_letter_dir": str(tmp_path / "dead-letter"),
                                 "state_dir": str(tmp_path / "state"), **overrides}
    return ServeSettings(**values)  # type: ignore[arg-type]


async def test_a_start_that_fails_at_the_admin_port_unwinds_what_had_started(tmp_path: Path, held_port: int) -> None:
    ingress_port = free_port()
    failing = Server(settings(tmp_path, listen=("127.0.0.1", ingress_port), admin=("127.0.0.1", held_port)), ENV, handle_signals=False)
    with capture_logs() as logs, pytest.raises(StartupFailed) as failed:
        await failing.startup()
    assert failed.value.code == STARTUP_FAILURE
    [line] = [r for r in logs if r["event"] == "listen_failed"]
    assert line["admin"] == f"127.0.0.1:{held_port}" and line["listen"] == f"127.0.0.1:{ingress_port}"
    assert refused(ingress_port)  # the ingress port it had bound is closed again
    assert not failing.is_ready()

    # The spool lock went with it: a second process starts on the same spool, then stops cleanly.
    second = Server(settings(tmp_path, listen=("127.0.0.1", ingress_port)), ENV, handle_signals=False)
    await second.startup()
    assert second.is_ready() and not refused(ingress_port)
    assert second.admin is not None and len(addresses(second.admin)) == 1
    await second.shutdown()
    assert refused(ingress_port) and not second.is_ready()


async def test_bad_rules_stop_start_up_before_anything_is_touched(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text("version: 1\nrules: nope\n")
    server = Server(settings(tmp_path), ENV, handle_signals=False)
    with capture_logs() as logs, pytest.raises(StartupFailed) as failed:
        await server.startup()
    assert failed.value.code == BAD_RULES
    assert [r["event"] for r in logs] == ["config_invalid"]
    assert not (tmp_path / "spool").exists()  # the spool was never locked nor created


async def test_serve_returns_ok_once_stopped(tmp_path: Path) -> None:
    server = Server(settings(tmp_path), ENV, handle_signals=False)
    server.stopping.set()  # as SIGTERM does; serve() starts, sees it, drains and stops
    assert await server.serve() == OK
    assert not server.is_ready()


async def test_a_reload_gives_delivery_a_new_destination_before_any_request_names_it() -> None:
    async with proxy_stack() as stack:
        with_extra = DEFAULT_RULES.replace("sources:", '  extra: {kind: segment, url: "${SEGMENT_URL}", timeout: 5}\nsources:', 1)
        Path(stack.proxy.settings.config).write_text(with_extra)
        assert not (stack.delivery.spool_dir / "extra").exists()
        assert (await stack.reloader.reload("admin")).status == "success"
        assert (stack.delivery.spool_dir / "extra").is_dir()  # recovered and its sender started, by the installer
        assert stack.metric("splitter_spool_records", destination="extra") == 0.0
        assert "extra" in stack.active.current.destinations


def imports(path: Path) -> tuple[set[str], list[str]]:
    """(modules imported at the top level, `proxy` modules imported inside functions) by `path`."""
    tree = ast.parse(path.read_text())
    top = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    nested = [node.module for function in ast.walk(tree) if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
              for node in ast.walk(function) if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proxy")]
    return top, nested


def test_the_server_imports_neither_its_worker_nor_its_supervisor() -> None:
    top, nested = imports(PROXY / "server.py")
    assert not {"proxy.process.worker", "proxy.process.supervisor", "proxy.cli"} & top and nested == []
    for name in ("process/worker.py", "process/supervisor.py"):
        assert imports(PROXY / name)[1] == [], f"{name} imports proxy modules inside functions"


def test_exit_codes_are_defined_once() -> None:
    """Only proxy/exits.py gives a value to an exit code's name (delivery's `OK` is an Outcome, not a code)."""
    names = {"OK", "BAD_RULES", "BAD_INPUT", "STARTUP_FAILURE", "WORKER_KILLED"}
    defined = [
        (path.name, target.id)
        for path in PROXY.rglob("*.py")
        for node in ast.parse(path.read_text()).body if isinstance(node, ast.Assign) and not isinstance(node.value, ast.Call)
        for target in node.targets if isinstance(target, ast.Name) and target.id in names
    ]
    assert sorted(defined) == sorted(("exits.py", name) for name in names)
