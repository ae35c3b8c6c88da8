"""Pacing the poll loop: when the sources pause (input backpressure), and
how a commit is prepared (the drain).

Sources pause while a log partition has READY entries beyond its window or
holds read-ahead, plus Invokes this process sent it and has not read back
and subscribed records waiting on it in memory (local_start.py), past 3/4
of its bound (down to 1/2 once paused), so a
backlog behind busy keys stays in the source topics instead of spilling
into the store. The log itself is never paused: Responses, awakeable
results and timers always apply.

Before a commit the loop stops reading and lets runnable invocations finish
(`commit_drain_share` of the interval, and at least two loop iterations),
while key holders that finish leave their keys vacant (key_queues.py), so
the commit carries as few in-flight invocations as it can.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from confluent_kafka import TopicPartition

from oncely.processor import handover

if TYPE_CHECKING:
    from oncely.processor.commit_loop import CommitLoop


class Pacing:
    def __init__(self, loop: "CommitLoop") -> None:
        self.loop = loop
        self.paused_sources: set[tuple[str, int]] = set()

    def pump(self) -> None:
        """Start queued invocations where there is room; pause or resume the sources."""
        cl = self.loop
        assignment, consumer = cl.assignment, cl.consumer
        assert assignment is not None and consumer is not None
        share = 2 if self.paused_sources else 3
        backlog = False
        local = assignment.local
        for p, part in cl.partitions.items():
            part.pump()
            ahead = part.ahead
            waiting = len(ahead.held) + local.in_transit(p)
            backlog = backlog or part.ready.beyond or waiting * 4 >= ahead.limit * share
        if backlog:
            sources = {tp for tp in assignment.active if tp[0] != cl.app.log_topic} - self.paused_sources
            if sources:
                consumer.pause([TopicPartition(*tp) for tp in sources])
                self.paused_sources |= sources
        elif self.paused_sources:
            consumer.resume([TopicPartition(*tp) for tp in self.paused_sources & assignment.active])
            self.paused_sources.clear()

    async def drain_and_commit(self) -> None:
        cl = self.loop
        for part in cl.partitions.values():
            part.preparing = True
        try:
            await self._drain()
            cl.start_commit()  # on its way; the loop takes its outcome when it is done
        finally:
            for part in cl.partitions.values():
                handover.prepared(part)

    def _in_flight(self) -> int:
        return sum(len(p.invocations) + p.local_waits.n for p in self.loop.partitions.values())

    async def _drain(self) -> None:
        """Stop when nothing is left, when nothing progressed for three
        iterations (a task's step and its done callback run in consecutive
        ones; the rest waits on timers or I/O), or after the budget, but
        never before two iterations: an invocation left unapplied would be
        persisted in this commit and deleted in the next."""
        cfg = self.loop.cfg
        deadline = time.monotonic() + cfg.commit_interval * cfg.commit_drain_share
        before = self._in_flight()
        stalled = passes = 0
        while before and stalled < 3 and (passes < 2 or time.monotonic() < deadline):
            passes += 1
            await asyncio.sleep(0)
            now = self._in_flight()
            stalled = stalled + 1 if now >= before else 0
            before = min(before, now)
