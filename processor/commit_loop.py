"""One consumer, one transactional producer, one transaction per commit.

Every commit interval the process commits ONE Kafka transaction holding the
changelog records of every store change since the last commit, every record
produced by handlers (dead letters, and later sends and emits), and the
consumer offsets of every consumed partition. RocksDB is written only after
`commit_transaction` returns. Anything not in a committed transaction did not
happen: on an abortable error, on fencing, on a lost assignment, the
partitions are rewound (overlay dropped, in-memory invocations rebuilt from
RocksDB, consumer seeked to the last committed offsets).

Error policy (librdkafka's classes):
- retriable: the same call again; a timed-out commit is resumed by calling
  commit_transaction again, never aborted;
- abortable (txn_requires_abort): abort, rewind every partition, continue;
- fatal or fenced: drop the producer, rewind every partition, create a new
  producer (init_transactions fences the old epoch), continue.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from oncely import schemas
from oncely.egress.dead_letters import dead_letter
from oncely.errors import ConfigError
from oncely.egress.sinks import Sinks
from oncely.ingest.router import Routed, route
from oncely.processor.executor import LocalExecutor
from oncely.processor.partition import PartitionProcessor
from oncely.processor.restore import Restorer
from oncely.processor.store import PartitionStore

if TYPE_CHECKING:
    from oncely.app import App, AppConfig

log = logging.getLogger("oncely.commit")

# Consumer/producer settings oncely owns; a user override would break the guarantees.
RESERVED = {
    "group.id", "isolation.level", "enable.auto.commit", "enable.auto.offset.store", "transactional.id",
    "enable.idempotence", "partition.assignment.strategy", "transaction.timeout.ms", "acks",
}
_FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH,
           KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED}


class TxnFailed(Exception):
    def __init__(self, err: KafkaError, during: str, fatal: bool = False) -> None:
        super().__init__(f"{during}: {err}")
        self.err = err
        self.during = during
        self._fatal = fatal

    @property
    def fatal(self) -> bool:
        """Fatal or fenced. Any other error is handled by aborting (e.g. a
        produce() that fails with _STATE because the transaction already is in
        the abortable state); an abort that fails escalates to fatal."""
        e = self.err
        return self._fatal or e.fatal() or e.code() in _FENCED


class StateDirLock:
    """One process per state dir: two would share a transactional.id and
    fence each other forever."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / ".lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = Path(self.path).read_text().strip() or "?"
            os.close(self._fd)
            raise ConfigError(
                f"state dir {root} is in use by another oncely process (pid {other}); give each process "
                "its own --state-dir"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def transactional_id(root: Path, app: str) -> str:
    """Stable per state dir, so a restart fences its own zombie at once."""
    path = root / "transactional-id"
    if path.exists():
        return path.read_text().strip()
    tid = f"oncely-{app}-{uuid.uuid4().hex[:16]}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tid)
    tmp.rename(path)
    return tid


class CommitLoop:
    """Runs the partitions this process owns and commits them together."""

    def __init__(self, app: "App", config: "AppConfig", topic_facts: dict[str, Any] | None = None) -> None:
        if not config.bootstrap:
            raise ConfigError(
                "no Kafka bootstrap address: pass --bootstrap HOST:PORT, App(..., bootstrap=...) "
                "or set ONCELY_KAFKA_BOOTSTRAP"
            )
        bad = RESERVED & set(config.kafka)
        if bad:
            raise ConfigError(f"Kafka settings {sorted(bad)} are set by oncely itself; remove them from the app's kafka config")
        if config.commit_interval * 1000 >= config.transaction_timeout_ms:
            raise ConfigError("commit_interval must be well below transaction_timeout_ms")
        self.app = app
        self.cfg = config
        self.facts = topic_facts or {}
        self.root = Path(config.state_dir) / app.name
        self.sources: dict[str, list[Any]] = {}
        for sub in app.subscriptions:
            for t in sub.topics:
                self.sources.setdefault(t, []).append(sub)
        reset = str(config.kafka.get("auto.offset.reset", "earliest")).lower()
        if reset not in ("earliest", "smallest", "beginning", "latest", "largest", "end"):
            raise ConfigError(f"auto.offset.reset={reset!r}: use 'earliest' or 'latest' (where a subscription "
                              "starts on a source partition without committed offsets)")
        # Where source partitions without a committed offset start; the log
        # itself always starts at the beginning.
        self.source_start = OFFSET_END if reset in ("latest", "largest", "end") else OFFSET_BEGINNING
        self.executor = LocalExecutor(app)
        self.sinks = Sinks(app.sinks, self._topic_exists)
        self.partitions: dict[int, PartitionProcessor] = {}
        self.consumed: dict[tuple[str, int], int] = {}
        self.committed: dict[tuple[str, int], int] = {}
        self.produced = 0
        self.awaited = 0  # records for the app's log in the open transaction: others wait for them
        self.pending_records = 0
        self.txn_error: TxnFailed | None = None
        self.commits = 0
        self.txn_retries = 0
        self.aborts = 0
        self.producer_restarts = 0
        self._last_commit = time.monotonic()
        self._stopping = False
        self._lock: StateDirLock | None = None
        self.producer: Producer | None = None
        self.consumer: Consumer | None = None
        self.restorer: Restorer | None = None
        self.on_commit: Callable[[], None] | None = None  # test/metrics hook

    # -- Kafka clients --------------------------------------------------------------

    def _base_conf(self) -> dict[str, Any]:
        conf = {"bootstrap.servers": self.cfg.bootstrap, **self.cfg.kafka}
        conf.pop("auto.offset.reset", None)  # applied per source partition in _on_assign
        return conf

    def _new_producer(self) -> Producer:
        p = Producer({
            **self._base_conf(),
            "transactional.id": self.tid,
            "enable.idempotence": True,
            "transaction.timeout.ms": self.cfg.transaction_timeout_ms,
            "message.timeout.ms": self.cfg.transaction_timeout_ms,
            "linger.ms": 5,
            "queue.buffering.max.messages": 1_000_000,
            "compression.type": "lz4",
            # Keyed records land where Kafka's Java clients would put them.
            "partitioner": "murmur2_random",
        })
        # Unbounded: without a producer there is nothing else to do.
        self._retry_call(lambda: p.init_transactions(30), "init_transactions", bounded=False)
        p.begin_transaction()
        return p

    def _new_consumer(self) -> Consumer:
        return Consumer({
            **self._base_conf(),
            "group.id": self.app.name,
            "partition.assignment.strategy": "cooperative-sticky",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": self.cfg.session_timeout_ms,
            "heartbeat.interval.ms": max(500, self.cfg.session_timeout_ms // 5),
            "max.poll.interval.ms": self.cfg.max_poll_interval_ms,
            "fetch.wait.max.ms": 100,
        })

    def _retry_call(self, fn: Callable[[], Any], during: str, bounded: bool = True) -> Any:
        """Call `fn`, repeating it while librdkafka says the error is retriable.

        Retries are bounded by three transaction timeouts: a call that cannot
        finish by then (a broker gone for long, a client stuck waiting for an
        epoch bump) is treated as fatal, so the producer is replaced; the new
        producer's init_transactions settles the open transaction on the
        coordinator (completing a prepared commit, aborting anything else).
        """
        delay = 0.05
        budget = time.monotonic() + 3 * self.cfg.transaction_timeout_ms / 1000
        while True:
            try:
                return fn()
            except KafkaException as e:
                err = e.args[0]
                if err.retriable() and not err.fatal() and not err.txn_requires_abort():
                    if bounded and time.monotonic() > budget:
                        raise TxnFailed(err, f"{during} (still retriable after "
                                             f"{3 * self.cfg.transaction_timeout_ms / 1000:.0f} s)",
                                        fatal=True) from None
                    self.txn_retries += 1
                    log.warning("%s: retriable error, retrying: %s", during, err)
                    if self.producer is not None:
                        # Serve delivery reports: abort/commit wait for them.
                        self.producer.poll(0)
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                raise TxnFailed(err, during) from None

    def _topic_exists(self, topic: str) -> bool:
        from confluent_kafka.admin import AdminClient

        md = AdminClient(self._base_conf()).list_topics(topic, timeout=10)
        t = md.topics.get(topic)
        return t is not None and t.error is None

    # -- TxnOutput ------------------------------------------------------------------

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]] | None = None, partition: int | None = None,
                on_delivery: Callable | None = None) -> None:
        """Add a record to the open transaction. A failure poisons the
        transaction, so the next commit aborts and rewinds instead."""
        kwargs: dict[str, Any] = {"key": key, "value": value}
        if headers:
            kwargs["headers"] = headers
        if partition is not None:
            kwargs["partition"] = partition
        if on_delivery is not None:
            kwargs["on_delivery"] = on_delivery
        p = self.producer
        assert p is not None
        while True:
            try:
                p.produce(topic, **kwargs)
                break
            except BufferError:
                p.poll(0.01)
            except KafkaException as e:
                if self.txn_error is None:
                    self.txn_error = TxnFailed(e.args[0], f"produce to {topic}")
                return
        self.produced += 1
        if topic == self.app.log_topic:
            self.awaited += 1

    # -- rebalance ------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        if self._stopping:
            return
        t0 = time.monotonic()
        # With read_committed this waits until no transactional offset commit
        # of a previous owner is pending (KIP-447), before the changelog is read.
        committed = consumer.committed(tps, timeout=60) if tps else []
        t1 = time.monotonic()
        for tp in committed:
            if tp.offset < 0:
                tp.offset = OFFSET_BEGINNING if tp.topic == self.app.log_topic else self.source_start
            self.committed[(tp.topic, tp.partition)] = tp.offset
        self._open_partitions([tp.partition for tp in tps if tp.topic == self.app.log_topic])
        consumer.incremental_assign(committed)
        log.info("assigned %s in %.2f s (committed offsets %.2f s, restore %.2f s)",
                 sorted((t.topic, t.partition) for t in tps), time.monotonic() - t0, t1 - t0, time.monotonic() - t1)

    def _open_partitions(self, ps: list[int]) -> None:
        stores = {}
        for p in ps:
            store = PartitionStore(self.root / str(p), self.app.name, self.app.partitions, p)
            store.open()
            stores[p] = store
        assert self.restorer is not None
        self.restorer.restore(stores)
        for p, store in stores.items():
            part = PartitionProcessor(self.app, p, store, self.executor, self, self.cfg.net_effects, self.sinks)
            self.partitions[p] = part
            part.load()

    def _close_partition(self, p: int) -> None:
        part = self.partitions.pop(p, None)
        if part is not None:
            part.close()
            part.store.drop_overlay()
            part.store.close()

    def _on_revoke(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        log.info("revoking %s", sorted((t.topic, t.partition) for t in tps))
        if self.producer is not None:
            # Commit everything (the revoked partitions' progress included)
            # while our generation is still valid.
            self.commit(force=True)
        for tp in tps:
            if tp.topic == self.app.log_topic:
                self._close_partition(tp.partition)
            self.committed.pop((tp.topic, tp.partition), None)
            self.consumed.pop((tp.topic, tp.partition), None)
        consumer.incremental_unassign(tps)

    def _on_lost(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        log.warning("assignment lost: %s", sorted((t.topic, t.partition) for t in tps))
        for tp in tps:
            if tp.topic == self.app.log_topic:
                self._close_partition(tp.partition)
            self.committed.pop((tp.topic, tp.partition), None)
        # Nothing of the open transaction may be committed now: our group
        # generation is gone. Abort and rewind what we still own.
        self._abort_and_rewind("assignment lost")
        consumer.incremental_unassign(tps)

    # -- commit ---------------------------------------------------------------------

    def _dirty(self) -> bool:
        return bool(self.consumed) or self.produced > 0 or any(
            p.dirty or p.active or p.store.has_changes() for p in self.partitions.values())

    def commit(self, force: bool = False) -> bool:
        """Commit one transaction; returns True when it committed."""
        if not force and not self._dirty():
            self._last_commit = time.monotonic()
            return False
        assert self.producer is not None and self.consumer is not None
        try:
            if self.txn_error is not None:
                raise self.txn_error
            last_record: dict[int, list[int]] = {}
            changelog = self.app.changelog_topic
            for p, part in self.partitions.items():
                part.prepare_commit()
                overlay = part.store.overlay
                if not overlay:
                    continue
                box: list[int] = []
                last_record[p] = box

                def checkpoint(err: Any, msg: Any, box: list[int] = box) -> None:
                    """The offset of the partition's last record is its checkpoint."""
                    if err is None:
                        box.append(msg.offset())

                last = len(overlay) - 1
                for i, (k, v) in enumerate(overlay.items()):
                    self.produce(changelog, k, v, partition=p, on_delivery=checkpoint if i == last else None)
                if self.txn_error is not None:
                    raise self.txn_error
            if not self.consumed and self.produced == 0:
                self._last_commit = time.monotonic()
                return False
            if self.consumed:
                offsets = [TopicPartition(t, p, o) for (t, p), o in self.consumed.items()]
                meta = self.consumer.consumer_group_metadata()
                self._retry_call(lambda: self.producer.send_offsets_to_transaction(offsets, meta, self.cfg.txn_call_timeout),
                                 "send_offsets_to_transaction")
            self._retry_call(lambda: self.producer.commit_transaction(self.cfg.txn_call_timeout), "commit_transaction")
        except TxnFailed as f:
            self.txn_error = None
            if f.fatal:
                self._recover_fatal(str(f))
            else:
                self._abort_and_rewind(str(f))
            return False
        # Committed: make RocksDB reflect it, with the changelog offset.
        self.producer.poll(0)
        for p, part in self.partitions.items():
            box = last_record.get(p)
            if box is not None and not box:
                self.producer.flush(10)
            part.after_commit(box[0] + 1 if box else None)
        self.committed.update(self.consumed)
        self.consumed.clear()
        self.produced = 0
        self.awaited = 0
        self.pending_records = 0
        self.commits += 1
        self._last_commit = time.monotonic()
        if self.on_commit:
            self.on_commit()
        try:
            self.producer.begin_transaction()
        except KafkaException as e:
            self._recover_fatal(f"begin_transaction: {e}")
        return True

    def _abort_and_rewind(self, why: str) -> None:
        log.warning("aborting the transaction and rewinding: %s", why)
        self.aborts += 1
        if self.producer is not None:
            try:
                self._retry_call(lambda: self.producer.abort_transaction(self.cfg.txn_call_timeout),
                                 "abort_transaction")
            except TxnFailed as f:
                self._recover_fatal(f"abort failed: {f}")
                return
        self._rewind()
        if self.producer is not None:
            try:
                self.producer.begin_transaction()
            except KafkaException as e:
                self._recover_fatal(f"begin_transaction: {e}")

    def _recover_fatal(self, why: str) -> None:
        log.error("producer fenced or failed fatally, replacing it and rewinding: %s", why)
        self.producer_restarts += 1
        old = self.producer
        self.producer = None
        if old is not None:
            try:
                old.purge(in_queue=True, in_flight=True)
            except Exception:
                pass
            del old
        # First settle the old transaction (init_transactions completes or
        # aborts it), then read back what Kafka says was committed.
        self.producer = self._new_producer()
        self._rewind()

    def _rewind(self) -> None:
        """Back to what Kafka says is committed: overlays dropped, stores caught
        up from the changelog (a transaction whose outcome we did not see may
        have committed), in-memory invocations rebuilt, the consumer seeked to
        the committed offsets fetched again from the group coordinator."""
        self.produced = 0
        self.awaited = 0
        self.pending_records = 0
        self.txn_error = None
        self.consumed.clear()
        stores = {}
        for p, old in list(self.partitions.items()):
            old.close()
            old.store.drop_overlay()
            stores[p] = old.store
        assert self.restorer is not None and self.consumer is not None
        if stores:
            self.restorer.restore(stores)
        for p, store in stores.items():
            self.partitions[p] = PartitionProcessor(self.app, p, store, self.executor, self, self.cfg.net_effects, self.sinks)
        if stores:
            # The fresh processors start unpaused; so must the consumer.
            self.consumer.resume([TopicPartition(self.app.log_topic, p) for p in stores])
        for part in self.partitions.values():
            part.load()
        owned = [TopicPartition(t, p) for (t, p) in self.committed]
        if owned:
            for tp in self.consumer.committed(owned, timeout=60):
                off = tp.offset if tp.offset >= 0 else (
                    OFFSET_BEGINNING if tp.topic == self.app.log_topic else self.source_start)
                self.committed[(tp.topic, tp.partition)] = off
                self._seek(TopicPartition(tp.topic, tp.partition, off))

    def _seek(self, tp: TopicPartition) -> None:
        assert self.consumer is not None
        for _ in range(50):
            try:
                self.consumer.seek(tp)
                return
            except KafkaException as e:
                if e.args[0].code() != KafkaError._STATE:
                    raise
                time.sleep(0.05)  # partition not fetched yet; librdkafka needs a moment
        # Last resort: re-assign the partition at the offset.
        self.consumer.incremental_unassign([TopicPartition(tp.topic, tp.partition)])
        self.consumer.incremental_assign([tp])

    # -- the loop ---------------------------------------------------------------------

    def _handle(self, m: Any) -> None:
        err = m.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return
            if err.fatal():
                raise KafkaException(err)
            log.warning("consumer: %s", err)
            return
        topic, p, offset = m.topic(), m.partition(), m.offset()
        if topic == self.app.log_topic:
            part = self.partitions.get(p)
            if part is None:
                return
            try:
                kind, body = schemas.decode("log_record", m.value())["body"]
            except schemas.SchemaError as e:
                k, v, h = dead_letter(self.app.name, "undecodable-log-record", str(e), m.key(), m.value(),
                                      source={"topic": topic, "partition": p, "offset": offset})
                self.produce(self.app.dlq_topic, k, v, h)
            else:
                if kind == "oncely.Invoke":
                    part.on_invoke(body, offset)
                elif kind == "oncely.Response":
                    part.on_response(body)
                elif kind == "oncely.AwakeableResult":
                    part.on_awakeable_result(body)
                else:
                    k, v, h = dead_letter(self.app.name, "unsupported-log-record",
                                          f"{kind} records are not handled by this version", m.key(), m.value(),
                                          source={"topic": topic, "partition": p, "offset": offset})
                    self.produce(self.app.dlq_topic, k, v, h)
        else:
            subs = self.sources.get(topic)
            if subs is None:
                return
            for sub in subs:
                self._ingest(sub, m)
        self.consumed[(topic, p)] = offset + 1
        self.pending_records += 1

    def _ingest(self, sub: Any, m: Any) -> None:
        """A source record becomes an Invoke on the log (or a dead letter) in
        the open transaction, which also carries the source offset."""
        sub.stats["read"] += 1
        out = route(self.app.name, self.app.partitions, sub, m)
        if isinstance(out, Routed):
            self.produce(self.app.log_topic, out.key, out.value, partition=out.partition)
            sub.stats["invoked"] += 1
        else:
            self.produce(self.app.dlq_topic, out.key, out.value, out.headers)
            sub.stats["dead"] += 1
            log.warning("%s: %s[%d]@%d dead-lettered (%s)", sub.name, m.topic(), m.partition(), m.offset(),
                        out.reason)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = StateDirLock(self.root)
        self.tid = transactional_id(self.root, self.app.name)
        self.restorer = Restorer(self._base_conf(), self.app.changelog_topic,
                                 self.facts.get("changelog_delete_retention_ms", 24 * 3600 * 1000))
        self.producer = self._new_producer()
        self.consumer = self._new_consumer()
        self.consumer.subscribe([self.app.log_topic, *self.sources], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)

    async def run(self, stop: asyncio.Event) -> None:
        """Process until `stop` is set, then shut down cleanly."""
        self.start()
        try:
            await self._loop(stop)
        finally:
            await self.shutdown()

    def _apply_backpressure(self) -> None:
        """Pause log partitions holding too many unfinished invocations.

        A paused partition also holds back the Responses and awakeable
        results its waiting invocations need, so when none of its
        invocations progressed for `stall_after` it reads on, whatever it
        holds: a backlog of callers must not deadlock on its own callees.
        Waiting invocations read that way are bounded by suspension."""
        limit = self.cfg.max_inflight_per_partition
        consumer = self.consumer
        assert consumer is not None
        now = time.monotonic()
        stall_after = max(0.5, 5 * self.cfg.commit_interval)
        for p, part in self.partitions.items():
            n = len(part.invocations)
            if part.progress != part.progress_seen:
                part.progress_seen, part.progress_at = part.progress, now
                part.reading_on = False
            if not part.paused and n >= limit and not part.reading_on:
                consumer.pause([TopicPartition(self.app.log_topic, p)])
                part.paused = True
            elif part.paused and (n < limit // 2 or now - part.progress_at >= stall_after):
                consumer.resume([TopicPartition(self.app.log_topic, p)])
                part.paused = False
                if n >= limit // 2:
                    # Stalled: read on until something progresses.
                    part.reading_on = True
                    log.info("partition %d: %d invocations in flight made no progress for %.1f s; reading on "
                             "for the completions they wait for", p, n, stall_after)

    def _in_flight(self) -> int:
        return sum(len(p.invocations) for p in self.partitions.values())

    async def _drain(self) -> None:
        """Let runnable invocations finish before a commit (no new input):
        stop when nothing is left, when nothing progressed in an iteration
        (the rest waits on timers or I/O), or after the drain budget."""
        deadline = time.monotonic() + self.cfg.commit_interval * self.cfg.commit_drain_share
        before = self._in_flight()
        stalled = 0
        # A task's step and its done callback run in consecutive loop
        # iterations, so only several iterations without progress mean that
        # what is left is waiting on something.
        while before and stalled < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0)
            now = self._in_flight()
            stalled = stalled + 1 if now >= before else 0
            before = min(before, now)

    async def _loop(self, stop: asyncio.Event) -> None:
        cfg = self.cfg
        consumer = self.consumer
        assert consumer is not None
        idle = 0.0
        while not stop.is_set():
            msgs = consumer.consume(500, timeout=0)
            for m in msgs:
                self._handle(m)
            if msgs:
                self._apply_backpressure()
            now = int(time.time() * 1000)
            for part in self.partitions.values():
                part.fire_timers(now)
            await asyncio.sleep(0)
            since = time.monotonic() - self._last_commit
            # Records for the log wait for the commit before anyone can read
            # them (a callee's Invoke, a caller's Response): when there is
            # nothing else to read, commit them after a tenth of the interval.
            if (since >= cfg.commit_interval or self.pending_records >= cfg.max_batch
                    or (self.awaited and not msgs and since >= cfg.commit_interval * 0.1)):
                await self._drain()
                self.commit()
                self._apply_backpressure()
            if msgs:
                idle = 0.0
            else:
                idle = min(0.02, idle + 0.001)
                await asyncio.sleep(idle)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Finish what runs (up to `grace` s), commit, leave the group, close."""
        self._stopping = True
        deadline = time.monotonic() + grace
        try:
            # Sleeping invocations are not waited for: their timers are
            # durable and wake them after the restart.
            while self.producer is not None and time.monotonic() < deadline and any(
                    not inv.waiting for p in self.partitions.values() for inv in p.active):
                await asyncio.sleep(0.01)
                now = int(time.time() * 1000)
                for part in self.partitions.values():
                    part.fire_timers(now)
            if self.producer is not None and self.consumer is not None:
                for part in self.partitions.values():
                    part.suspend_waiting()
                self.commit()
        finally:
            for p in list(self.partitions):
                self._close_partition(p)
            if self.consumer is not None:
                try:
                    self.consumer.close()
                except Exception as e:  # leaving the group is best effort
                    log.warning("closing the consumer: %s", e)
                self.consumer = None
            if self.producer is not None:
                try:
                    self.producer.abort_transaction(5)
                except Exception:
                    pass
                self.producer.flush(5)
                self.producer = None
            if self.restorer is not None:
                self.restorer.close()
                self.restorer = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None
