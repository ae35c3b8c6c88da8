"""One commit interval's transaction, from first record to its outcome.

A `Transaction` holds what the interval consumed (offsets, record count),
whether an internal fault forces an abort, and performs the commit: the
partitions' pending store changes go to the changelog (the last record's
offset of each partition becomes its checkpoint), the offsets join, and the
producer's outcome (COMMITTED / REWIND / REPLACE, producer.py) decides.
The commit is two steps: `start` freezes the content and sends the commit
on its way (the loop opens the next Transaction at once and goes on
processing), `end` takes its outcome. After a commit the loop goes on with
that next Transaction; after anything else it rewinds and opens a new one,
so no counter is ever reset by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from confluent_kafka import TopicPartition

from oncely.processor.partition import PartitionProcessor
from oncely.processor.producer import TxnProducer
from oncely.processor.txn_state import CommitResult, Committing, Outcome
from oncely.processor.worker import Pending

TP = tuple[str, int]


@dataclass
class Committed:
    """What a committed transaction did."""

    records: int          # records consumed
    finished: int         # invocations that finished (completed or failed)
    failed: int
    produced: int         # records produced (changelog included)
    offsets: dict[TP, int] = field(default_factory=dict)
    opening_s: float = 0.0  # of it spent opening the next transaction (not this one's commit)


@dataclass
class _OnItsWay:
    """A started commit, and what applies once it is committed."""

    committing: Committing
    partitions: dict[int, PartitionProcessor]  # frozen for it
    checkpoints: dict[int, list[int]]  # the last changelog offset of each, once delivered
    done: Committed


class Transaction:
    def __init__(self, producer: TxnProducer, changelog_topic: str, log_topic: str | None = None) -> None:
        self.producer = producer
        self.changelog_topic = changelog_topic
        self.log_topic = log_topic
        self.consumed: dict[TP, int] = {}  # next offset per consumed partition
        self.records = 0
        self.fault: str | None = None
        self.on_its_way: _OnItsWay | None = None  # its commit, once started

    @property
    def pending(self) -> Pending[None]:
        """The broker half of its commit, on its way."""
        assert self.on_its_way is not None
        return self.on_its_way.committing.pending

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

    def start(self, partitions: dict[int, PartitionProcessor],
              group_metadata: Any) -> tuple[CommitResult, Committed | None] | None:
        """Freeze this transaction's content and send its commit on its way
        (`end` waits for it); None when there was nothing to commit. A fault,
        or a record refused at once, aborts at once (the outcome is returned)."""
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
        for part in partitions.values():
            part.freeze()
        started = producer.start_commit(offsets, group_metadata() if offsets else None)
        if isinstance(started, CommitResult):
            return started, None
        self.on_its_way = _OnItsWay(started, dict(partitions), checkpoints,
                                    Committed(self.records, 0, 0, produced, consumed))
        return None

    def end(self, partitions: dict[int, PartitionProcessor]) -> tuple[CommitResult, Committed | None]:
        """Wait for the commit `start` sent (up to its bound) and, committed,
        make RocksDB reflect it."""
        way = self.on_its_way
        assert way is not None
        self.on_its_way = None
        result = self.producer.end_commit(way.committing)
        if result.outcome is not Outcome.COMMITTED:
            return result, None
        self.producer.poll()  # the changelog checkpoints' delivery reports
        done = way.done
        done.opening_s = way.committing.opening_seconds
        for p, part in way.partitions.items():
            if partitions.get(p) is not part:
                continue  # gone meanwhile: its store was dropped, the changelog has it
            box = way.checkpoints.get(p)
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
