"""loadtest.stretches: the event loop's busy stretches in a py-spy speedscope recording, in order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.stretches import busy_stretches, main, main_thread_samples

LOOP, HANDLE, PARSE, SEND = 0, 1, 2, 3
FRAMES = [{"name": "Runner.run", "file": "/usr/lib/python3.11/asyncio/runners.py"}, {"name": "handle", "file": "/app/handlers.py"},
          {"name": "parse_json", "file": "/app/body.py"}, {"name": "Pipeline._run", "file": "/app/pipeline.py"}]


def recording(samples: list[list[int]]) -> dict[str, object]:
    """A speedscope file as py-spy writes it: shared frames, one sampled profile per thread."""
    worker = {"type": "sampled", "name": "Thread 2 \"asyncio_0\"", "samples": [[HANDLE]] * len(samples), "weights": [1] * len(samples)}
    main = {"type": "sampled", "name": "Thread 1 \"MainThread\"", "samples": samples, "weights": [1] * len(samples)}
    return {"shared": {"frames": FRAMES}, "profiles": [worker, main]}


def test_a_stretch_is_a_run_of_busy_samples_and_is_told_by_what_ran_in_it() -> None:
    idle, handling, parsing, sending = [LOOP], [LOOP, HANDLE], [LOOP, HANDLE, PARSE], [LOOP, SEND]
    samples = main_thread_samples(recording([idle, handling, parsing, parsing, idle, sending, idle, sending, sending]))
    assert samples[2] == ["Runner.run (runners.py)", "handle (handlers.py)", "parse_json (body.py)"]  # the main thread's, not the worker's
    found = busy_stretches(samples, min_samples=2)
    assert (found.samples, found.busy, found.lengths) == (9, 6, [3, 2])  # the lone sending sample is shorter than 2: not a stretch
    assert found.callbacks == {"handle (handlers.py)": 3, "Pipeline._run (pipeline.py)": 2}
    assert found.anywhere["parse_json (body.py)"] == 2 and found.anywhere["handle (handlers.py)"] == 3
    assert found.innermost["handle (handlers.py) > parse_json (body.py)"] == 2


def test_the_command_prints_the_stretches_in_milliseconds_and_names_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "loop.json"
    profile.write_text(json.dumps(recording([[LOOP], *[[LOOP, HANDLE, PARSE]] * 10, [LOOP]])))
    assert main([str(profile), "--rate", "1000", "--min-ms", "8"]) == 0
    out = capsys.readouterr().out
    assert "1 stretches, 10 ms in all; longest 10 ms" in out and "100.0 %  handle (handlers.py)" in out
    (tmp_path / "flame.json").write_text(json.dumps({"shared": {"frames": []}, "profiles": []}))
    assert main([str(tmp_path / "flame.json")]) == 2
    assert "no sampled profile" in capsys.readouterr().err
