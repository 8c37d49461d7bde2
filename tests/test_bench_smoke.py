"""`python -m loadtest.bench --quick` end to end: the harness runs, stops, and checks delivery.

A smoke test of the benchmark harness, not a measurement: it asserts the report's structure and
that every event reached the receivers, never a speed. It needs wrk and nginx (`make test` installs
both); nginx split+mirror, splitter and the stalled-upstream scenario cover every moving part
(nginx config, open-loop generator, spool drain), and direct always runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson

from loadtest.openloop import encode_requests, run_open_loop
from loadtest.payloads import Payload, delivered
from loadtest.receivers import start_receiver
from tests.system_tools import needs

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"scenario", "payload", "requests_per_s", "events_per_s", "cpu_us_per_event", "cpu_us_per_request",
            "peak_rss_mb", "steady_rss_mb", "delivered", "delivery", "latency"}


@needs("nginx", "wrk")
def test_quick_bench_runs_and_every_event_is_delivered(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    finished = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--quick", "--only", "nginx-split", "--only", "splitter", "--only", "stall", "--json", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    results = json.loads(report.read_text())
    rows = {(row["scenario"], row.get("payload")): row for row in results["rows"]}
    assert set(rows) == {
        ("direct", "batch"), ("direct", "single /v1/t"), ("direct", "single /v1/track"),
        ("nginx split+mirror", "batch"), ("nginx split+mirror", "single /v1/track"),
        ("splitter", "batch"), ("splitter", "single /v1/t"), ("splitter", "single /v1/track"),
    }
    for row in rows.values():
        assert set(row) >= ROW_KEYS, row
        assert row["delivered"], row
        assert row["latency"]["scheduled"] > 0 and {"p50_ms", "p99_ms", "saturated", "achieved_per_s"} <= set(row["latency"])
    assert rows[("splitter", "batch")]["delivery"].startswith("exactly")
    assert rows[("splitter", "single /v1/t")]["delivery_open_loop"] in ("exactly", "all, split within in-flight")
    assert rows[("splitter", "batch")]["cpu_us_per_event"] is not None and rows[("direct", "batch")]["cpu_us_per_event"] is None
    stall = results["stall"]
    assert stall["delivered"] and stall["drain_seconds"] is not None and stall["samples"]
    assert {target["target"] for target in results["targets"]} >= {
        "batch split+mirror <= 10 µs proxy CPU/event", "steady RSS < 150 MB", "bounded memory with stalled upstreams"}
    assert "targets" in finished.stdout and "splitter" in finished.stdout


async def test_open_loop_sends_at_its_rate_and_counts_every_answer() -> None:
    """In-process against a real receiver: every scheduled request is sent once, answered, and counted;
    a refusing receiver shows up as errors, not as latencies."""
    bodies = [orjson.dumps({"type": "track", "event": "E", "userId": f"u{i}", "messageId": f"m{i}"}) for i in range(7)]
    async with await start_receiver("segment", record=False) as receiver:
        requests = encode_requests(receiver.url.removeprefix("http://"), "/v1/track", bodies, "Basic a2V5Og==")
        result = await run_open_loop(receiver.url, requests, rate=200, seconds=0.25, connections=4)
        assert (result.scheduled, result.answered, result.errors, receiver.receiver.count) == (50, 50, 0, 50)
        assert result.p50_ms is not None and result.p99_ms is not None and result.max_ms is not None
        receiver.receiver.faults.update({"status": 503})
        refused = await run_open_loop(receiver.url, requests, rate=200, seconds=0.1, connections=2)
        assert (refused.answered, refused.errors, refused.p99_ms, refused.saturated) == (0, 20, None, True)


def test_delivery_check_is_exact_for_alike_bodies_and_windowed_for_single_calls() -> None:
    batch = Payload("batch", "/v1/batch", [b"{}"] * 2, 50, [(50, 15)] * 2)
    assert delivered(batch, segment=50 * 10, rudder=15 * 10, answered=9, in_flight=2) == (True, True)
    assert delivered(batch, segment=50 * 10, rudder=15 * 10 - 1, answered=9, in_flight=2) == (False, False)
    assert delivered(batch, segment=50 * 12, rudder=15 * 12, answered=9, in_flight=2) == (False, False)  # more than was sent
    singles = Payload("single /v1/t", "/v1/t", [b"{}"] * 4, 1, [(1, 1), (1, 0), (1, 0), (1, 0)])
    # 8 delivered of which the first 6 for sure: RudderStack holds 2 (positions 0 and 4) or 3 (if 8 was sent instead of 7)
    assert delivered(singles, segment=8, rudder=2, answered=8, in_flight=2) == (True, False)
    assert delivered(singles, segment=8, rudder=3, answered=8, in_flight=2) == (True, False)
    assert delivered(singles, segment=8, rudder=4, answered=8, in_flight=2) == (False, False)
    assert delivered(singles, segment=8, rudder=2, answered=8, in_flight=0) == (True, True)  # nothing in flight: exact
    assert delivered(singles, segment=8, rudder=3, answered=8, in_flight=0) == (False, False)
