"""Bring a partition's RocksDB to the end of its changelog before it
processes anything.

Read committed: the end is the last stable offset, so an open transaction
of a previous owner is neither waited for nor applied (it can no longer
commit: its offsets commit carries a stale group generation). The caller
fetches the partition's committed offsets first; with read_committed that
fetch waits until no transactional offset commit is pending, so a previous
owner's last transaction is settled before the changelog end is read.

A checkpoint past the last stable offset is not, by itself, a recreated
topic: a transaction that began before the checkpoint may still be open
there: our own last commit, whose markers the broker writes after
commit_transaction returned (a rewind right after a commit, a broker just
back from an outage), or a fenced zombie's, which aborts. What lies
between is committed and applied here already, so the local state stands;
only a checkpoint past the high watermark means the changelog was
recreated (or truncated) and the state is wiped.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from oncely.kafka_io import watermarks
from oncely.processor.store import PartitionStore

log = logging.getLogger("oncely.restore")

BATCH = 5000
PROGRESS_EVERY = 5.0  # seconds between progress lines of a long restore


class Restorer:
    def __init__(self, conf: dict[str, Any], topic: str, delete_retention_ms: int) -> None:
        self.topic = topic
        self.delete_retention_ms = delete_retention_ms
        self.metrics: Any = None  # oncely.observe.Metrics when --metrics is on
        self._conf = conf
        self._uncommitted: Consumer | None = None  # for the high watermark, made when first needed
        self.consumer = Consumer({
            **conf,
            "group.id": conf.get("group.id", "oncely-restore"),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            # At the end the broker holds an empty fetch this long before the
            # EOF can be seen; restore should not wait half a second for it.
            "fetch.wait.max.ms": 10,
        })

    def close(self) -> None:
        self.consumer.close()
        if self._uncommitted is not None:
            self._uncommitted.close()

    def _high_watermark(self, tp: TopicPartition) -> int:
        """The partition's high watermark (its last stable offset is what
        the read_committed consumer sees)."""
        if self._uncommitted is None:
            self._uncommitted = Consumer({**self._conf, "group.id": self._conf.get("group.id", "oncely-restore"),
                                          "enable.auto.commit": False, "isolation.level": "read_uncommitted"})
        return watermarks(self._uncommitted, tp)[1]

    def _untrusted(self, store: PartitionStore, tp: TopicPartition, lo: int, hi: int) -> str | None:
        """Why the local state cannot be caught up from its checkpoint, or
        None. `hi`: the last stable offset."""
        cp = store.checkpoint()
        if cp is None:
            return None if store.is_empty() else "it has data but no checkpoint"
        off = cp["changelog_offset"]
        if off > hi:
            high = self._high_watermark(tp)
            if off > high:
                return f"its checkpoint {off} is past the changelog end {high} (was the changelog topic recreated?)"
            log.info("partition %d: checkpoint %d is past the last stable offset %d (a transaction is being "
                     "settled there); the local state stands", tp.partition, off, hi)
        if off < lo:
            return f"its checkpoint {off} is before the changelog start {lo} (records were deleted)"
        age = time.time() * 1000 - cp["written_at_ms"]
        if age > self.delete_retention_ms:
            return (f"its checkpoint is {age / 3.6e6:.1f} h old, older than the changelog's delete.retention.ms: "
                    "tombstones it missed may be gone")
        return None

    def restore(self, stores: dict[int, PartitionStore], timeout: float = 600.0,
                cancelled: set[int] | None = None) -> int:
        """Apply the changelog of every given partition from its store's
        checkpoint to the end, all partitions at once; returns the number of
        records applied. Partitions added to `cancelled` meanwhile (revoked)
        are left where they are. Runs on the restore worker thread."""
        cancelled = cancelled if cancelled is not None else set()
        t0 = time.monotonic()
        pending: dict[int, int] = {}
        hi_of: dict[int, int] = {}
        for p, store in stores.items():
            tp = TopicPartition(self.topic, p)
            lo, hi = watermarks(self.consumer, tp)
            why = self._untrusted(store, tp, lo, hi)
            if why:
                log.warning("partition %d: wiping local state because %s; restoring from the changelog", p, why)
                store.wipe()
            cp = store.checkpoint()
            start = cp["changelog_offset"] if cp else lo
            if start >= hi:
                if cp is None:
                    store.apply_restored((), hi)
                continue
            pending[p] = start
            hi_of[p] = hi
        if not pending:
            log.info("restore: partitions %s are up to date with the changelog", sorted(stores))
            return 0
        starts = dict(pending)
        self.consumer.assign([TopicPartition(self.topic, p, off) for p, off in pending.items()])
        applied = 0
        counts = {p: 0 for p in pending}
        deadline = time.monotonic() + timeout
        report_at = time.monotonic() + PROGRESS_EVERY
        total = {p: hi_of[p] - starts[p] for p in starts}
        try:
            while pending:
                for p in cancelled & set(pending):
                    del pending[p]
                if time.monotonic() >= report_at:
                    report_at = time.monotonic() + PROGRESS_EVERY
                    rate = applied / (time.monotonic() - t0)
                    log.info("restoring: %s (%.0f records/s)", ", ".join(
                        f"p{p} {counts[p]}/{total[p]}" for p in sorted(pending)), rate)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"restoring {self.topic} partitions {sorted(pending)} did not reach "
                                       f"their end within {timeout} s")
                batches: dict[int, list[tuple[bytes, bytes | None]]] = {}
                done: list[int] = []
                for m in self.consumer.consume(BATCH, timeout=0.05):
                    err = m.error()
                    p = m.partition()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            if p in pending:
                                pending[p] = max(pending[p], m.offset())
                                done.append(p)
                            continue
                        raise KafkaException(err)
                    if p not in pending:
                        continue
                    batches.setdefault(p, []).append((m.key(), m.value()))
                    pending[p] = m.offset() + 1
                for p, batch in batches.items():
                    stores[p].apply_restored(batch, pending[p])
                    applied += len(batch)
                    if self.metrics is not None:
                        self.metrics.restored(len(batch))
                    counts[p] += len(batch)
                for p in done:
                    if p in pending:
                        stores[p].apply_restored((), pending.pop(p))
        finally:
            self.consumer.unassign()
        if self.metrics is not None:
            self.metrics.restore_done(time.monotonic() - t0)
        log.info("restored %d changelog records in %.2f s (%s)", applied, time.monotonic() - t0,
                 ", ".join(f"p{p}: {counts[p]} from {starts[p]}" for p in sorted(starts)))
        return applied
