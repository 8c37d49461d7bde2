"""Delivery behaviour seen from outside: timeouts, cutting big fan-outs, credentials, draining mirrors."""

from __future__ import annotations

import time
from typing import Any

import orjson
from proxy_harness import DEFAULT_RULES, SERVER_KEY, proxy_stack

from proxy.delivery.batches import MAX_UPSTREAM_BODY


def track(i: int, **extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Clicked", "userId": f"user-{i}", "messageId": f"msg-{i}", **extra}


async def test_an_upstream_timeout_is_retried_and_the_client_is_not_kept_waiting() -> None:
    rules = DEFAULT_RULES.replace("timeout: 5, delivery: {", "timeout: 0.3, delivery: {", 1)
    async with proxy_stack(rules) as stack:
        assert stack.rules.destinations["segment"].timeout == 0.3
        stack.segment.faults.delay = 1.0
        started = time.perf_counter()
        status, body, _ = await stack.post("/v1/track", track(0), settle=False)
        assert (status, body) == (200, {"success": True})
        assert time.perf_counter() - started < 0.3  # spooled: the slow upstream is not the client's problem
        await stack.wait_metric("splitter_upstream_requests_total", 2, destination="segment", code="timeout")
        stack.segment.faults.delay = 0
        await stack.settle()
        assert [r.event for r in stack.segment.events] == [track(0)]
        assert [r.event for r in stack.rudder.events] == [track(0)]  # the other primary was never held up


async def test_fan_out_over_500_kb_is_cut_into_several_upstream_requests() -> None:
    """A 500 KB request can grow upstream (the envelope is copied into each event): bodies stay under the limit."""
    async with proxy_stack() as stack:
        envelope = {"context": {"library": {"name": "analytics-python"}, "pad": "c" * 12_000}}
        batch = [track(i, properties={"pad": "p" * 12_000}) for i in range(30)]
        body = orjson.dumps({"batch": batch, **envelope})
        assert len(body) < 500 * 1024
        status, answer, _ = await stack.post("/v1/batch", body, key=SERVER_KEY)
        assert (status, answer) == (200, {"success": True})
        for receiver in (stack.segment, stack.rudder):
            assert receiver.message_ids() == [f"msg-{i}" for i in range(30)]  # all, once, in order
            assert receiver.requests >= 2 and receiver.rejected == 0
            sizes = {int(r.headers["Content-Length"]) for r in receiver.events}
            assert len(sizes) == receiver.requests and max(sizes) <= MAX_UPSTREAM_BODY
            assert {r.headers["Content-Type"] for r in receiver.events} == {"application/json"}
            assert {r.headers["User-Agent"] for r in receiver.events} == {"splitter/0.1"}
            assert all(r.event["context"]["pad"] == "c" * 12_000 for r in receiver.events)


async def test_source_without_credentials_passes_the_client_key_through() -> None:
    rules = DEFAULT_RULES.replace(
        '    credentials: {segment: "seg-server-key-0123456789", rudderstack: "rs-server-key-0123456789"}\n',
        '    credentials: {rudderstack: "rs-server-key-0123456789"}\n',
    )
    async with proxy_stack(rules) as stack:
        status, answer, _ = await stack.post("/v1/track", track(0), key=SERVER_KEY, auth="body")
        assert (status, answer) == (200, {"success": True})
        assert [r.write_key for r in stack.segment.events] == [SERVER_KEY]
        assert [r.write_key for r in stack.rudder.events] == ["rs-server-key-0123456789"]
        assert "writeKey" not in stack.segment.events[0].event


async def test_close_drains_spooled_mirror_copies() -> None:
    async with proxy_stack(drain_timeout=3.0) as stack:
        stack.rudder.faults.delay = 0.1
        for i in range(4):
            status, _, _ = await stack.post("/v1/track", track(i, event="Mirror x"), settle=False)
            assert status == 200
        await stack.segment.wait_for(4)
        assert stack.rudder.count < 4  # still spooled when the stack starts closing
        rudder = stack.rudder
    assert rudder.message_ids() == [f"msg-{i}" for i in range(4)]  # drained, in order
    assert stack.metric("splitter_spool_records", destination="rudderstack") == 0


async def test_an_unexpected_failure_while_delivering_is_retried_not_abandoned(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A dead-letter directory that cannot be written (a file is in its way) fails the poison batch;
    the sender retries it instead of leaving it unacked, and delivers it once the path is fixed."""
    async with proxy_stack() as stack:
        blocker = stack.delivery.dead_letter_dir
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("not a directory")
        stack.segment.faults.reject_message_ids = {"msg-1"}
        status, _, _ = await stack.post("/v1/batch", {"batch": [track(0), track(1)]}, settle=False)
        assert status == 200
        await stack.segment.wait_for(1)
        await stack.wait_metric("splitter_upstream_requests_total", 4, destination="segment", code="400")  # retried
        assert stack.metric("splitter_spool_records", destination="segment") == 2  # still held, not lost
        blocker.unlink()
        await stack.settle()
        assert stack.metric("splitter_events_dead_lettered_total", destination="segment") == 1
        assert (blocker / "segment.ndjson").exists()
