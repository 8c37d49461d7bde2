"""`python -m loadtest.floor` end to end: every piece is measured, every server stops, the verdicts add up.

A smoke test of the harness, not a measurement: it checks the report's structure and its arithmetic,
never a speed. It needs wrk (`make test` installs it; without it the test skips naming the package).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.system_tools import needs

ROOT = Path(__file__).resolve().parent.parent


@needs("wrk")
def test_floor_measures_each_piece_and_compares_it_with_the_targets(tmp_path: Path) -> None:
    report = tmp_path / "floor.json"
    finished = subprocess.run([sys.executable, "-m", "loadtest.floor", "--seconds", "1", "--json", str(report)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    result = json.loads(report.read_text())
    http = {row["name"]: row for row in result["http"]}
    assert set(http) == {"direct", "aiohttp, read and answer", "splitter's ingest port, read and answer", "bare asyncio protocol", "aiohttp forwarder"}
    assert http["direct"]["cpu_us_per_event"] is None  # no proxy process to measure
    for name in ("aiohttp, read and answer", "splitter's ingest port, read and answer", "bare asyncio protocol", "aiohttp forwarder"):
        row = http[name]
        assert row["events_per_s"] > 0 and row["non_2xx"] == 0, row
        assert row["cpu_us_per_event"] == pytest.approx(row["cpu_us_per_request"] / 50)
    pieces = result["in_process_us_per_event"]
    assert all(value > 0 for value in pieces.values()), pieces
    prepare = pieces["prepare() (parse, validate, route, encode, file)"]
    assert prepare > pieces["orjson parse"]  # prepare() parses the body too, and does more
    assert result["floor_us_per_event"] == pytest.approx(
        http["splitter's ingest port, read and answer"]["cpu_us_per_event"] + prepare + pieces["spool framing (primary + mirror records)"])
    targets = {row["target"]: row for row in result["targets"]}
    assert len(targets) == 3
    forwarder_target = next(row for name, row in targets.items() if "forwarder" in name)
    assert forwarder_target["limit_us"] == pytest.approx(http["aiohttp forwarder"]["cpu_us_per_event"] / 1.8)
    assert forwarder_target["below_floor"] == (result["floor_us_per_event"] > forwarder_target["limit_us"])
    assert "floor = ingest port read and answer + prepare() + spool framing" in finished.stdout
