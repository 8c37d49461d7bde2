"""Intake takes turns with a sender that fell behind (proxy/delivery/pacing.py), and a sender with
one batch at a time delivers it in its own runner (proxy/delivery/pipeline.py).

The pacer on a real event loop: one request per pass of the loop, in arrival order. Then the whole
stack on loopback: a stand-in Segment that answers slowly makes its sender fall behind half the
records kept in memory, and every request after that waits for its turn, is answered 200 and
delivered; nothing is paced with `--durability fsync`, nor for an upstream that is down.
"""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.delivery.pacing import Pacer
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


async def test_nothing_waits_while_no_sender_lags() -> None:
    pacer = Pacer(lambda: False)
    assert pacer.turn() is None


async def test_waiting_requests_go_one_per_pass_of_the_loop_in_arrival_order() -> None:
    lagging = True
    order: list[int] = []
    pacer = Pacer(lambda: lagging)

    async def request(n: int) -> None:
        turn = pacer.turn()
        assert turn is not None
        await turn
        order.append(n)

    tasks = [asyncio.ensure_future(request(n)) for n in range(5)]
    await asyncio.sleep(0)  # the tasks start and queue
    lagging = False  # no longer lagging: those queued still go one by one, and a newcomer queues behind them
    late = pacer.turn()
    assert late is not None
    done = []
    for _ in range(6):
        await asyncio.sleep(0)
        done.append(len(order))
    assert done == [0, 1, 2, 3, 4, 5]  # one more each pass (a request runs the pass after its turn came)
    assert late.done()  # its turn came in the sixth pass, after the five
    assert order == [0, 1, 2, 3, 4] and pacer.waiting == 0
    assert pacer.turn() is None  # nobody waits and nothing lags: straight through
    await asyncio.gather(*tasks)


async def test_a_request_gone_before_its_turn_gives_it_to_the_next() -> None:
    paced = []
    pacer = Pacer(lambda: True, lambda: paced.append(1))
    first, second = pacer.turn(), pacer.turn()
    assert first is not None and second is not None
    first.cancel()  # its client went away
    await asyncio.sleep(0)
    assert second.done() and len(paced) == 2


# -- the stack on loopback -------------------------------------------------------------------------------


async def test_with_interval_requests_take_turns_while_a_slow_upstreams_sender_is_behind_and_all_is_delivered() -> None:
    async with proxy_stack(durability="interval") as stack:
        stack.segment.faults.delay = 0.5  # healthy but slow: its sender falls behind
        for request in range(60):
            assert await post_quietly(stack, request) == 200
        assert stack.delivery._pipelines["segment"].lagging
        before = stack.metric("splitter_requests_paced_total")
        assert before > 0  # the last of the sixty already waited for their turn
        statuses = await asyncio.gather(*(post_quietly(stack, request) for request in range(60, 80)))
        assert statuses == [200] * 20
        assert stack.metric("splitter_requests_paced_total") >= before + 20
        stack.segment.faults.delay = 0
        await stack.settle(timeout=20)
        paced = stack.metric("splitter_requests_paced_total")
        assert await post_quietly(stack, 80) == 200
        assert stack.metric("splitter_requests_paced_total") == paced  # caught up: straight through
        await stack.settle()
        ids = segment_ids(stack)
        assert sorted(ids) == sorted(sent_ids(range(81)))  # each once: nothing lost, nothing sent twice
        assert stack.metric("splitter_spool_read_back_bytes_total", destination="segment") == 0  # all from memory


async def test_with_fsync_nothing_is_paced() -> None:
    async with proxy_stack(durability="fsync") as stack:
        stack.segment.faults.delay = 0.5
        for request in range(60):
            assert await post_quietly(stack, request) == 200
        assert stack.delivery._pipelines["segment"].lagging
        assert await asyncio.gather(*(post_quietly(stack, request) for request in range(60, 70))) == [200] * 10
        assert stack.metric("splitter_requests_paced_total") == 0
        stack.segment.faults.delay = 0
        await stack.settle(timeout=20)
        assert sorted(segment_ids(stack)) == sorted(sent_ids(range(70)))


async def test_an_upstream_that_is_down_does_not_pace_intake_and_what_fell_out_of_memory_is_read_back() -> None:
    async with proxy_stack(durability="interval") as stack:
        stack.segment.faults.down = True
        assert await post_quietly(stack, 0) == 200
        await stack.wait_metric("splitter_breaker_state", 2, destination="segment")  # open: the spool holds what comes
        for request in range(1, 121):  # ~10 MB: more than the 8 MB kept in memory
            assert await post_quietly(stack, request) == 200
        assert stack.delivery._pipelines["segment"].spool.lagging
        assert stack.metric("splitter_requests_paced_total") == 0
        stack.segment.faults.down = False
        await stack.settle(timeout=30)
        assert set(segment_ids(stack)) == sent_ids(range(121))  # the first batch may have come twice (its connection cut)
        assert stack.metric("splitter_spool_read_back_bytes_total", destination="segment") > 0


async def test_stopping_gives_the_runners_own_batch_its_time_to_finish() -> None:
    """With one batch at a time the runner delivers it itself: `stop()` waits for it within its
    timeout, as for a batch in a task of its own, rather than cancel it and send it again at the next start."""
    async with proxy_stack(durability="interval") as stack:
        stack.segment.faults.delay = 0.3
        assert await post_quietly(stack, 0) == 200
        pipeline = stack.delivery._pipelines["segment"]
        await stack.wait_metric("splitter_delivery_queue_depth", 50, destination="segment")  # in flight
        assert await pipeline.stop(timeout=5) is True
        assert sorted(segment_ids(stack)) == sorted(sent_ids(range(1)))
        assert pipeline.spool.pending == 0
