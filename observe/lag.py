"""Consumer lag of an app's group, from Kafka itself.

Lag of a partition is its last stable offset (the end a read_committed
reader sees) minus the group's committed offset. Every transaction leaves a
commit marker after its last record, and the group commits the offset after
the last record it read, so a caught-up partition written transactionally
(the app's log always is) stays one or more offsets short of its end. A gap
of at most `VERIFY_UP_TO` offsets is therefore read (read_committed), and
counts 0 when it holds no record; the answer is kept until the offsets move.
Larger gaps are reported as they are, markers included (what kafka_exporter
reports).

A partition without a committed offset lags by everything a new reader
would read: from its start, or nothing for a topic read from its end
(`auto.offset.reset=latest`).

Every call is bounded by `timeout`. `LagWatcher` runs `read_lag` on its own
thread every few seconds, so the event loop never waits on Kafka; a scrape
reads its last answer.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, IsolationLevel, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

log = logging.getLogger("oncely.observe")

TP = tuple[str, int]
VERIFY_UP_TO = 100
TOPICS_EVERY = 60.0  # seconds between partition-count refreshes
WARN_AFTER = 3      # failed reads in a row before a warning


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # the group's committed offset; None when it has none
    end: int               # last stable offset
    lag: int


@dataclass
class LagSnapshot:
    group: str
    partitions: list[PartitionLag] = field(default_factory=list)
    at: float = 0.0  # unix time of the answer

    def by_topic(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.partitions:
            out[p.topic] = out.get(p.topic, 0) + p.lag
        return out


def _results(futures: dict[Any, Any], timeout: float) -> dict[Any, Any]:
    deadline = time.monotonic() + timeout
    return {k: f.result(max(0.0, deadline - time.monotonic())) for k, f in futures.items()}


def topic_partitions(admin: AdminClient, topics: list[str], timeout: float) -> list[TP]:
    """Partitions of the topics that exist (a missing topic has none)."""
    out: list[TP] = []
    for topic in topics:
        md = admin.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is not None and md.error is None:
            out += [(topic, p) for p in sorted(md.partitions)]
    return out


def group_offsets(admin: AdminClient, group: str, timeout: float) -> dict[TP, int]:
    """The group's committed offsets (stable or not: never waits on an open
    transaction's offset commit)."""
    req = [ConsumerGroupTopicPartitions(group)]
    res = _results(admin.list_consumer_group_offsets(req, require_stable=False, request_timeout=timeout), timeout)
    return {(tp.topic, tp.partition): tp.offset for tp in res[group].topic_partitions
            if tp.offset >= 0 and tp.error is None}


def list_offsets(admin: AdminClient, tps: list[TP], spec: OffsetSpec, timeout: float) -> dict[TP, int]:
    """Offsets of `spec` (latest: the last stable offset) per partition."""
    if not tps:
        return {}
    req = {TopicPartition(t, p): spec for t, p in tps}
    res = _results(admin.list_offsets(req, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=timeout),
                   timeout)
    return {(tp.topic, tp.partition): r.offset for tp, r in res.items()}


def count_records(consumer: Consumer, ranges: dict[TP, tuple[int, int]], timeout: float,
                  first_only: bool = False) -> tuple[dict[TP, int], bool]:
    """Committed records in [start, end) per partition (read_committed, so
    markers and aborted records are not records); with `first_only` it stops
    at the first. Returns the counts and whether every range was read."""
    counts = {tp: 0 for tp in ranges}
    pending = {tp for tp, (lo, hi) in ranges.items() if hi > lo}
    if not pending:
        return counts, True
    consumer.assign([TopicPartition(t, p, ranges[(t, p)][0]) for t, p in pending])
    deadline = time.monotonic() + timeout
    try:
        while pending and time.monotonic() < deadline:
            for m in consumer.consume(1000, timeout=0.1):
                tp = (m.topic(), m.partition())
                if tp not in pending:
                    continue
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(tp)
                        continue
                    raise RuntimeError(f"reading {tp[0]}[{tp[1]}]: {err}")
                if m.offset() >= ranges[tp][1]:
                    pending.discard(tp)
                    continue
                counts[tp] += 1
                if first_only:
                    pending.discard(tp)
    finally:
        consumer.unassign()
    return counts, not pending


