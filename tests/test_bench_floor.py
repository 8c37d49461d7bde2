"""`python -m loadtest.floor` end to end: every piece is measured, every server stops, the verdicts add up.

A smoke test of the harness, not a measurement: it checks the report's structure and its arithmetic,
never a speed. It needs wrk (`make test` installs it; without it the test skips naming the package).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.system_tools import needs

ROOT = Path(__file__).resolve().parent.parent
PORT = "splitter's ingest port, read and answer"
PREPARE, FRAMING = "prepare() (parse, validate, route, encode, file)", "spool framing (primary + mirror records)"
WRITE, SEND = "spool write (primary + mirror records, page cache)", "upstream sends (batched POSTs, primary + mirror copies)"


@needs("wrk")
def test_floor_measures_each_piece_and_compares_it_with_the_targets(tmp_path: Path) -> None:
    report, scratch = tmp_path / "floor.json", tmp_path / "tmp"
    scratch.mkdir()  # the spool write's parent (tempfile.gettempdir(), as for the bench's spool): empty again at the end
    finished = subprocess.run([sys.executable, "-m", "loadtest.floor", "--seconds", "1", "--json", str(report)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, TMPDIR=str(scratch)))
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
    assert pieces[WRITE] > 0
    send = result["upstream_send"]  # over HTTP from the pinned --send process, per event of the load
    assert send["name"] == SEND and send["cpu_us_per_event"] > 0 and send["non_2xx"] == 0 and send["passes"] >= 1, send
    assert send["events"] == 200 * 50 and send["copies"] > send["events"]  # primary and mirror copies: more than one per event
    assert set(send["destinations"]) == {"segment", "rudderstack"} and send["requests_per_pass"] == sum(send["destinations"].values())
    assert send["events_per_request"] == pytest.approx(send["copies"] / send["requests_per_pass"])
    assert send["events_per_request"] <= 500  # batch_max_events, the default of proxy/delivery/options.py
    floor_pieces = result["floor_pieces"]
    assert floor_pieces == pytest.approx({PORT: http[PORT]["cpu_us_per_event"], PREPARE: prepare, FRAMING: pieces[FRAMING], WRITE: pieces[WRITE],
                                          SEND: send["cpu_us_per_event"]})
    assert result["floor_us_per_event"] == pytest.approx(sum(floor_pieces.values()))
    singles = result["single_in_process_us"]
    assert set(singles) == set(result["single_floor_us"]) == set(result["single_floor_pieces"]) == {"/v1/t", "/v1/track"}
    for path, parts in singles.items():  # a single call is one event: per event = per request
        assert parts[PREPARE] > 0 and parts[FRAMING] > 0 and parts[WRITE] > 0
        expected = {PORT: http[f"{PORT}, single"]["cpu_us_per_request"], PREPARE: parts[PREPARE], FRAMING: parts[FRAMING], WRITE: parts[WRITE],
                    SEND: send["cpu_us_per_event"]}  # the sender batches single calls: the batched send's cost per event
        assert result["single_floor_pieces"][path] == pytest.approx(expected)
        assert result["single_floor_us"][path] == pytest.approx(sum(expected.values()))
    targets = {row["target"]: row for row in result["targets"]}
    assert set(targets) == {"batch, interval: ≤ 10 µs proxy CPU/event", "batch, interval: ≤ 1.3× the forwarder's CPU/event",
                            "batch, fsync: ≤ 12 µs proxy CPU/event", "single /v1/t: ≤ 150 µs CPU/request", "single /v1/track: ≤ 150 µs CPU/request"}
    forwarder_target = targets["batch, interval: ≤ 1.3× the forwarder's CPU/event"]
    assert forwarder_target["limit_us"] == pytest.approx(http["aiohttp forwarder"]["cpu_us_per_event"] * 1.3)
    for row in targets.values():
        assert row["below_floor"] == (row["floor_us"] > row["limit_us"]), row
    assert targets["single /v1/t: ≤ 150 µs CPU/request"]["floor_us"] == result["single_floor_us"]["/v1/t"]
    assert "floor = ingest port read and answer + prepare() + spool framing + spool write + upstream sends" in finished.stdout
    assert not list(scratch.iterdir())  # the spool write's files and the send plan are removed
