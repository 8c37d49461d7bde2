"""Contract tests for the stand-in upstream receivers (loadtest/receivers.py).

Every proxy test trusts these receivers to accept exactly what the real Segment and
RudderStack accept, so each wire rule is checked here over real loopback sockets.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from loadtest.receivers import Faults, Receiver, RunningReceiver, start_receiver

REPO = Path(__file__).resolve().parent.parent


def basic(key: str, colon: bool = True) -> dict[str, str]:
    """Authorization header the way SDKs build it (``key:``) or the legacy colon-less way."""
    raw = f"{key}:" if colon else key
    return {"Authorization": "Basic " + base64.b64encode(raw.encode()).decode()}


def event(mid: str = "m1", **extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Clicked", "userId": "u1", "messageId": mid, **extra}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def segment() -> AsyncIterator[RunningReceiver]:
    async with await start_receiver("segment") as running:
        yield running


@pytest.fixture
async def rudder() -> AsyncIterator[RunningReceiver]:
    async with await start_receiver("rudderstack") as running:
        yield running


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    data: bytes | io.BytesIO | None = None,
) -> tuple[int, str, aiohttp.ClientResponse]:
    """POST JSON (or raw data) and return status, text and the response."""
    payload = data if data is not None else orjson.dumps(body)
    async with session.post(url, data=payload, headers=headers or {}) as resp:
        return resp.status, await resp.text(), resp


async def send(
    session: aiohttp.ClientSession, base: str, *mids: str, key: str = "k"
) -> tuple[int, str, aiohttp.ClientResponse]:
    """POST a /v1/batch of track events with these messageIds, Basic-authenticated."""
    body = {"batch": [event(mid) for mid in mids or ("m1",)]}
    return await post(session, base + "/v1/batch", body, headers=basic(key))


# ----------------------------------------------------------------------------- segment
async def test_segment_basic_auth_with_and_without_colon(segment, session) -> None:
    for i, colon in enumerate((True, False)):
        status, text, resp = await post(
            session, segment.url + "/v1/batch", {"batch": [event(f"m{i}")]},
            headers=basic("wk", colon),
        )  # fmt: skip
        assert status == 200
        assert orjson.loads(text) == {"success": True}
        assert resp.content_type == "application/json"
    assert [r.write_key for r in segment.receiver.events] == ["wk", "wk"]
    assert segment.receiver.message_ids() == ["m0", "m1"]


async def test_segment_write_key_in_body(segment, session) -> None:
    status, _, _ = await post(
        session, segment.url + "/v1/batch", {"writeKey": "body-key", "batch": [event()]}
    )
    assert status == 200
    single = {**event("m2"), "writeKey": "single-key"}
    assert (await post(session, segment.url + "/v1/track", single))[0] == 200
    assert set(segment.receiver.by_write_key()) == {"body-key", "single-key"}


async def test_segment_missing_and_unknown_key(session) -> None:
    async with await start_receiver("segment", valid_keys={"good"}) as seg:
        status, text, resp = await post(session, seg.url + "/v1/batch", {"batch": [event()]})
        body = orjson.loads(text)
        assert status == 400 and resp.content_type == "application/json"
        assert body["success"] is False and body["code"] and body["message"]
        status, text, _ = await post(
            session, seg.url + "/v1/batch", {"batch": [event()]}, headers=basic("bad")
        )
        assert status == 401 and orjson.loads(text)["success"] is False
        assert (await send(session, seg.url, key="good"))[0] == 200
        assert seg.receiver.count == 1 and seg.receiver.rejected == 2


async def test_segment_malformed_json(segment, session) -> None:
    status, text, _ = await post(
        session, segment.url + "/v1/batch", data=b"{nope", headers=basic("k")
    )
    assert status == 400
    assert orjson.loads(text) == {
        "success": False, "message": "malformed JSON", "code": "invalid_request"
    }  # fmt: skip


async def test_segment_merges_batch_envelope(segment, session) -> None:
    body = {
        "batch": [event(context={"ip": "9.9.9.9"}, integrations={"Mixpanel": True})],
        "context": {"ip": "1.1.1.1", "library": {"name": "x"}},
        "integrations": {"All": False},
    }
    assert (await post(session, segment.url + "/v1/batch", body, headers=basic("k")))[0] == 200
    (rec,) = segment.receiver.events
    assert rec.event["context"] == {"ip": "9.9.9.9", "library": {"name": "x"}}
    assert rec.event["integrations"] == {"All": False, "Mixpanel": True}
    assert rec.path == "/v1/batch"


async def test_segment_single_paths_imply_type(segment, session) -> None:
    no_type = {"userId": "u", "event": "E", "messageId": "a"}
    assert (await post(session, segment.url + "/v1/track", no_type, headers=basic("k")))[0] == 200
    short = {"anonymousId": "x", "messageId": "b"}
    assert (await post(session, segment.url + "/v1/p", short, headers=basic("k")))[0] == 200
    assert [r.event["type"] for r in segment.receiver.events] == ["track", "page"]


async def test_segment_drops_events_it_answers_200_for(segment, session) -> None:
    body = {"batch": [event("ok"), {"type": "track", "event": "E"}, {"userId": "u"}]}
    assert (await post(session, segment.url + "/v1/batch", body, headers=basic("k")))[0] == 200
    assert segment.receiver.message_ids() == ["ok"]
    assert [d.reason for d in segment.receiver.dropped] == [
        "no_user_anon_id", "missing or unknown type"
    ]  # fmt: skip


async def test_segment_size_limits(segment, session) -> None:
    big_event = event(properties={"blob": "x" * (33 * 1024)})
    status, _, _ = await post(
        session, segment.url + "/v1/batch", {"batch": [big_event]}, headers=basic("k")
    )
    assert status == 400
    many = [event(f"m{i}", properties={"blob": "x" * 30_000}) for i in range(20)]
    status, _, _ = await post(
        session, segment.url + "/v1/batch", data=io.BytesIO(orjson.dumps({"batch": many})),
        headers=basic("k"),
    )  # fmt: skip
    assert status == 400
    status, _, _ = await post(session, segment.url + "/v1/track", big_event, headers=basic("k"))
    assert status == 400
    assert segment.receiver.events == [] and segment.receiver.rejected == 3


async def test_segment_gzip_and_headers_recorded(segment, session) -> None:
    raw = gzip.compress(orjson.dumps({"batch": [event()]}))
    headers = {**basic("k"), "Content-Encoding": "gzip", "x-forwarded-for": "203.0.113.7"}
    status, _, _ = await post(session, segment.url + "/v1/batch", data=raw, headers=headers)
    assert status == 200
    (rec,) = segment.receiver.events
    assert rec.headers["X-Forwarded-For"] == "203.0.113.7"
    assert rec.headers["Authorization"] == basic("k")["Authorization"]
    assert rec.received_at <= time.monotonic()


# ------------------------------------------------------------------------- rudderstack
async def test_rudder_success_reply(rudder, session) -> None:
    status, text, resp = await post(
        session, rudder.url + "/v1/batch", {"batch": [event()]}, headers=basic("rk")
    )
    assert (status, text, resp.content_type) == (200, "ok", "text/plain")
    assert rudder.receiver.events[0].write_key == "rk"


async def test_rudder_ignores_body_write_key(rudder, session) -> None:
    body = {"writeKey": "wk", "batch": [event()]}
    status, text, resp = await post(session, rudder.url + "/v1/batch", body)
    assert (status, text) == (401, "failed to read writekey from header\n")
    assert resp.content_type == "text/plain"
    # Go's r.BasicAuth() needs the colon: base64("wk") alone is no credential.
    headers = basic("wk", colon=False)
    status, text, _ = await post(session, rudder.url + "/v1/batch", body, headers=headers)
    assert (status, text) == (401, "failed to read writekey from header\n")
    assert rudder.receiver.events == []


async def test_rudder_unknown_key(session) -> None:
    async with await start_receiver("rudderstack", valid_keys={"good"}) as rud:
        status, text, _ = await post(
            session, rud.url + "/v1/batch", {"batch": [event()]}, headers=basic("bad")
        )
        assert (status, text) == (401, "invalid write key\n")


NO_IDS = {"type": "track", "userId": "  ", "anonymousId": ""}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (NO_IDS, "request neither has anonymousId nor userId"),
        ("not-an-object", "event is not a valid rudder event"),
    ],
)
async def test_rudder_one_bad_event_rejects_request(rudder, session, bad, message) -> None:
    body = {"batch": [event("a"), bad, event("b")]}
    status, text, _ = await post(session, rudder.url + "/v1/batch", body, headers=basic("k"))
    assert (status, text) == (400, message + "\n")
    assert rudder.receiver.events == [] and rudder.receiver.count == 0


async def test_rudder_drops_envelope(rudder, session) -> None:
    item = event(context={"ip": "9.9.9.9"})
    body = {"batch": [item], "context": {"library": {"name": "x"}}, "sentAt": "2024-01-01"}
    assert (await post(session, rudder.url + "/v1/batch", body, headers=basic("k")))[0] == 200
    assert rudder.receiver.events[0].event == item


async def test_rudder_single_routes(rudder, session) -> None:
    body = {"type": "identify", "userId": "u", "messageId": "s1"}
    assert (await post(session, rudder.url + "/v1/track", body, headers=basic("k")))[0] == 200
    assert rudder.receiver.events[0].event["type"] == "track"
    assert (await post(session, rudder.url + "/v1/t", body, headers=basic("k")))[0] == 404


async def test_rudder_payload_errors(rudder, session) -> None:
    url, auth = rudder.url + "/v1/batch", basic("k")
    assert (await post(session, url, {"batch": []}, headers=auth))[:2] == (
        400, "empty batch payload\n"
    )  # fmt: skip
    assert (await post(session, url, data=b"{x", headers=auth))[:2] == (400, "invalid json\n")


async def test_rudder_gzip_and_decompressed_limit(rudder, session) -> None:
    headers = {**basic("k"), "Content-Encoding": "gzip"}
    raw = gzip.compress(orjson.dumps({"batch": [event()]}))
    assert (await post(session, rudder.url + "/v1/batch", data=raw, headers=headers))[0] == 200
    bomb = gzip.compress(b" " * (4000 * 1024 + 1))  # small on the wire, too big inflated
    status, text, _ = await post(session, rudder.url + "/v1/batch", data=bomb, headers=headers)
    assert (status, text) == (413, "request size exceeds max limit\n")
    assert rudder.receiver.count == 1


# ------------------------------------------------------------------------------ faults
@pytest.fixture(params=["segment", "rudderstack"])
async def any_kind(request) -> AsyncIterator[RunningReceiver]:
    async with await start_receiver(request.param) as running:
        yield running


async def test_down_closes_without_answer(any_kind, session) -> None:
    any_kind.receiver.faults.down = True
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await send(session, any_kind.url)
    any_kind.receiver.faults.down = False
    assert (await send(session, any_kind.url))[0] == 200
    assert (any_kind.receiver.refused, any_kind.receiver.count) == (1, 1)


async def test_reset_connections_sends_rst(any_kind, session) -> None:
    any_kind.receiver.faults.reset_connections = True
    with pytest.raises(aiohttp.ClientOSError):  # ECONNRESET
        await send(session, any_kind.url)
    assert any_kind.receiver.events == [] and any_kind.receiver.refused == 1


async def test_status_fault_uses_kind_format(any_kind, session) -> None:
    any_kind.receiver.faults.status = 500
    status, text, resp = await send(session, any_kind.url)
    assert status == 500
    if any_kind.kind == "segment":
        assert orjson.loads(text)["success"] is False
    else:
        assert resp.content_type == "text/plain" and text.endswith("\n")
    assert any_kind.receiver.events == []


async def test_429_with_retry_after(any_kind, session) -> None:
    any_kind.receiver.faults.update({"status": 429, "retry_after": 2})
    status, _, resp = await send(session, any_kind.url)
    assert status == 429 and resp.headers["Retry-After"] == "2"


async def test_delay_slows_answers(segment, session) -> None:
    segment.receiver.faults.delay = 0.2
    start = time.monotonic()
    status, _, _ = await send(session, segment.url)
    assert status == 200 and time.monotonic() - start >= 0.2


async def test_reject_message_ids_poisons_whole_request(any_kind, session) -> None:
    any_kind.receiver.faults.reject_message_ids = {"poison"}
    assert (await send(session, any_kind.url, "fine", "poison"))[0] == 400
    assert any_kind.receiver.events == [] and any_kind.receiver.refused == 1
    assert (await send(session, any_kind.url, "fine"))[0] == 200


async def test_fail_next_then_recovers(any_kind, session) -> None:
    any_kind.receiver.faults.fail_next = 2
    statuses = [(await send(session, any_kind.url, f"m{i}"))[0] for i in range(3)]
    assert statuses == [500, 500, 200]
    any_kind.receiver.faults.update({"fail_next": 1, "status": 429, "retry_after": 1})
    status, _, resp = await send(session, any_kind.url, "x")
    assert status == 429 and resp.headers["Retry-After"] == "1"
    assert (await send(session, any_kind.url, "y"))[0] == 200
    assert any_kind.receiver.faults == Faults()
    assert any_kind.receiver.message_ids() == ["m2", "y"]


# -------------------------------------------------------------------- count-only mode
async def test_count_only_mode(session) -> None:
    async with (
        await start_receiver("segment", record=False) as seg,
        await start_receiver("rudderstack", record=False) as rud,
    ):
        for running in (seg, rud):
            assert (await send(session, running.url, "a", "b", "c"))[0] == 200
            assert (running.receiver.count, running.receiver.requests) == (3, 1)
            assert running.receiver.events == []
        # RudderStack's id rule is its contract, so it holds without recording too.
        bad = {"batch": [event("d"), {"type": "track"}]}
        assert (await post(session, rud.url + "/v1/batch", bad, headers=basic("k")))[0] == 400
        assert rud.receiver.count == 3
        async with session.get(rud.url + "/_control/stats") as resp:
            stats = await resp.json()
        assert stats["count"] == 3 and "message_ids" not in stats


# ---------------------------------------------------------------------- control plane
async def test_control_plane(rudder, session) -> None:
    control = rudder.url + "/_control"
    async with session.post(control + "/faults", json={"status": 503, "fail_next": 1}) as resp:
        assert resp.status == 200 and (await resp.json())["status"] == 503
    assert (await send(session, rudder.url, "a"))[:2] == (503, "Service Unavailable\n")
    assert (await send(session, rudder.url, "b"))[0] == 200
    async with session.get(control + "/stats") as resp:
        stats = await resp.json()
    assert stats == {
        "kind": "rudderstack", "count": 1, "requests": 1, "refused": 1,
        "rejected": 0, "dropped": 0, "message_ids": ["b"],
    }  # fmt: skip
    async with session.get(control + "/events") as resp:
        (row,) = await resp.json()
    assert row["event"]["messageId"] == "b" and row["write_key"] == "k"
    async with session.post(control + "/faults", json={"stauts": 500}) as resp:
        assert resp.status == 400
    async with session.post(control + "/faults", json={"down": True, "delay": 0.1}) as resp:
        assert resp.status == 200
    assert rudder.receiver.faults.down and rudder.receiver.faults.delay == 0.1
    async with session.post(control + "/reset") as resp:
        assert (await resp.json())["count"] == 0
    assert rudder.receiver.faults == Faults() and rudder.receiver.events == []


async def test_wait_for_counts_background_deliveries(segment, session) -> None:
    task = asyncio.create_task(send(session, segment.url, "a", "b"))
    await segment.receiver.wait_for(2, timeout=2)
    await task
    with pytest.raises(TimeoutError):
        await segment.receiver.wait_for(3, timeout=0.05)


async def test_only_loopback_and_known_kinds() -> None:
    with pytest.raises(ValueError):
        await start_receiver("segment", host="0.0.0.0")
    with pytest.raises(ValueError):
        Receiver("mixpanel")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- CLI
async def test_cli_prints_urls_and_exits_on_sigterm(session) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.receivers", "--segment-port", "0",
        "--rudder-port", "0", "--rudder-keys", "k1,k2",
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        urls = orjson.loads(await asyncio.wait_for(proc.stdout.readline(), timeout=5))
        assert set(urls) == {"segment", "rudderstack"}
        assert (await send(session, urls["segment"], key="x"))[0] == 200
        assert (await send(session, urls["rudderstack"], key="x"))[0] == 401
        assert (await send(session, urls["rudderstack"], key="k2"))[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=5) == 0
        assert await proc.stdout.read() == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
