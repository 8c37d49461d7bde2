"""messageId de-duplication, the filter in front of delivery's spool writes: its windows, and that
the rules in effect (start-up or reload, through `Delivery.apply`) turn it on and off.

The webhook intake's de-duplication cases, through the running proxy, are in test_webhook.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from proxy.delivery.dedup import Deduplicator
from proxy.engine import DedupSettings
from tests.proxy_harness import WEB_KEY, proxy_stack
from tests.test_webhook import RULES, event, hook


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ids_expire_after_the_window() -> None:
    clock = Clock()
    dedup = Deduplicator(clock)
    settings = DedupSettings(window=10, max_ids=100)
    dedup.remember(settings, "rs", ["a"])
    clock.now += 9.9
    assert dedup.seen("rs", "a") and not dedup.seen("segment", "a")  # per destination
    clock.now += 0.1
    assert not dedup.seen("rs", "a")
    assert dedup.remember(settings, "rs", ["b"]) == 1  # the expired id was dropped from the front
    assert list(dedup.windows["rs"]) == ["b"]


def test_the_size_bound_drops_the_oldest_ids() -> None:
    clock = Clock()
    dedup = Deduplicator(clock)
    settings = DedupSettings(window=60, max_ids=3)
    for message_id in "abcde":
        clock.now += 1
        dedup.remember(settings, "rs", [message_id])
    assert list(dedup.windows["rs"]) == ["c", "d", "e"]
    assert not dedup.seen("rs", "a") and dedup.seen("rs", "e")
    assert dedup.remember(DedupSettings(window=60, max_ids=1), "rs", ["f"]) == 1  # a reload that lowers the bound


def test_an_expired_leftover_id_is_renewed() -> None:
    clock = Clock()
    dedup = Deduplicator(clock)
    dedup.remember(DedupSettings(window=10, max_ids=10), "rs", ["a", "b"])
    clock.now += 5
    dedup.remember(DedupSettings(window=1, max_ids=10), "rs", ["c"])  # a reload shortened the window
    clock.now += 2  # c expired, a and b not yet
    dedup.remember(DedupSettings(window=10, max_ids=10), "rs", ["c"])
    assert list(dedup.windows["rs"]) == ["a", "b", "c"] and dedup.seen("rs", "c")


def test_a_long_message_id_is_remembered_in_bounded_memory() -> None:
    # messageId is the client's: up to the 32 KB event limit. max_ids of them must not cost 32 KB each
    # (200,000 x 32 KB = 6 GB per destination), against the documented ~200 bytes per id.
    dedup = Deduplicator(Clock())
    settings = DedupSettings(window=60, max_ids=10)
    long_ids = [str(n) * 20_000 for n in range(3)]
    dedup.remember(settings, "rs", [*long_ids, "msg-short"])
    assert all(dedup.seen("rs", message_id) for message_id in [*long_ids, "msg-short"])
    assert not dedup.seen("rs", "0" * 19_999) and not dedup.seen("rs", "3" * 20_000)
    assert max(sys.getsizeof(key) for key in dedup.windows["rs"]) < 200


async def test_a_reload_turns_deduplication_on_and_off() -> None:
    async with proxy_stack(RULES + "dedup: off\n") as stack:
        path = Path(stack.proxy.settings.config)
        assert (await stack.post("/v1/track", event("off"), key=WEB_KEY))[0] == 200
        assert (await hook(stack, event("off")))[0] == 200
        path.write_text(RULES + "dedup: {window: 1h}\n")
        assert (await stack.reloader.reload("test")).status == "success"
        assert (await stack.post("/v1/track", event("on"), key=WEB_KEY))[0] == 200
        assert (await hook(stack, event("on")))[0] == 200
        path.write_text(RULES + "dedup: off\n")
        assert (await stack.reloader.reload("test")).status == "success"
        assert (await hook(stack, event("on")))[0] == 200  # remembered while on, but off now: it passes
        assert stack.rudder.message_ids() == ["off", "off", "on", "on"]
        assert stack.metric("splitter_dedup_hits_total", destination="rudderstack") == 1
