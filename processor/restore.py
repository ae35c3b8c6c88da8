"""Bring a partition's RocksDB to the end of its changelog before it
processes anything.

Read committed: the end is the last stable offset, so an open transaction
of a previous owner is neither waited for nor applied (it can no longer
commit: its offsets commit carries a stale group generation). The caller
fetches the partition's committed offsets first; with read_committed that
fetch waits until no transactional offset commit is pending, so a previous
owner's last transaction is settled before the changelog end is read.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from oncely.processor.store import PartitionStore

log = logging.getLogger("oncely.restore")

BATCH = 5000


class Restorer:
    def __init__(self, conf: dict[str, Any], topic: str, delete_retention_ms: int) -> None:
        self.topic = topic
        self.delete_retention_ms = delete_retention_ms
        self.consumer = Consumer({
            **conf,
            "group.id": conf.get("group.id", "oncely-restore"),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        })

    def close(self) -> None:
        self.consumer.close()

    def _untrusted(self, store: PartitionStore, lo: int, hi: int) -> str | None:
        """Why the local state cannot be caught up from its checkpoint, or None."""
        cp = store.checkpoint()
        if cp is None:
            return None if store.is_empty() else "it has data but no checkpoint"
        off = cp["changelog_offset"]
        if off > hi:
            return f"its checkpoint {off} is past the changelog end {hi} (was the changelog topic recreated?)"
        if off < lo:
            return f"its checkpoint {off} is before the changelog start {lo} (records were deleted)"
        age = time.time() * 1000 - cp["written_at_ms"]
        if age > self.delete_retention_ms:
            return (f"its checkpoint is {age / 3.6e6:.1f} h old, older than the changelog's delete.retention.ms: "
                    "tombstones it missed may be gone")
        return None

    def restore(self, store: PartitionStore, partition: int, timeout: float = 300.0) -> int:
        """Apply the changelog from the store's checkpoint to the end; returns
        the number of records applied."""
        tp = TopicPartition(self.topic, partition)
        lo, hi = self.consumer.get_watermark_offsets(tp, timeout=30)
        why = self._untrusted(store, lo, hi)
        if why:
            log.warning("partition %d: wiping local state because %s; restoring from the changelog", partition, why)
            store.wipe()
        cp = store.checkpoint()
        start = cp["changelog_offset"] if cp else lo
        if start >= hi:
            if cp is None:
                store.apply_restored((), hi)
            return 0
        t0 = time.monotonic()
        self.consumer.assign([TopicPartition(self.topic, partition, start)])
        applied = 0
        batch: list[tuple[bytes, bytes | None]] = []
        next_offset = start
        deadline = time.monotonic() + timeout
        try:
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"restoring {self.topic}[{partition}] did not reach its end within {timeout} s")
                msgs = self.consumer.consume(BATCH, timeout=1.0)
                done = False
                for m in msgs:
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            next_offset = max(next_offset, m.offset())
                            done = True
                            continue
                        raise KafkaException(err)
                    batch.append((m.key(), m.value()))
                    next_offset = m.offset() + 1
                if batch:
                    store.apply_restored(batch, next_offset)
                    applied += len(batch)
                    batch = []
                if done:
                    store.apply_restored((), next_offset)
                    break
        finally:
            self.consumer.unassign()
        log.info("partition %d: restored %d changelog records (%d..%d) in %.2f s", partition, applied, start,
                 next_offset, time.monotonic() - t0)
        return applied
