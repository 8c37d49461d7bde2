"""The system programs some tests drive, the Debian package each comes from, and their installer.

One table serves both sides, so a skip message and the installer can never disagree about a
package name: `make test` runs `python tests/system_tools.py install` before pytest (as root with
apt it installs what is missing, quietly; elsewhere it prints the one command to run), and a test
that needs a program takes `needs("nginx")`, which skips with that package's name when the program
is absent. On a machine where the install worked nothing skips.

Stdlib only: it runs before anything else is known to be installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

CLIENTS_DIR = Path(__file__).resolve().parent / "clients"  # the npm SDKs the client tests drive
EXTRA_DIRS = ("/usr/sbin", "/sbin", "/usr/bin")  # nginx lives in sbin, which a non-root PATH often lacks


PYTHON_HEADERS = "Python.h"  # not a program: found where this interpreter's headers belong (see find)


@dataclass(frozen=True)
class Tool:
    program: str
    package: str
    used_by: str


TOOLS = (
    Tool("nginx", "nginx", "the benchmark smoke test's nginx baselines"),
    Tool("wrk", "wrk", "the benchmark smoke test's load generator"),
    Tool("node", "nodejs", "the Node and browser SDK tests"),
    Tool("npm", "npm", "installing the SDKs those tests drive"),
    Tool("chromium", "chromium", "the analytics.js browser tests"),
    Tool("promtool", "prometheus", "validating the shipped alert rules"),
    Tool("systemd-analyze", "systemd", "validating the shipped systemd unit"),
    Tool("redis-server", "redis-server", "the shared de-duplication store's tests (started on a loopback port by the tests)"),
    Tool("cc", "build-essential", "building the compiled prepare() at install (setup.py), which its tests check"),
    Tool(PYTHON_HEADERS, "python3-dev", "this Python's headers, for that build (a Python built from source has its own)"),
)
BUILD_TOOLS = ("cc", PYTHON_HEADERS)  # installed on their own, first: a missing package elsewhere must not cost the build
BY_PROGRAM = {tool.program: tool for tool in TOOLS}


def search_path() -> str:
    """Where programs are looked for: SPLITTER_TOOLS_PATH when set (the installer's own test uses it), else PATH and sbin."""
    override = os.environ.get("SPLITTER_TOOLS_PATH")
    if override is not None:
        return override
    return os.pathsep.join([os.environ.get("PATH", ""), *EXTRA_DIRS])


def find(program: str) -> str | None:
    """The program's path, or None; for PYTHON_HEADERS, this interpreter's Python.h (the virtualenv's
    base interpreter is the one `make` runs this with)."""
    if program == PYTHON_HEADERS:
        header = Path(sysconfig.get_paths()["include"]) / PYTHON_HEADERS
        return str(header) if header.exists() and os.environ.get("SPLITTER_TOOLS_PATH") is None else None
    return shutil.which(program, path=search_path())


def missing(programs: tuple[str, ...] | None = None) -> list[Tool]:
    wanted = TOOLS if programs is None else tuple(BY_PROGRAM[name] for name in programs)
    return [tool for tool in wanted if find(tool.program) is None]


def install_command(tools: list[Tool]) -> str:
    packages = " ".join(dict.fromkeys(tool.package for tool in tools))
    return f"sudo apt-get install -y --no-install-recommends {packages}"


def skip_reason(tools: list[Tool]) -> str:
    """The message a skipped test shows: what is missing, the package, and the command."""
    names = ", ".join(f"{tool.program} (Debian package {tool.package})" for tool in tools)
    return f"needs {names}: run `{install_command(tools)}`, or `make test` as root"


def needs(*programs: str) -> pytest.MarkDecorator:
    """A pytest skip marker for tests that drive these programs."""
    import pytest  # imported here: the installer runs before pytest is installed

    absent = missing(programs)
    return pytest.mark.skipif(bool(absent), reason=skip_reason(absent) if absent else "")


def can_apt() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get", path=search_path()) is not None


def apt_install(tools: list[Tool]) -> bool:
    """apt-get update and install, quietly; True when it worked. Its output is shown only on failure."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    packages = list(dict.fromkeys(tool.package for tool in tools))
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"system tools: `{' '.join(command)}` failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}", file=sys.stderr)
            return False
    return True


def npm_clients_installed() -> bool:
    """tests/clients/node_modules is there and was installed from the committed lock file as it is now."""
    marker = CLIENTS_DIR / "node_modules" / ".package-lock.json"
    lock = CLIENTS_DIR / "package-lock.json"
    return marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime


def npm_install_clients() -> bool:
    npm = find("npm")
    if npm is None:
        return False
    done = subprocess.run(
        [npm, "ci", "--prefix", str(CLIENTS_DIR), "--no-audit", "--no-fund", "--loglevel=error"],
        capture_output=True, text=True, check=False, timeout=600,
    )
    if done.returncode != 0:
        print(f"system tools: npm ci in {CLIENTS_DIR} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}", file=sys.stderr)
    return done.returncode == 0


def install() -> int:
    """Install what is missing where we can; say what to run where we cannot. Always exit 0: a
    missing program skips the tests that need it, it never fails them."""
    absent = missing()
    if absent:
        names = " ".join(tool.program for tool in absent)
        if can_apt():
            print(f"system tools: installing {names} with apt-get (first run only; a few minutes)", flush=True)
            build = [tool for tool in absent if tool.program in BUILD_TOOLS]
            for group in (build, [tool for tool in absent if tool not in build]):
                if group:
                    apt_install(group)
            absent = missing()
        if absent:
            print(f"system tools: missing {' '.join(tool.program for tool in absent)}; the tests that need them will skip.")
            print(f"system tools: to run every test, install them: {install_command(absent)}")
    if find("npm") is not None and not npm_clients_installed() and not npm_install_clients():
        print("system tools: the npm SDKs could not be installed; the client tests will try again")
    return 0


def main(argv: list[str]) -> int:
    if argv == ["install"]:
        return install()
    if argv == ["missing"]:
        for tool in missing():
            print(f"{tool.program}\t{tool.package}\t{tool.used_by}")
        return 0
    print("usage: python tests/system_tools.py install|missing", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
