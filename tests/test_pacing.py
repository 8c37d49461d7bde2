"""Intake takes turns with a sender that fell behind (proxy/delivery/pacing.py), and a sender with
one batch at a time delivers it in its own runner (proxy/delivery/pipeline.py).

The pacer on a real event loop: nothing waits while no sender lags or while the loop has time; once
its probe saw the loop come around late (a pass blocked as thirty saturated requests block it), one
request per pass, in arrival order, and all at once when the lag ends. Then the whole stack on
loopback: a stand-in Segment that answers slowly makes its sender fall behind half the records kept
in memory; with the loop busy every request waits for its turn, is answered 200 and delivered;
nothing is paced with `--durability fsync`, nor for an upstream that is down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from proxy.delivery.pacing import BUSY_LATE, PROBE_EVERY, Pacer
from tests.proxy_harness import Stack, proxy_stack

PAD = "p" * 1600  # ~1.7 KB an event: a batch of 50 is ~85 KB, 60 of them more than half the 8 MB kept in memory


def big_batch(request: int) -> dict[str, Any]:
    return {"batch": [{"type": "track", "event": "Bulk", "messageId": f"r{request}-e{i}", "anonymousId": f"a{i}",
                       "properties": {"pad": PAD}} for i in range(50)]}


async def post_quietly(stack: Stack, request: int) -> int:
    status, _, _ = await stack.post("/v1/batch", big_batch(request), settle=False)
    return status


def segment_ids(stack: Stack) -> list[str]:
    return stack.segment.message_ids()


def sent_ids(requests: range) -> set[str]:
    return {f"r{r}-e{i}" for r in requests for i in range(50)}


# -- the pacer on a real loop ------------------------------------------------------------------------------


def block_the_loop(seconds: float) -> None:
    """A pass of the loop that takes `seconds`: what thirty saturated requests in one pass look like to the probe."""
    time.sleep(seconds)


async def busy_pacer(lagging: Callable[[], bool], on_paced: Callable[[], None] | None = None) -> Pacer:
    """A pacer whose probe has seen the loop come around late while `lagging()` held."""
    pacer = Pacer(lagging, on_paced)
    assert pacer.turn() is None  # lagging, but the loop has not been seen busy: straight through, and the probe starts
    block_the_loop(PROBE_EVERY + BUSY_LATE + 0.01)
    await asyncio.sleep(0.001)  # the probe's tick, late
    return pacer


async def test_nothing_waits_while_no_sender_lags() -> None:
    pacer = Pacer(lambda: False)
    assert pacer.turn() is None
    block_the_loop(0.03)
    await asyncio.sleep(PROBE_EVERY * 2)
    assert pacer.turn() is None  # no probe ran: nothing lags


async def test_a_lagging_sender_on_an_idle_loop_paces_nothing() -> None:
    """Behind for another reason than the CPU (a slow upstream, a backlog after an outage) while the
    loop has time: pacing would not help the sender, so requests go straight through."""
    pacer = Pacer(lambda: True)
    for _ in range(5):
        assert pacer.turn() is None
        await asyncio.sleep(PROBE_EVERY)  # the probe comes around on time
    assert pacer.waiting == 0


async def test_waiting_requests_go_one_per_pass_of_the_loop_in_arrival_order() -> None:
    order: list[int] = []
    paced: list[int] = []
    pacer = await busy_pacer(lambda: True, lambda: paced.append(1))

    async def request(n: int) -> None:
        turn = pacer.turn()
        assert turn is not None
        await turn
        order.append(n)

    tasks = [asyncio.ensure_future(request(n)) for n in range(5)]
    await asyncio.sleep(0)  # the tasks start and queue
    done = []
    for _ in range(5):
        await asyncio.sleep(0)
        done.append(len(order))
    assert done == [0, 1, 2, 3, 4]  # one more each pass (a request runs the pass after its turn came)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4] and len(paced) == 5 and pacer.waiting == 0


async def test_when_the_lag_ends_every_waiting_request_goes_at_once_and_newcomers_go_straight_through() -> None:
    lagging = True
    pacer = await busy_pacer(lambda: lagging)
    waiters = [pacer.turn() for _ in range(10)]
    assert all(w is not None for w in waiters)
    await asyncio.sleep(0)
    assert sum(w.done() for w in waiters if w is not None) == 1
    lagging = False
    await asyncio.sleep(0)
    assert all(w.done() for w in waiters if w is not None) and pacer.waiting == 0
    assert pacer.turn() is None


async def test_a_request_gone_before_its_turn_gives_it_to_the_next() -> None:
    pacer = await busy_pacer(lambda: True)
    first, second = pacer.turn(), pacer.turn()
    assert first is not None and second is not None
    first.cancel()  # its client went away
    await asyncio.sleep(0)
    assert second.done()


# -- the stack on loopback -------------------------------------------------------------------------------


async def make_segment_lag(stack: Stack, requests: range) -> None:
    """The Segment stand-in answers in a second: its sender reads one batch (about ten requests) a
    second, and the requests spooled meanwhile put it more than half its 8 MB in memory behind."""
    stack.segment.faults.delay = 1.0
    for request in requests:
        assert await post_quietly(stack, request) == 200
    assert stack.delivery._pipelines["segment"].lagging


async def test_with_interval_requests_take_turns_while_the_loop_is_busy_and_a_sender_behind_and_all_is_delivered() -> None:
    async with proxy_stack(durability="interval") as stack:
        await make_segment_lag(stack, range(80))  # ~6.8 MB
        assert stack.metric("splitter_requests_paced_total") == 0  # the loop had time: nothing paced
        block_the_loop(PROBE_EVERY + BUSY_LATE + 0.01)  # as a pass of a saturated loop
        await asyncio.sleep(0.001)
        statuses = await asyncio.gather(*(post_quietly(stack, request) for request in range(80, 100)))
        assert statuses == [200] * 20
        assert stack.metric("splitter_requests_paced_total") >= 20
        stack.segment.faults.delay = 0
        await stack.settle(timeout=20)
        paced = stack.metric("splitter_requests_paced_total")
        assert await post_quietly(stack, 100) == 200
        assert stack.metric("splitter_requests_paced_total") == paced  # caught up: straight through
        await stack.settle()
        assert sorted(segment_ids(stack)) == sorted(sent_ids(range(101)))  # each once: nothing lost, nothing sent twice
        assert stack.metric("splitter_spool_read_back_bytes_total", destination="segment") == 0  # all from memory


async def test_with_fsync_nothing_is_paced() -> None:
    """fsync's requests yield while their round syncs; pacing them would split the rounds: no pacer there."""
    async with proxy_stack(durability="fsync") as stack:
        await make_segment_lag(stack, range(80))
        block_the_loop(PROBE_EVERY + BUSY_LATE + 0.01)
        await asyncio.sleep(0.001)
        assert await asyncio.gather(*(post_quietly(stack, request) for request in range(80, 90))) == [200] * 10
        assert stack.metric("splitter_requests_paced_total") == 0
        stack.segment.faults.delay = 0
        await stack.settle(timeout=20)
        assert sorted(segment_ids(stack)) == sorted(sent_ids(range(90)))


