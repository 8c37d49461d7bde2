"""The repository's own entry points: CI's script and the two Quick start commands stay runnable."""

from __future__ import annotations

import subprocess

from tests.conftest import ROOT


def test_ci_script_is_valid_bash_and_runs_the_readme_test_command() -> None:
    script = ROOT / ".ci" / "run"
    subprocess.run(["bash", "-n", str(script)], check=True)
    lines = [line.strip() for line in script.read_text().splitlines() if line.strip() and not line.strip().startswith("#")]
    assert lines[-1] == "make test"


def test_quick_start_commands_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    targets = subprocess.run(["make", "-pn", "-C", str(ROOT)], capture_output=True, text=True).stdout
    assert "\ndemo:" in targets and "\ntest:" in targets
