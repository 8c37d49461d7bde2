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
PORT = "splitter's ingest port, read and answer"
PREPARE, FRAMING = "prepare() (parse, validate, route, encode, file)", "spool framing (primary + mirror records)"


@needs("wrk")
def test_floor_measures_each_piece_and_compares_it_with_the_targets(tmp_path: Path) -> None:
    report = tmp_path / "floor.json"
    finished = subprocess.run([sys.executable, "-m", "loadtest.floor", "--seconds", "1", "--json", str(report)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    result = json.loads(report.read_text())
    http = {row["name"]: row for row in result["http"]}
    assert set(http) == {"direct", "aiohttp, read and answer", PORT, f"{PORT}, single", "bare asyncio protocol", "aiohttp forwarder"}
    assert http["direct"]["cpu_us_per_event"] is None  # no proxy process to measure
    for name in ("aiohttp, read and answer", PORT, f"{PORT}, single", "bare asyncio protocol", "aiohttp forwarder"):
        row = http[name]
        assert row["events_per_s"] > 0 and row["non_2xx"] == 0, row
        events = 1 if row["payload"].startswith("single") else 50
        assert row["cpu_us_per_event"] == pytest.approx(row["cpu_us_per_request"] / events)
    assert http[f"{PORT}, single"]["payload"] == "single /v1/track"
    pieces = result["in_process_us_per_event"]
    assert all(value > 0 for value in pieces.values()), pieces
    prepare = pieces[PREPARE]
    assert prepare > pieces["orjson parse"]  # prepare() parses the body too, and does more
    assert result["floor_us_per_event"] == pytest.approx(http[PORT]["cpu_us_per_event"] + prepare + pieces[FRAMING])
    singles = result["single_in_process_us"]
    assert set(singles) == set(result["single_floor_us"]) == {"/v1/t", "/v1/track"}
    for path, parts in singles.items():  # a single call is one event: per event = per request
        assert parts[PREPARE] > 0 and parts[FRAMING] > 0
        assert result["single_floor_us"][path] == pytest.approx(http[f"{PORT}, single"]["cpu_us_per_request"] + parts[PREPARE] + parts[FRAMING])
    targets = {row["target"]: row for row in result["targets"]}
    assert set(targets) == {"batch, interval: ≤ 10 µs proxy CPU/event", "batch, interval: ≤ 1.3× the forwarder's CPU/event",
                            "batch, fsync: ≤ 12 µs proxy CPU/event", "single /v1/t: ≤ 150 µs CPU/request", "single /v1/track: ≤ 150 µs CPU/request"}
    forwarder_target = targets["batch, interval: ≤ 1.3× the forwarder's CPU/event"]
    assert forwarder_target["limit_us"] == pytest.approx(http["aiohttp forwarder"]["cpu_us_per_event"] * 1.3)
    for row in targets.values():
        assert row["below_floor"] == (row["floor_us"] > row["limit_us"]), row
    assert targets["single /v1/t: ≤ 150 µs CPU/request"]["floor_us"] == result["single_floor_us"]["/v1/t"]
    assert "floor = ingest port read and answer + prepare() + spool framing" in finished.stdout
