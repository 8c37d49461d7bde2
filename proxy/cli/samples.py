"""Reading sample events for `splitter explain` and `splitter simulate`.

Accepts what an operator has at hand: one event as JSON, a Segment batch body (`{"batch": [...]}`,
envelope merged as the proxy would), or NDJSON where each line is either. Bad lines are reported
with their line number rather than skipped, so a sample is never silently smaller than it looks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.engine import events_of_body


class InputError(ValueError):
    """An input file that is not events; the message names the line."""


@dataclass(frozen=True, slots=True)
class SampleEvent:
    event: dict[str, Any]
    write_key: str | None  # the writeKey the body named, if any
    where: str  # "NAME:LINE" or "NAME:LINE[index]", for messages


def read_events(text: str, name: str) -> list[SampleEvent]:
    stripped = text.strip()
    if not stripped:
        raise InputError(f"{name}: no events in input")
    try:
        bodies = [(1, orjson.loads(stripped))]
    except orjson.JSONDecodeError:
        bodies = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                bodies.append((number, orjson.loads(line)))
            except orjson.JSONDecodeError as exc:
                raise InputError(f"{name}:{number}: invalid JSON: {exc}") from None
    samples: list[SampleEvent] = []
    for number, body in bodies:
        if not isinstance(body, dict):
            raise InputError(f"{name}:{number}: expected a JSON object (an event or a batch), got {type(body).__name__}")
        events, write_key = events_of_body(body)
        is_batch = "batch" in body
        for index, event in enumerate(events):
            where = f"{name}:{number}[{index}]" if is_batch else f"{name}:{number}"
            if not isinstance(event, dict):
                raise InputError(f"{where}: event is not a JSON object")
            samples.append(SampleEvent(event, write_key, where))
    return samples
