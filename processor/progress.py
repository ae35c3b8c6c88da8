"""The lines an operator reads: ready, a periodic summary while busy, stopped.

One line per event a person cares about, never one per record: the summary
comes every `every` seconds and only when something happened since the last.
Lag is what the consumer already knows (cached high watermarks from its
fetches, minus its position), so the summary never waits on the broker.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from confluent_kafka import KafkaException, TopicPartition

if TYPE_CHECKING:
    from oncely.processor.commit_loop import CommitLoop

log = logging.getLogger("oncely")


class Progress:
    def __init__(self, loop: "CommitLoop", every: float = 30.0) -> None:
        self.loop = loop
        self.every = every
        self.ready = False
        self.records = 0          # records committed (read from the log and sources)
        self.finished = 0         # invocations completed or failed, committed
        self.dead = 0             # of which dead-lettered
        self._records_seen = 0
        self._next = time.monotonic() + every
        self._since = time.monotonic()

    def started(self, partitions: list[int]) -> None:
        """Partitions began running; the first time, the process is ready."""
        if self.ready or not partitions:
            return
        self.ready = True
        cl = self.loop
        log.info("ready: app %r, running log partitions %s of %d, bootstrap %s", cl.app.name,
                 sorted(cl.partitions), cl.app.partitions, cl.cfg.bootstrap)

    def committed(self, records: int, finished: int, dead: int) -> None:
        self.records += records
        self.finished += finished
        self.dead += dead

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        elapsed = now - self._since
        self._next, self._since = now + self.every, now
        records = self.records - self._records_seen
        if not records:
            return  # idle: nothing to say
        self._records_seen = self.records
        cl = self.loop
        in_flight = sum(len(p.invocations) + p.suspended for p in cl.partitions.values())
        log.info("%d records in %.0f s (%.0f/s), %d invocations finished (%d dead-lettered) so far, %d in flight, "
                 "lag %s", records, elapsed, records / elapsed, self.finished, self.dead, in_flight, self._lag())

    def _lag(self) -> str:
        """Records not yet read, from what the consumer already knows."""
        cl = self.loop
        consumer, assignment = cl.consumer, cl.assignment
        if consumer is None or assignment is None or not assignment.active:
            return "unknown"
        tps = [TopicPartition(t, p) for t, p in sorted(assignment.active)]
        try:
            total = 0
            for tp in consumer.position(tps):
                _, high = consumer.get_watermark_offsets(tp, cached=True)
                if high >= 0 and tp.offset >= 0:
                    total += max(0, high - tp.offset)
            return str(total)
        except KafkaException:
            return "unknown"

    def stopped(self) -> None:
        log.info("stopped: %d records and %d invocations committed by this process (%d dead-lettered)",
                 self.records, self.finished, self.dead)
