"""The heads of the rules files tests build on, in one place.

`HEAD` (engine tests) is the schema version, two destinations (segment and rudderstack, at addresses
nothing is asked to answer) and one source, web. `served_head()` (tests that launch `splitter serve`)
is the same for a process whose destinations are the test's receivers. A test appends what it is
about (`cohort:`, `rules:`, more sources, a tracking plan under web) where it asserts on it, so the
rule that matters stays in the test. Tests that expect `FILE:LINE` in a message count from
`lines(HEAD)`, never from a number.

Whole decisions (an event, its context and the decision `splitter explain` prints) are pinned in
`tests/golden/decisions/<case>/`, not restated here.
"""

from __future__ import annotations

DESTINATIONS = """\
version: 1
destinations:
  segment: {kind: segment, url: "http://seg.test"}
  rudderstack: {kind: rudderstack, url: "http://rs.test"}
"""
WAREHOUSE = '  warehouse: {kind: segment, url: "http://wh.test"}\n'  # a third destination, appended to DESTINATIONS
WEB_KEY = "web-key-000001"
SOURCES = f"""\
sources:
  - name: web
    write_keys: [{WEB_KEY}]
"""

HEAD = DESTINATIONS + SOURCES
"""segment and rudderstack, the source web (last, so more sources or a `tracking_plan:` can follow)."""
HEAD_WITH_WAREHOUSE = DESTINATIONS + WAREHOUSE + SOURCES
"""HEAD with warehouse as a third destination: for splits with three arms and ramps next to one."""


def lines(text: str) -> int:
    """How many lines `text` holds: what is appended to it starts on line `lines(text) + 1`."""
    return text.count("\n")


def served_head(write_key: str, rudder_key: str | None = None, *, timeout: float | None = None, delivery: str = "") -> str:
    """The head for a launched `splitter serve`: segment at ${SEGMENT_URL} and rudderstack at
    ${RUDDERSTACK_DATA_PLANE_URL} (the test's receivers, given in the process's environment), both with
    this `timeout` and these `delivery` options when given, and the source web presenting `write_key`,
    with `rudder_key` as its RudderStack credential. Without a `rudder_key`, segment is the only destination."""
    options = (f", timeout: {timeout}" if timeout is not None else "") + (f", delivery: {{{delivery}}}" if delivery else "")
    rudderstack = f'  rudderstack: {{kind: rudderstack, url: "${{RUDDERSTACK_DATA_PLANE_URL}}"{options}}}\n' if rudder_key else ""
    credentials = f'    credentials: {{rudderstack: "{rudder_key}"}}\n' if rudder_key else ""
    return f"""\
version: 1
destinations:
  segment:     {{kind: segment,     url: "${{SEGMENT_URL}}"{options}}}
{rudderstack}sources:
  - name: web
    write_keys: ["{write_key}"]
{credentials}"""
