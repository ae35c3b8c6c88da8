"""One commit interval's transaction, from first record to its outcome.

A `Transaction` holds what the interval consumed (offsets, record count),
whether an internal fault forces an abort, and performs the commit: the
partitions' pending store changes go to the changelog (the last record's
offset of each partition becomes its checkpoint), the offsets join, and the
producer's outcome (COMMITTED / REWIND / REPLACE, producer.py) decides.
After a commit the loop opens a new Transaction; after anything else it
rewinds and opens a new one, so no counter is ever reset by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from confluent_kafka import TopicPartition

from oncely.processor.partition import PartitionProcessor
from oncely.processor.producer import CommitResult, Outcome, TxnProducer

TP = tuple[str, int]


@dataclass
class Committed:
    """What a committed transaction did."""

    records: int          # records consumed
    finished: int         # invocations that finished (completed or failed)
    failed: int
    produced: int         # records produced (changelog included)
    offsets: dict[TP, int] = field(default_factory=dict)


class Transaction:
    def __init__(self, producer: TxnProducer, changelog_topic: str, log_topic: str | None = None) -> None:
        self.producer = producer
        self.changelog_topic = changelog_topic
        self.log_topic = log_topic
        self.consumed: dict[TP, int] = {}  # next offset per consumed partition
        self.records = 0
        self.fault: str | None = None

    def consumed_record(self, topic: str, partition: int, offset: int) -> None:
        self.consumed[(topic, partition)] = offset + 1
        self.records += 1

    def forget(self, tps: Iterable[TP]) -> None:
        """Partitions that left: their offsets are not this process's to commit."""
        for tp in tps:
            self.consumed.pop(tp, None)

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]] | None = None, partition: int | None = None,
                owner: bytes | None = None) -> None:
        self.producer.produce(topic, key, value, headers, partition, owner)

    @property
    def outputs(self) -> bool:
        """It holds produced records (replies, outputs, Invokes, Responses):
        someone reads them once the commit makes them visible."""
        return self.producer.txn.produced > 0

    def dirty(self, partitions: Iterable[PartitionProcessor]) -> bool:
        return bool(self.consumed) or self.producer.txn.produced > 0 or self.fault is not None or any(
            p.writer.dirty or p.active or p.store.has_changes() for p in partitions)

    def commit(self, partitions: dict[int, PartitionProcessor],
               group_metadata: Any) -> tuple[CommitResult, Committed | None] | None:
        """Commit; None when there was nothing to commit. A fault aborts."""
        producer = self.producer
        if self.fault is not None:
            return CommitResult(producer.abort(self.fault), self.fault), None
        checkpoints = self._flush_changelog(partitions)
        if not self.consumed and producer.txn.produced == 0:
            return None
        consumed = dict(self.consumed)
        if self.log_topic is not None:
            # A log partition commits up to its first Invoke read but not
            # applied (inbox.py, ReadAhead), also when not read this interval.
            for p, part in partitions.items():
                off = part.commit_offset()
                if off is not None:
                    consumed[(self.log_topic, p)] = off
        offsets = [TopicPartition(t, p, o) for (t, p), o in consumed.items()]
        produced = producer.txn.produced
        result = producer.commit(offsets, group_metadata() if offsets else None)
        if result.outcome is not Outcome.COMMITTED:
            return result, None
        # Committed: make RocksDB reflect it, with the changelog offset.
        producer.poll()
        done = Committed(self.records, 0, 0, produced, consumed)
        for p, part in partitions.items():
            box = checkpoints.get(p)
            finished, failed = part.after_commit(box[0] + 1 if box else None)
            done.finished += finished
            done.failed += failed
        return result, done

    def _flush_changelog(self, partitions: dict[int, PartitionProcessor]) -> dict[int, list[int]]:
        """Every partition's pending store changes into the transaction; the
        offset of a partition's last record (delivered) is its checkpoint."""
        checkpoints: dict[int, list[int]] = {}
        for p, part in partitions.items():
            part.prepare_commit()
            overlay = part.store.overlay
            if not overlay:
                continue
            box: list[int] = []
            checkpoints[p] = box

            def checkpoint(err: Any, msg: Any, box: list[int] = box) -> None:
                if err is None:
                    box.append(msg.offset())

            self.producer.produce_all(self.changelog_topic, p, overlay.items(), checkpoint)
        return checkpoints
