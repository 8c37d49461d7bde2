"""The repository's own entry points: CI's script and the two Quick start commands stay runnable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.system_tools import TOOLS, can_apt, missing


def test_ci_script_is_valid_bash_and_runs_the_readme_test_command() -> None:
    script = ROOT / ".ci" / "run"
    subprocess.run(["bash", "-n", str(script)], check=True)
    lines = [line.strip() for line in script.read_text().splitlines() if line.strip() and not line.strip().startswith("#")]
    assert lines == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "make test"]  # nothing the README's user would not run


def test_quick_start_commands_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    targets = subprocess.run(["make", "-pn", "-C", str(ROOT)], capture_output=True, text=True).stdout
    assert "\ndemo:" in targets and "\ntest:" in targets


def test_make_test_installs_the_system_tools_before_pytest() -> None:
    recipe = subprocess.run(["make", "-n", "-C", str(ROOT), "test"], capture_output=True, text=True, check=True).stdout
    assert recipe.index("tests/system_tools.py install") < recipe.index("-m pytest")


def test_every_system_tool_the_table_names_is_installed_here() -> None:
    """On this machine `make test` ran the installer first: a gap means a missing package name or a
    failed install, which would otherwise show up only as skips."""
    if not can_apt():
        return  # where apt cannot run, the skips (which name the packages) are the expected outcome
    assert missing() == [], "install failed or the table names the wrong package: run `make tools`"


def test_without_apt_the_installer_says_what_to_run_and_tests_skip_naming_the_package(tmp_path: Path) -> None:
    """A machine with neither the tools nor apt-get (an empty search path stands in for it): the
    installer exits 0 with the one command to run, and a test that needs a tool skips, naming it."""
    env = dict(os.environ, SPLITTER_TOOLS_PATH=str(tmp_path))
    installer = subprocess.run([sys.executable, "tests/system_tools.py", "install"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=60)
    assert installer.returncode == 0, installer.stderr
    packages = " ".join(dict.fromkeys(tool.package for tool in TOOLS))
    assert f"sudo apt-get install -y --no-install-recommends {packages}" in installer.stdout
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_bench_floor.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == "tests: 0 passed, 0 failed, 1 skipped", run.stdout
    assert "skipped 1: needs wrk (Debian package wrk): run `sudo apt-get install -y --no-install-recommends wrk`" in run.stdout


def test_the_engine_facade_contract_names_every_engine_module() -> None:
    """import-linter's facade contract lists the engine's modules by hand: a new one must be added there."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    facade = next(c for c in contracts if c["name"].startswith("outside the engine"))
    modules = {f"proxy.engine.{path.stem}" for path in (ROOT / "proxy" / "engine").glob("*.py") if path.stem != "__init__"}
    assert set(facade["forbidden_modules"]) == modules


def test_make_test_runs_the_style_checks_before_the_tests() -> None:
    recipe = subprocess.run(["make", "-n", "-C", str(ROOT), "test"], capture_output=True, text=True, check=True).stdout
    for check in ("mypy", "ruff check", "lint-imports"):
        assert recipe.index(check) < recipe.index("-m pytest"), check
