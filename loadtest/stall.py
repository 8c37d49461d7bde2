"""Memory with stalled upstreams: does splitter stay bounded while its spool grows?

Segment's receiver refuses (closes each connection on the request head) and RudderStack's hangs
(accepts and never answers, so splitter waits for its 10 s upstream timeout; with `hang=False`, as
in `--quick`, it refuses too, so the drain does not wait for that timeout) while splitter is driven
at saturation with batches for a bounded time. Its RSS and the spool's bytes on disk (from
/metrics `splitter_spool_bytes`) are sampled throughout. Bounded means: RSS grew by less than
BOUNDED_GROWTH_MB over the second half of the run while the spool kept growing, i.e. the backlog
lives on disk, not in memory. Then both receivers recover, and every event answered 200 must arrive,
exactly, within DRAIN_LIMIT seconds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loadtest.bench_delivery import CONNECTIONS, drained, metric_total
from loadtest.harness import Receivers, memory_mb, run_wrk
from loadtest.payloads import Payload, delivered
from loadtest.subjects import splitter

HANG_SECONDS = 3600.0  # longer than any run: the hung requests never complete, so nothing is counted twice
BOUNDED_GROWTH_MB = 20.0
DRAIN_LIMIT = 90.0  # the hung request's 10 s upstream timeout plus the breaker's cool-down
MAX_SECONDS = 10.0  # at ~40k events/s this spools well under the 1 GB default quota
SAMPLE_EVERY = 0.2


async def stalled_upstreams(receivers: Receivers, env: dict[str, str], payload: Payload, auth: str, seconds: float,
                            hang: bool = True) -> dict[str, Any]:
    seconds = min(seconds, MAX_SECONDS)
    async with splitter(env) as subject:
        assert subject.splitter is not None
        admin = subject.splitter.admin
        pids = subject.pids()  # its workers are started with it: the set does not change during the run
        await receivers.faults("segment", down=True)
        await receivers.faults("rudderstack", **({"delay": HANG_SECONDS} if hang else {"down": True}))
        samples: list[tuple[float, float, float]] = []  # (seconds since start, RSS MB, spool MB)
        load = asyncio.ensure_future(asyncio.to_thread(run_wrk, subject.url, payload.path, payload.bodies, auth,
                                                       seconds=seconds, connections=CONNECTIONS))
        started = time.monotonic()
        while not load.done():
            samples.append((time.monotonic() - started, memory_mb(pids), await metric_total(admin, "splitter_spool_bytes") / 2**20))
            await asyncio.sleep(SAMPLE_EVERY)
        run = await load
        samples.append((time.monotonic() - started, memory_mb(pids), await metric_total(admin, "splitter_spool_bytes") / 2**20))
        peak = memory_mb(pids, "VmHWM")
        await receivers.faults("segment", down=False)
        await receivers.faults("rudderstack", delay=0, down=False)
        drain = await drained(admin, DRAIN_LIMIT)
        segment, rudder = await receivers.stats("segment"), await receivers.stats("rudderstack")
    await receivers.reset()
    half = next(s for s in samples if s[0] >= samples[-1][0] / 2)
    rss_growth, spool_growth = samples[-1][1] - half[1], samples[-1][2] - half[2]
    return {
        "seconds": seconds, "rudderstack": "hanging" if hang else "refusing", "requests_per_s": round(run.ok / run.seconds),
        "events_per_s": round(run.ok * payload.events / run.seconds),
        "non_200": run.requests - run.ok, "peak_rss_mb": round(peak, 1), "rss_growth_second_half_mb": round(rss_growth, 1),
        "spool_mb_at_end": round(samples[-1][2], 1), "spool_growth_second_half_mb": round(spool_growth, 1),
        "bounded": rss_growth < BOUNDED_GROWTH_MB and spool_growth > 0,
        "drain_seconds": None if drain is None else round(drain, 2),
        "delivered": drain is not None and delivered(payload, segment["count"], rudder["count"], run.ok, CONNECTIONS)[1],
        "received": {"segment": segment["count"], "rudderstack": rudder["count"]}, "answered_200": run.ok,
        "samples": [[round(t, 2), round(r, 1), round(s, 1)] for t, r, s in samples],
    }