async def test_an_upstream_that_is_down_does_not_pace_intake_and_what_fell_out_of_memory_is_read_back() -> None:
    async with proxy_stack(durability="interval") as stack:
        stack.segment.faults.down = True
        assert await post_quietly(stack, 0) == 200
        await stack.wait_metric("splitter_breaker_state", 2, destination="segment")  # open: the spool holds what comes
        for request in range(1, 121):  # ~10 MB: more than the 8 MB kept in memory
            assert await post_quietly(stack, request) == 200
        assert stack.delivery._pipelines["segment"].spool.lagging
        block_the_loop(PROBE_EVERY + BUSY_LATE + 0.01)
        await asyncio.sleep(0.001)
        assert await asyncio.gather(*(post_quietly(stack, request) for request in range(121, 131))) == [200] * 10
        assert stack.metric("splitter_requests_paced_total") == 0
        stack.segment.faults.down = False
        await stack.settle(timeout=30)
        assert set(segment_ids(stack)) == sent_ids(range(131))  # the first batch may have come twice (its connection cut)
        assert stack.metric("splitter_spool_read_back_bytes_total", destination="segment") > 0


async def test_stopping_gives_the_runners_own_batch_its_time_to_finish() -> None:
    """With one batch at a time the runner delivers it itself: `stop()` waits for it within its
    timeout, as for a batch in a task of its own, rather than cancel it and send it again at the next start."""
    async with proxy_stack(durability="interval") as stack:
        stack.segment.faults.delay = 0.3
        assert await post_quietly(stack, 0) == 200
        pipeline = stack.delivery._pipelines["segment"]
        await stack.wait_metric("splitter_delivery_queue_depth", 50, destination="segment")  # in flight
        assert not pipeline._tasks  # in the runner itself, not in a task of its own
        assert await pipeline.stop(timeout=5) is True
        assert sorted(segment_ids(stack)) == sorted(sent_ids(range(1)))
        assert pipeline.spool.pending == 0


async def test_stopping_cuts_the_runners_own_batch_at_the_timeout_and_keeps_it_spooled() -> None:
    async with proxy_stack(durability="interval") as stack:
        stack.segment.faults.delay = 1.0
        assert await post_quietly(stack, 0) == 200
        pipeline = stack.delivery._pipelines["segment"]
        await stack.wait_metric("splitter_delivery_queue_depth", 50, destination="segment")
        started = time.monotonic()
        assert await pipeline.stop(timeout=0.1) is False
        assert time.monotonic() - started < 0.8  # not the upstream's second
        assert pipeline.spool.pending == 50  # not acked: sent again at the next start

