"""Delivery: every accepted event reaches each destination it was routed to, or a dead-letter file.

The ingress hands over, per request, one `Submission`: the encoded events for each primary and
mirror destination, with their messageIds. `accept()`, the one door whatever the request came in
by, drops what de-duplication has already seen, appends the rest to each destination's spool and
returns once they are on stable storage (one group-committed fsync shared by concurrent requests):
that is when the client may be told 200. With `--durability interval`, once they are written (the
kernel has them; fsynced within the interval).
Each destination's `Pipeline` then sends from its spool, coalescing events across requests into
upstream batches, retrying through outages, splitting out poison events into dead letters. An
upstream outage therefore costs clients neither errors nor latency, and a crash loses nothing that
was acknowledged: the spool is replayed at the next start.

With a `LedgerKeeper`, every record carries tags saying whose events it holds, and the delivery
ledger counts what was accepted, delivered, dead-lettered or dropped (proxy/delivery/accounting.py);
the keeper's first snapshot is written once the spools are recovered, its last one once they are closed.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from proxy.delivery.accounting import MIRROR, PRIMARY, Accounting, Recovered, RequestAccount
from proxy.delivery.commit import GroupCommit
from proxy.delivery.deadletter import DeadLetters
from proxy.delivery.dedup import Deduplicator
from proxy.delivery.errors import UpstreamError
from proxy.delivery.options import DeliveryOptions
from proxy.delivery.pacing import Pacer
from proxy.delivery.pipeline import Pipeline
from proxy.delivery.spool import Spool, SpoolFull
from proxy.delivery.spool_format import Frame, frame
from proxy.delivery.submission import OK, Chunk, Outcome, Rejection, Submission
from proxy.delivery.upstream import Upstream, public_url
from proxy.engine import Destination, RuleSet
from proxy.log import LogThrottle, get_logger
from proxy.metrics import Metrics
from proxy.observe.ledger_files import LedgerKeeper

__all__ = ["Chunk", "Delivery", "Outcome", "Rejection", "SpoolLocked", "Submission"]
log = get_logger("splitter.delivery")
MAX_TELEMETRY_IN_FLIGHT = 16  # /v1/m forwards at once; more are dropped (it is analytics.js's own telemetry)


class SpoolLocked(RuntimeError):
    """Another splitter process owns this spool directory: two writers would corrupt it."""


class Delivery:
    def __init__(self, metrics: Metrics, *, spool_dir: Path, dead_letter_dir: Path, ledger: LedgerKeeper | None = None,
                 sync_interval: float | None = None) -> None:
        self.metrics = metrics
        self.ledger = ledger
        self._accounting = Accounting(ledger.ledger) if ledger is not None else None
        self.spool_dir = spool_dir
        self.dead_letter_dir = dead_letter_dir
        self._pipelines: dict[str, Pipeline] = {}
        self._applied: RuleSet | None = None  # the rule set the pipelines were last built from
        self._retired: list[Upstream] = []
        self._telemetry: set[asyncio.Task[None]] = set()
        self._lock_fd: int | None = None
        self._drop_log = LogThrottle()  # per destination
        # one fsync round for all destinations' spools; with `sync_interval` (--durability interval)
        # the answer waits for the write only and the rounds run on that interval (proxy/delivery/commit.py)
        self._group_commit = GroupCommit(sync_interval, metrics.spool_syncs.inc)
        self._dedup = Deduplicator()  # the filter in front of the spool writes; on while the applied rules say so
        # `interval`: requests take turns with a sender that fell behind for lack of CPU (proxy/delivery/pacing.py)
        self._pacer = Pacer(self._lagging, metrics.requests_paced.inc) if sync_interval is not None else None

    # -- lifecycle --------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Events spooled for any destination and not yet delivered (or dead-lettered)."""
        return sum(pipeline.spool.pending for pipeline in self._pipelines.values())

    def start(self, rules: RuleSet) -> None:
        """Lock the spool directory, recover every destination's spool and start its sender."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.spool_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpoolLocked(f"spool directory {self.spool_dir} is in use by another splitter process") from None
        self.apply(rules)
        if self.ledger is not None:
            self.ledger.start()
        for leftover in sorted(p for p in self.spool_dir.iterdir() if p.is_dir() and p.name not in rules.destinations):
            if any(leftover.glob("*.seg")):
                log.error("spool_orphaned", destination=leftover.name, directory=str(leftover),
                          hint="this destination is no longer in the rules; add it back to deliver what is spooled for it")

    def apply(self, rules: RuleSet) -> None:
        """Make every destination of `rules` ready before the first request that needs it: a new one
        gets its spool recovered and its sender started; a changed one (URL, timeout, any delivery
        option) is reconfigured whole, breaker and concurrency included. A destination no longer in
        the rules keeps its sender, so what is spooled for it still goes out."""
        if rules is self._applied:
            return
        for destination in rules.destinations.values():  # first what can fail (a spool that cannot open):
            if destination.name not in self._pipelines:  # then no running destination has changed yet
                self._pipelines[destination.name] = self._new_pipeline(destination)
        for destination in rules.destinations.values():
            found = self._pipelines[destination.name]
            if found.upstream.destination != destination:
                self._reconfigure(found, destination)
        self._dedup.apply(rules.dedup, self.metrics)
        self._applied = rules

    def _new_pipeline(self, destination: Destination) -> Pipeline:
        options = DeliveryOptions.from_mapping(destination.options)
        spool = Spool(self.spool_dir / destination.name, quota_bytes=options.spool_quota_bytes, group=self._group_commit)
        found = Recovered(self._accounting.ledger) if self._accounting is not None else None
        recovery = spool.open(found)
        if self._accounting is not None and found is not None:
            self._accounting.recovered(destination.name, found)
        if recovery.records or recovery.truncated_bytes:
            log.warning("spool_recovered", destination=destination.name, pending=recovery.records, already_delivered=recovery.skipped,
                        truncated_bytes=recovery.truncated_bytes, truncated_segments=list(recovery.truncated_segments))
            self.metrics.child(self.metrics.spool_replayed, destination.name).inc(recovery.records)
            self.metrics.child(self.metrics.spool_truncated_bytes, destination.name).inc(recovery.truncated_bytes)
        pipeline = Pipeline(Upstream(destination, self.metrics), spool, DeadLetters(self.dead_letter_dir, destination.name), self.metrics, options,
                            self._accounting)
        pipeline.start()
        return pipeline

    def _reconfigure(self, pipeline: Pipeline, destination: Destination) -> None:
        """New options in place; a new client only when the URL or timeout changed (the old one is
        closed at shutdown: batches in flight may still be using it)."""
        before = pipeline.upstream.destination
        upstream = None
        if (before.url, before.timeout, before.kind) != (destination.url, destination.timeout, destination.kind):
            self._retired.append(pipeline.upstream)
            upstream = Upstream(destination, self.metrics)
        else:
            pipeline.upstream.destination = destination
        pipeline.reconfigure(DeliveryOptions.from_mapping(destination.options), upstream)
        log.info("destination_updated", destination=destination.name, url=public_url(destination.url), options=dict(destination.options))

    async def close(self, drain_timeout: float) -> None:
        """Deliver what can be delivered within `drain_timeout`; the rest stays spooled for the next start."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, drain_timeout)
        drained = await asyncio.gather(*(p.drain(max(0.0, deadline - loop.time())) for p in self._pipelines.values()))
        for pipeline, done in zip(self._pipelines.values(), drained):
            left = await pipeline.stop(max(0.0, deadline - loop.time()))
            if not done or not left:
                log.warning("spooled_for_next_start", destination=pipeline.name, events=pipeline.spool.pending)
        if self._telemetry:
            await asyncio.wait(self._telemetry, timeout=max(0.1, deadline - loop.time()))
        await self._dedup.close()
        for upstream in [*(p.upstream for p in self._pipelines.values()), *self._retired]:
            await upstream.close()
        if self.ledger is not None:  # after the senders stopped: nothing is counted after the last snapshot
            await self.ledger.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the request path -----------------------------------------------------------------------------------
    def turn(self) -> asyncio.Future[None] | None:
        """Before a request's work: None to go on now, else a future done at its turn, while a sender
        with an answering upstream is behind (`--durability interval`; proxy/delivery/pacing.py)."""
        return self._pacer.turn() if self._pacer is not None else None

    def _lagging(self) -> bool:
        return any(pipeline.lagging for pipeline in self._pipelines.values())

    async def accept(self, submission: Submission) -> Outcome:
        """Spool a request's events (but those de-duplication drops); ok once they are on stable storage.

        Every destination named in `submission` must be in the rules last given to `apply()`."""
        if self._dedup.settings is None:  # the common case, without a coroutine in between
            return await self._write(submission)
        return await self._dedup.accept(submission, self._write, self.metrics)

    async def _write(self, submission: Submission) -> Outcome:
        now = time.time()
        source, presented_key, forwarded_for = submission.source, submission.presented_key, submission.forwarded_for
        account: RequestAccount | None = self._accounting.request(submission) if self._accounting is not None else None

        def record(name: str, role: str, chunk: Chunk) -> Frame:  # one spool record per destination and request
            tags = account.tags(name, role, chunk) if account is not None else b""
            return frame(now, source.credential_for(name, presented_key), forwarded_for, chunk.events, tags)

        staged = []
        for name, chunk in submission.primary.items():
            events = chunk.events
            if not events:
                continue
            pipeline = self._pipelines[name]
            data = record(name, PRIMARY, chunk)
            if not pipeline.spool.has_room(data.size):  # checked for every primary before writing any
                return _spool_full(name)
            staged.append((pipeline, data, name, chunk))
        copies = {name: (record(name, MIRROR, chunk), chunk) for name, chunk in submission.mirror.items() if chunk.events}
        mirrored: list[tuple[str, str, Chunk]] = []
        tickets: list[tuple[Spool, int]] = []
        try:
            for pipeline, data, name, _ in staged:
                spool = pipeline.spool
                # A mirror copy for the same destination: both records in one write, unless only both need
                # a new segment (the primary alone fits the active one, which a refused start would seal).
                copy = copies.get(name)
                if copy is not None and (not spool.starts_segment(data.size + copy[0].size) or spool.starts_segment(data.size)):
                    try:  # over the quota together, nothing is written (SpoolFull) and the primary goes alone
                        tickets.append((spool, spool.write((data, copy[0]))))
                    except (SpoolFull, OSError):
                        pass  # the primary alone may fit: written next, the copy on its own after the primaries
                    else:
                        del copies[name]
                        mirrored.append((name, MIRROR, copy[1]))
                        continue
                tickets.append((spool, spool.write(data)))
        except (SpoolFull, OSError) as exc:
            self._take_back(tickets)
            if isinstance(exc, SpoolFull):
                return _spool_full(pipeline.name)
            return Outcome(False, 503, "spool_unavailable", f"{pipeline.name}: cannot write the spool: {exc.strerror or exc}", 5.0)
        dropped = set()
        lost = []
        for name, (data, chunk) in copies.items():
            pipeline = self._pipelines[name]
            try:
                tickets.append((pipeline.spool, pipeline.spool.write(data)))
                mirrored.append((name, MIRROR, chunk))
            except (SpoolFull, OSError) as exc:
                self._drop_mirror(name, len(chunk), exc)
                dropped.add(name)
                lost.append((name, MIRROR, chunk))
        if account is not None:  # written: delivered whatever the fsync below says (see there)
            account.accepted([(name, PRIMARY, chunk) for _, _, name, chunk in staged] + mirrored, lost)
        try:
            waiting = self._group_commit.commit(tickets)
            if waiting is not None:
                await waiting
        except OSError as exc:
            # Too late to take the records back (others were appended after them, and they may be on
            # disk): they stay and are delivered, so the client's retry duplicates them (same messageIds).
            log.error("spool_sync_failed", error=str(exc))
            return Outcome(False, 503, "spool_unavailable", f"cannot sync the spool: {exc.strerror or exc}", 5.0)
        return Outcome(True, dropped_mirrors=frozenset(dropped)) if dropped else OK

    @staticmethod
    def _take_back(tickets: list[tuple[Spool, int]]) -> None:
        """A primary refused the request's copy (503): take back the copies already written for the
        others (nothing awaited since, so each is its spool's last record), lest they be delivered.
        One that cannot be taken back (the cut failed) stays: the client's retry duplicates it."""
        kept = [spool.directory.name for spool, ticket in tickets if not spool.retract(ticket)]
        if kept:
            log.error("spool_copies_kept", destinations=kept, hint="delivered although the request got 503; a retry duplicates them")

    def _drop_mirror(self, name: str, count: int, exc: Exception) -> None:
        reason = "spool_full" if isinstance(exc, SpoolFull) else "spool_error"
        self.metrics.child(self.metrics.events_dropped, name, reason).inc(count)
        self.metrics.child(self.metrics.mirror_dropped, name, reason).inc(count)
        if self._drop_log.allow(name) is not None:
            log.error("mirror_events_dropped", destination=name, events=count, reason=reason, error=str(exc))

    # -- analytics.js telemetry ---------------------------------------------------------------------------------
    def forward_telemetry(self, rules: RuleSet, body: bytes, content_type: str) -> None:
        """`/v1/m` goes to Segment destinations only, best effort, with bounded concurrency."""
        for destination in rules.destinations.values():
            if destination.kind == "segment" and len(self._telemetry) < MAX_TELEMETRY_IN_FLIGHT:
                self._spawn(self._send_telemetry(self._pipelines[destination.name].upstream, body, content_type))

    async def _send_telemetry(self, upstream: Upstream, body: bytes, content_type: str) -> None:
        try:
            await upstream.send(body, None, path="/v1/m", content_type=content_type)
        except UpstreamError as exc:
            log.info("telemetry_forward_failed", destination=upstream.destination.name, error=exc.detail)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._telemetry.add(task)
        task.add_done_callback(self._telemetry.discard)


def _spool_full(name: str) -> Outcome:
    return Outcome(False, 503, "spool_full", f"{name}: splitter's spool for this destination is full; retry later", 5.0)
