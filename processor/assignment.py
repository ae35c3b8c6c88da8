"""Which partitions this process owns, and their way from assigned to running.

A partition the group gives us (or one we rewind) is *recovering* until its
committed offset is known and, for a log partition, its store has caught up
with the changelog. Both are blocking Kafka reads (the offset fetch waits
until a previous owner's transaction is settled, KIP-447; a restore may read
millions of records), so they run as a job on the restore worker thread
while the event loop goes on with every other partition. Only when the job
is done is the partition assigned in the consumer, at its committed offset:
until then nothing of it is read, which is the same as paused.

A rewind (after an aborted or unknown transaction outcome) is the same
path for every running partition: close it, unassign it, recover it.

Every change (assigned, revoked, started, rewound) resets the local starts
(local_start.py): a partition that moved here may have older Invokes on the log.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from oncely.processor.local_start import LocalStarts
from oncely.processor.partition import PartitionProcessor
from oncely.processor.restore import Restorer
from oncely.processor.store import PartitionStore
from oncely.processor.worker import Worker

log = logging.getLogger("oncely.assignment")

TP = tuple[str, int]
RETRY_AFTER = 1.0  # a failed recovery (broker unreachable) is tried again after this


@dataclass(eq=False)
class _Job:
    gen: int
    tps: list[TP]
    stores: dict[int, PartitionStore]
    started: float
    future: "Future | None" = None
    not_before: float = 0.0
    cancelled: set[int] = field(default_factory=set)  # log partitions revoked meanwhile


class Assignment:
    def __init__(self, log_topic: str, consumer: Consumer, restorer: Restorer,
                 fetch_committed: Callable[[list[TopicPartition]], list[TopicPartition]],
                 make_partition: Callable[[int, PartitionStore], PartitionProcessor],
                 open_store: Callable[[int], PartitionStore], source_start: int,
                 interrupt: threading.Event) -> None:
        self.log_topic = log_topic
        self.consumer = consumer
        self.restorer = restorer
        self.fetch_committed = fetch_committed
        self.make_partition = make_partition
        self.open_store = open_store
        self.source_start = source_start
        self.partitions: dict[int, PartitionProcessor] = {}  # running log partitions
        self.local = LocalStarts(self.partitions)
        self.active: set[TP] = set()                          # assigned in the consumer
        self.committed: dict[TP, int] = {}                    # offsets of the last commit
        self.recovering: dict[TP, int] = {}                   # -> generation of its job
        self.stores: dict[int, PartitionStore] = {}          # every open store
        self._jobs: list[_Job] = []
        self.failures = 0  # recovery jobs failed in a row
        self._gen = 0
        self._worker = Worker("restore", interrupt)

    # -- what the group says ------------------------------------------------------

    def assign(self, tps: list[TP]) -> None:
        """New partitions from the group: recover them, then run them."""
        # An (empty) assign in the callback: confluent-kafka would otherwise
        # assign them at once, before they are recovered.
        self.consumer.incremental_assign([])
        self.local.reset(flush=True)
        self._recover([tp for tp in tps if tp not in self.active])

    def revoke(self, tps: list[TP]) -> None:
        """Partitions leave (their work is committed, or abandoned when
        lost): stop them, forget them, unassign the ones being read."""
        self.local.reset()
        reading = []
        for tp in tps:
            if tp in self.active:
                self.active.discard(tp)
                reading.append(TopicPartition(*tp))
            self.recovering.pop(tp, None)
            self.committed.pop(tp, None)
            if tp[0] == self.log_topic:
                part = self.partitions.pop(tp[1], None)
                if part is not None:
                    part.close()
                    part.store.drop_overlay()
                for job in self._jobs:
                    if tp[1] in job.stores:
                        job.cancelled.add(tp[1])
                self._close_store_if_unused(tp[1])
        # Called even when empty: confluent-kafka unassigns every revoked
        # partition itself when a callback did not (some are not assigned).
        self.consumer.incremental_unassign(reading)

    def rewind(self) -> None:
        """Back to what Kafka says is committed, for every running partition."""
        self.local.reset()
        for part in self.partitions.values():
            part.close()
            part.store.drop_overlay()
        self.partitions.clear()
        tps = sorted(self.active)
        if tps:
            self.consumer.incremental_unassign([TopicPartition(*tp) for tp in tps])
        self.active.clear()
        self._recover(tps)

    def reset(self, consumer: Consumer) -> None:
        """The consumer was replaced: nothing is owned until the group
        assigns again (the stores stay open for that)."""
        self.local.reset()
        for part in self.partitions.values():
            part.close()
            part.store.drop_overlay()
        self.partitions.clear()
        self.active.clear()
        self.recovering.clear()
        self.committed.clear()
        self.consumer = consumer

    def owned(self) -> list[TP]:
        return sorted(self.active | set(self.recovering))

    # -- recovery jobs ------------------------------------------------------------

    def _recover(self, tps: list[TP]) -> None:
        if not tps:
            return
        self._gen += 1
        stores = {}
        for topic, p in tps:
            self.recovering[(topic, p)] = self._gen
            if topic == self.log_topic:
                store = self.stores.get(p)
                if store is None:
                    store = self.stores[p] = self.open_store(p)
                stores[p] = store
        job = _Job(self._gen, tps, stores, time.monotonic())
        self._jobs.append(job)
        self._submit(job)

    def _submit(self, job: _Job) -> None:
        fetch, restorer = self.fetch_committed, self.restorer

        def recover() -> list[TopicPartition]:
            # With read_committed this waits until no transactional offset
            # commit of a previous owner is pending (KIP-447).
            offsets = fetch([TopicPartition(*tp) for tp in job.tps])
            restorer.restore({p: s for p, s in job.stores.items() if p not in job.cancelled},
                             cancelled=job.cancelled)
            return offsets

        job.future = self._worker.submit(recover)

    def poll(self) -> list[int]:
        """Run what finished recovering; returns the log partitions started."""
        started: list[int] = []
        now = time.monotonic()
        for job in list(self._jobs):
            fut = job.future
            if fut is None:
                if now >= job.not_before:
                    self._submit(job)
                continue
            if not fut.done():
                continue
            self._jobs.remove(job)
            try:
                offsets = fut.result()
            except Exception as e:
                self.failures += 1
                live = [tp for tp in job.tps if self.recovering.get(tp) == job.gen]
                if live:
                    log.warning("recovering %s failed (%s); trying again in %.0f s", live, e, RETRY_AFTER)
                    retry = _Job(job.gen, live, {p: s for p, s in job.stores.items() if (self.log_topic, p) in live},
                                 job.started, not_before=now + RETRY_AFTER)
                    self._jobs.append(retry)
                self._close_unowned(job)
                continue
            self.failures = 0
            started.extend(self._start(job, offsets))
            self._close_unowned(job)
        return started

    def _start(self, job: _Job, offsets: list[TopicPartition]) -> list[int]:
        ready: list[TopicPartition] = []
        started = []
        for tp in offsets:
            key = (tp.topic, tp.partition)
            if self.recovering.get(key) != job.gen:
                continue  # revoked, or recovering again under a newer job
            del self.recovering[key]
            off = tp.offset if tp.offset >= 0 else (
                OFFSET_BEGINNING if tp.topic == self.log_topic else self.source_start)
            self.committed[key] = off
            ready.append(TopicPartition(tp.topic, tp.partition, off))
            if tp.topic == self.log_topic:
                part = self.make_partition(tp.partition, job.stores[tp.partition])
                self.partitions[tp.partition] = part
                part.load()
                started.append(tp.partition)
        if ready:
            self.local.reset(flush=True)
            self.consumer.incremental_assign(ready)
            # A partition paused for backpressure before a rewind stays
            # paused in librdkafka; its new processor starts unpaused.
            self.consumer.resume(ready)
            self.active.update((tp.topic, tp.partition) for tp in ready)
            log.info("running %s after %.2f s of recovery", sorted((tp.topic, tp.partition) for tp in ready),
                     time.monotonic() - job.started)
        return started

    def _close_unowned(self, job: _Job) -> None:
        for p in job.stores:
            self._close_store_if_unused(p)

    def _close_store_if_unused(self, p: int) -> None:
        tp = (self.log_topic, p)
        if tp in self.active or tp in self.recovering:
            return
        if any(p in j.stores and j.future is not None and not j.future.done() for j in self._jobs):
            return  # a job still writes it; closed when that job is done
        store = self.stores.pop(p, None)
        if store is not None:
            store.drop_overlay()
            store.close()

    def close(self) -> None:
        """Stop every partition and close every store (shutdown), and let go
        of the consumer (a static member's is dropped: rebalance.py)."""
        self.consumer = None  # type: ignore[assignment]
        self.local.reset()
        for part in self.partitions.values():
            part.close()
        self.partitions.clear()
        for job in self._jobs:
            job.cancelled.update(job.stores)
        self.recovering.clear()
        self.active.clear()
        for p in list(self.stores):
            self._close_store_if_unused(p)
        self._worker.close()