def reader(conf: dict[str, Any]) -> Consumer:
    """A read_committed consumer that never joins a group nor commits."""
    return Consumer({**conf, "group.id": "oncely-observe", "isolation.level": "read_committed",
                     "enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "earliest"})


class LagReader:
    """`read()` the group's lag; remembers partition counts and which small
    gaps held no records, so an idle group costs two batched requests."""

    def __init__(self, conf: dict[str, Any], group: str, topics: list[str], from_end: set[str] | None = None,
                 timeout: float = 5.0) -> None:
        self.conf = conf
        self.group = group
        self.topics = topics
        self.from_end = from_end or set()
        self.timeout = timeout
        self.admin = AdminClient(conf)
        self._consumer: Consumer | None = None
        self._tps: list[TP] = []
        self._tps_at = 0.0
        self._empty_gaps: dict[TP, tuple[int, int]] = {}  # (committed, end) known to hold no record

    def read(self) -> LagSnapshot:
        now = time.monotonic()
        if not self._tps or now - self._tps_at > TOPICS_EVERY:
            self._tps, self._tps_at = topic_partitions(self.admin, self.topics, self.timeout), now
        tps = self._tps
        committed = group_offsets(self.admin, self.group, self.timeout)
        ends = list_offsets(self.admin, tps, OffsetSpec.latest(), self.timeout)
        unread = [tp for tp in tps if tp not in committed and tp[0] not in self.from_end]
        starts = list_offsets(self.admin, unread, OffsetSpec.earliest(), self.timeout)
        raw: dict[TP, int] = {}
        for tp in tps:
            end = ends[tp]
            if tp in committed:
                raw[tp] = max(0, end - committed[tp])
            else:
                raw[tp] = max(0, end - starts[tp]) if tp in starts else 0
        gaps = {tp: (committed[tp], ends[tp]) for tp in tps if tp in committed and 0 < raw[tp] <= VERIFY_UP_TO
                and self._empty_gaps.get(tp) != (committed[tp], ends[tp])}
        if gaps:
            if self._consumer is None:
                self._consumer = reader(self.conf)
            counts, complete = count_records(self._consumer, gaps, self.timeout, first_only=True)
            if complete:
                for tp, n in counts.items():
                    if n == 0:
                        self._empty_gaps[tp] = gaps[tp]
        parts = []
        for tp in tps:
            lag = 0 if self._empty_gaps.get(tp) == (committed.get(tp), ends[tp]) else raw[tp]
            parts.append(PartitionLag(tp[0], tp[1], committed.get(tp), ends[tp], lag))
        return LagSnapshot(self.group, parts, time.time())

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


class LagWatcher:
    """Reads the lag every `interval` seconds on a daemon thread; `snapshot`
    is the last answer (None until the first one)."""

    def __init__(self, reader_: LagReader, interval: float = 5.0) -> None:
        self.reader = reader_
        self.interval = interval
        self.snapshot: LagSnapshot | None = None
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="oncely-lag", daemon=True)

    def start(self) -> "LagWatcher":
        self._thread.start()
        return self

    def _run(self) -> None:
        in_a_row = 0  # failures; fresh topics and a starting group fail a read or two
        while not self._stop.is_set():
            try:
                self.snapshot = self.reader.read()
                if in_a_row >= WARN_AFTER:
                    log.info("consumer lag of %s readable again", self.reader.group)
                in_a_row = 0
            except Exception as e:  # the broker may be away: try again next time
                self.failures += 1
                in_a_row += 1
                log.log(logging.WARNING if in_a_row == WARN_AFTER else logging.DEBUG,
                        "cannot read the consumer lag of %s: %s", self.reader.group, e)
            self._stop.wait(self.interval)
        self.reader.close()

    def stop(self, join: float = 0.0) -> None:
        """Ask the thread to end (it closes its clients after its current
        read, which is bounded); waits at most `join` seconds for it."""
        self._stop.set()
        if join:
            self._thread.join(join)

