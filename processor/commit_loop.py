"""The poll loop: one consumer, one transactional producer, one transaction
per commit.

Every commit interval the process commits ONE Kafka transaction holding the
changelog records of every store change since the last commit, every record
produced by handlers and by ingest, and the consumer offsets of every
consumed partition. RocksDB is written only after the commit returns.
Anything not in a committed transaction did not happen: when a transaction
is aborted or its outcome is unknown, the partitions rewind (see
assignment.py) to what Kafka says is committed.

Who owns what:
- producer.py: the open transaction and the mapping of librdkafka's error
  classes to COMMITTED / REWIND / REPLACE;
- assignment.py: partitions from assigned to running (offset fetch and
  restore off the loop thread), revocation, rewind;
- partition.py: the invocations of one log partition;
- this module: reading, routing each record, deciding when to commit,
  backpressure, shutdown.

No blocking librdkafka call runs unbounded on the loop thread (worker.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from oncely import schemas
from oncely.egress.dead_letters import dead_letter
from oncely.egress.sinks import Sinks
from oncely.errors import ConfigError
from oncely.ingest.router import Routed, route
from oncely.logs import kafka_conf_logging
from oncely.processor.assignment import Assignment
from oncely.processor.executor import LocalExecutor
from oncely.processor.identity import StateDirLock, group_instance_id, transactional_id
from oncely.processor.partition import PartitionProcessor
from oncely.processor.producer import Outcome, TxnProducer
from oncely.processor.progress import Progress
from oncely.processor.protocol import CLIENT_MAX_BYTES, limits_for
from oncely.processor.restore import Restorer
from oncely.processor.store import PartitionStore
from oncely.processor.worker import Stuck, Worker

if TYPE_CHECKING:
    from oncely.app import App, AppConfig

log = logging.getLogger("oncely.commit")

# Consumer/producer settings oncely owns; a user override would break the guarantees.
RESERVED = {
    "group.id", "isolation.level", "enable.auto.commit", "enable.auto.offset.store", "transactional.id",
    "enable.idempotence", "partition.assignment.strategy", "transaction.timeout.ms", "acks",
    "group.instance.id",
}
# The watchdog's bound on one blocking client call, beyond librdkafka's own timeout.
WATCHDOG_SLACK = 2.0
# Recovery jobs that fail in a row (offset fetches timing out) before the
# producer is replaced, in case a transaction of ours holds the offsets.
FETCH_FAILURES_BEFORE_REPLACE = 2


class CommitLoop:
    """Runs the partitions this process owns and commits them together."""

    def __init__(self, app: "App", config: "AppConfig", topic_facts: dict[str, Any] | None = None,
                 interrupt: threading.Event | None = None) -> None:
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
        # Set by a stop request (a signal): waits on stuck client calls end.
        self.interrupt = interrupt or threading.Event()
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
        client_max = int(config.kafka.get("message.max.bytes", CLIENT_MAX_BYTES))
        topic_max = self.facts.get("max_message_bytes", {})
        self.limits = limits_for(app.changelog_topic, app.log_topic, topic_max, client_max)
        self.sinks.topic_max, self.sinks.client_max = topic_max, client_max
        self.bound = config.txn_call_timeout + WATCHDOG_SLACK
        self.consumed: dict[tuple[str, int], int] = {}
        self.pending_records = 0
        # Invocations whose records can never be produced (or whose outcome
        # could not be applied): failed with the reason when they next start,
        # instead of being replayed after every rewind.
        self.poisoned: dict[bytes, str] = {}
        self.rewinds = 0
        self.consumer_restarts = 0
        self._fault: str | None = None
        self._last_commit = time.monotonic()
        self._stopping = False
        self._lock: StateDirLock | None = None
        self.txn: TxnProducer | None = None
        self.consumer: Consumer | None = None
        self.restorer: Restorer | None = None
        self.assignment: Assignment | None = None
        self._admin_worker: Worker | None = None
        self.on_commit: Callable[[], None] | None = None  # test/metrics hook
        self.metrics: Any = None  # oncely.observe.Metrics when --metrics is on (its hooks below)
        self.progress = Progress(self)

    # -- counters (tests and metrics read them) -------------------------------------

    @property
    def partitions(self) -> dict[int, PartitionProcessor]:
        return self.assignment.partitions if self.assignment is not None else {}

    @property
    def commits(self) -> int:
        return self.txn.stats.commits if self.txn else 0

    @property
    def aborts(self) -> int:
        return self.txn.stats.aborts if self.txn else 0

    @property
    def producer_restarts(self) -> int:
        return self.txn.stats.replacements if self.txn else 0

    @property
    def abandoned(self) -> int:
        """Kafka clients left stuck inside librdkafka (the process must exit hard)."""
        return self.txn.stats.abandoned if self.txn else 0

    # -- Kafka clients --------------------------------------------------------------

    def _base_conf(self) -> dict[str, Any]:
        # librdkafka's lines through Python logging, repeats collapsed.
        conf = {**kafka_conf_logging(), "bootstrap.servers": self.cfg.bootstrap, **self.cfg.kafka}
        conf.pop("auto.offset.reset", None)  # applied per source partition in the assignment
        return conf

    def _producer_conf(self) -> dict[str, Any]:
        return {
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
        }

    def _new_consumer(self) -> Consumer:
        conf = {
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
        }
        if self.cfg.static_membership:
            conf["group.instance.id"] = group_instance_id(self.root, self.app.name)
        return Consumer(conf)

    def _fetch_committed(self, tps: list[TopicPartition], stable: bool = True) -> list[TopicPartition]:
        """The group's committed offsets (read_committed: waits while a
        transaction holding offsets for them is open). A fresh consumer each
        time, on the restore worker: after a broker restart a long-lived
        client can keep a stale group coordinator, and its fetches then time
        out for good (seen with the main consumer after a static member was
        fenced)."""
        conf = {**self._base_conf(), "group.id": self.app.name, "enable.auto.commit": False,
                "isolation.level": "read_committed" if stable else "read_uncommitted"}
        c = Consumer(conf)
        try:
            return c.committed(tps, timeout=self.cfg.txn_call_timeout)
        finally:
            c.close()

    def _topic_exists(self, topic: str) -> bool:
        from confluent_kafka.admin import AdminClient

        md = AdminClient(self._base_conf()).list_topics(topic, timeout=10)
        t = md.topics.get(topic)
        return t is not None and t.error is None

    # -- TxnOutput (what partitions produce through) ---------------------------------

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]] | None = None, partition: int | None = None,
                owner: bytes | None = None) -> None:
        assert self.txn is not None
        self.txn.produce(topic, key, value, headers, partition, owner)

    def fault(self, inv_id: bytes, why: str) -> None:
        """An invocation's outcome could not be applied (an internal error):
        the open transaction may hold half of it, so it is aborted and the
        invocation fails with the reason when it next starts."""
        log.error("invocation %s: %s; aborting the transaction", inv_id.hex(), why)
        self.poisoned[inv_id] = why
        self._fault = why

    # -- rebalance callbacks (run inside consumer.consume) ---------------------------

    def _on_assign(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        if self._stopping or self.assignment is None:
            return
        log.info("assigned %s", sorted((t.topic, t.partition) for t in tps))
        self.assignment.assign([(t.topic, t.partition) for t in tps])

    def _on_revoke(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        log.info("revoking %s", sorted((t.topic, t.partition) for t in tps))
        if self.txn is not None and self.txn.ready and not self._stopping:
            # Commit everything (the revoked partitions' progress included)
            # while our generation is still valid.
            self.commit(force=True)
        self._forget([(t.topic, t.partition) for t in tps])

    def _on_lost(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        log.warning("assignment lost: %s", sorted((t.topic, t.partition) for t in tps))
        self._forget([(t.topic, t.partition) for t in tps])
        # Nothing of the open transaction may be committed now: our group
        # generation is gone. Abort and rewind what we still own.
        if self.txn is not None and self.txn.ready:
            self._settle(self.txn.abort("assignment lost"))

    def _forget(self, tps: list[tuple[str, int]]) -> None:
        for tp in tps:
            self.consumed.pop(tp, None)
        assert self.assignment is not None
        self.assignment.revoke(tps)

    # -- commit ---------------------------------------------------------------------

    def _dirty(self) -> bool:
        assert self.txn is not None
        return bool(self.consumed) or self.txn.txn.produced > 0 or self._fault is not None or any(
            p.dirty or p.active or p.store.has_changes() for p in self.partitions.values())

    def commit(self, force: bool = False) -> bool:
        """Commit one transaction; returns True when it committed."""
        txn, consumer = self.txn, self.consumer
        assert txn is not None and consumer is not None
        if not txn.ready:
            return False  # dropped on a stop request; nothing can commit now
        started = time.monotonic()
        if not force and not self._dirty():
            self._last_commit = time.monotonic()
            return False
        if self._fault is not None:
            why, self._fault = self._fault, None
            self._settle(txn.abort(why))
            return False
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
                txn.produce(changelog, k, v, partition=p, on_delivery=checkpoint if i == last else None)
        if not self.consumed and txn.txn.produced == 0:
            self._last_commit = time.monotonic()
            return False
        offsets = [TopicPartition(t, p, o) for (t, p), o in self.consumed.items()]
        records = txn.txn.produced
        result = txn.commit(offsets, consumer.consumer_group_metadata() if offsets else None)
        if result.outcome is not Outcome.COMMITTED:
            for owner, reason in result.faults:
                self.poisoned.setdefault(owner, reason)
            self._poison_missing_topics(result.undelivered)
            self._settle(result.outcome)
            return False
        # Committed: make RocksDB reflect it, with the changelog offset.
        txn.poll()
        assert self.assignment is not None
        finished = failed = 0
        for p, part in self.partitions.items():
            box = last_record.get(p)
            done, dead = part.after_commit(box[0] + 1 if box else None)
            finished += done
            failed += dead
        self.progress.committed(self.pending_records, finished, failed)
        if self.metrics is not None: self.metrics.committed(time.monotonic() - started, records)
        self.assignment.committed.update(self.consumed)
        self.consumed.clear()
        self.pending_records = 0
        self._last_commit = time.monotonic()
        if self.on_commit:
            self.on_commit()
        return True

    def _poison_missing_topics(self, undelivered: list[tuple[bytes, str]]) -> None:
        """Records that never left because their topic is gone (a sink
        deleted after start): librdkafka retries them until the commit times
        out, every time. Their owners fail instead."""
        topics = {t for _, t in undelivered if t not in self.app.internal_topics}
        if not topics:
            return
        worker = Worker("metadata", self.interrupt)
        try:
            existing = worker.call(lambda: self._admin().list_topics(timeout=self.cfg.txn_call_timeout).topics,
                                   self.bound, "list_topics")
        except Exception as e:  # the broker may be the problem: decide nothing
            log.warning("cannot check the topics of undelivered records: %s", e)
            return
        finally:
            worker.close()
        for owner, topic in undelivered:
            if topic in topics and topic not in existing:
                self.poisoned.setdefault(owner, f"a record for {topic} cannot be produced: the topic does not exist "
                                                "(deleted after the processor started?)")

    def _admin(self) -> Any:
        from confluent_kafka.admin import AdminClient

        return AdminClient(self._base_conf())

    def _unblock_offsets(self) -> None:
        """Offset fetches keep timing out. Under read_committed they wait
        while an offset commit of a transaction is pending, and after a broker
        restart one of ours can be left pending for good: a TxnOffsetCommit
        that librdkafka retried after its transaction was aborted. An aborted
        transaction holding the group's offsets completes it (the marker is
        per producer id); the partitions rewind."""
        assignment, txn, consumer = self.assignment, self.txn, self.consumer
        assert assignment is not None and txn is not None and consumer is not None
        assignment.failures = 0
        tps = [TopicPartition(t, p) for t, p in assignment.owned()]
        worker = Worker("offsets", self.interrupt)
        try:
            seen = worker.call(lambda: self._fetch_committed(tps, stable=False), self.bound, "offset fetch")
        except Exception as e:
            log.warning("cannot read the group's offsets either: %s", e)
            return
        finally:
            worker.close()
        # Aborted, so the values do not matter; they only name the group.
        offsets = [TopicPartition(tp.topic, tp.partition, max(tp.offset, 0)) for tp in seen]
        self._settle(txn.clear_pending_offsets(offsets, consumer.consumer_group_metadata()))

    def _settle(self, outcome: Outcome) -> None:
        """After an abort or a replaced producer: rewind every partition."""
        if outcome is Outcome.COMMITTED:
            return
        self.rewinds += 1
        if self.metrics is not None: self.metrics.rewound()
        self.consumed.clear()
        self.pending_records = 0
        self._fault = None
        assert self.assignment is not None
        self.assignment.rewind()

    # -- the loop ---------------------------------------------------------------------

    def _handle(self, m: Any) -> None:
        err = m.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return
            if err.fatal() or err.code() == KafkaError._FATAL:
                self._replace_consumer(str(err))
                return
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
                if self.metrics is not None: self.metrics.dead_letter("undecodable-log-record")
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
                    if self.metrics is not None: self.metrics.dead_letter("unsupported-log-record")
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

    def _replace_consumer(self, why: str) -> None:
        """A consumer with a fatal error (e.g. a static member fenced after
        its session expired in a broker outage) reads nothing more: abort
        the open transaction (our membership is gone), drop the consumer
        and join the group with a new one."""
        log.error("replacing the consumer: %s", why)
        self.consumer_restarts += 1
        if self.metrics is not None: self.metrics.rewound()
        old = self.consumer
        assert self.assignment is not None and self.txn is not None
        self.consumed.clear()
        self.pending_records = 0
        if self.txn.ready:
            self.txn.abort(f"consumer failed: {why}")
        closer = Worker("close-consumer", self.interrupt)
        try:
            closer.call(old.close, self.bound, "closing the failed consumer")  # type: ignore[union-attr]
        except Stuck:
            self.txn.stats.abandoned += 1
        except Exception as e:
            log.warning("closing the failed consumer: %s", e)
        closer.close()
        self.consumer = self._new_consumer()
        self.assignment.reset(self.consumer)
        self.consumer.subscribe([self.app.log_topic, *self.sources], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)

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
            if self.metrics is not None: self.metrics.dead_letter(out.reason)
            log.warning("%s: %s[%d]@%d dead-lettered (%s)", sub.name, m.topic(), m.partition(), m.offset(),
                        out.reason)

    def _new_partition(self, p: int, store: PartitionStore) -> PartitionProcessor:
        return PartitionProcessor(self.app, p, store, self.executor, self, self.cfg.net_effects, self.sinks,
                                  poisoned=self.poisoned, limits=self.limits)

    def _open_store(self, p: int) -> PartitionStore:
        store = PartitionStore(self.root / str(p), self.app.name, self.app.partitions, p)
        store.open()
        return store

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = StateDirLock(self.root)
        self.tid = transactional_id(self.root, self.app.name)
        self.restorer = Restorer(self._base_conf(), self.app.changelog_topic,
                                 self.facts.get("changelog_delete_retention_ms", 24 * 3600 * 1000))
        self.txn = TxnProducer(self._producer_conf(), self.bound, self.cfg.txn_call_timeout, self.app.log_topic,
                               self.interrupt)
        self.restorer.metrics = self.metrics
        self.txn.start()
        self.consumer = self._new_consumer()
        self.assignment = Assignment(self.app.log_topic, self.consumer, self.restorer,
                                     self._fetch_committed, self._new_partition, self._open_store, self.source_start,
                                     self.interrupt)
        self.consumer.subscribe([self.app.log_topic, *self.sources], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)

    async def run(self, stop: asyncio.Event) -> None:
        """Process until `stop` is set, then shut down cleanly."""
        try:
            self.start()
            await self._loop(stop)
        except Stuck as e:
            if not e.interrupted:
                raise
            log.warning("stopping while Kafka does not answer: %s", e)
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
        assignment, txn = self.assignment, self.txn
        assert assignment is not None and txn is not None
        idle = 0.0
        while not stop.is_set() and not self.interrupt.is_set():
            started = assignment.poll()
            if assignment.failures >= FETCH_FAILURES_BEFORE_REPLACE:
                self._unblock_offsets()
            if started:
                self.progress.started(started)
            self.progress.tick()
            consumer = self.consumer  # replaced after a fatal error
            assert consumer is not None
            try:
                msgs = consumer.consume(500, timeout=0)
            except KafkaException as e:
                if not e.args[0].fatal():
                    raise
                self._replace_consumer(str(e.args[0]))
                continue
            for m in msgs:
                self._handle(m)
                if self.consumer is not consumer:
                    break  # replaced: the rest belongs to the old membership
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
            if (since >= cfg.commit_interval or self.pending_records >= cfg.max_batch or self._fault is not None
                    or (txn.txn.awaited and not msgs and since >= cfg.commit_interval * 0.1)):
                await self._drain()
                self.commit()
                self._apply_backpressure()
            if msgs:
                idle = 0.0
            else:
                idle = min(0.02, idle + 0.001)
                await asyncio.sleep(idle)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Finish what runs (up to `grace` s), commit, leave, close. Every
        step is bounded: a stop during a broker outage still ends."""
        self._stopping = True
        deadline = time.monotonic() + grace
        txn = self.txn
        try:
            # Sleeping invocations are not waited for: their timers are
            # durable and wake them after the restart.
            while (txn is not None and txn.ready and not self.interrupt.is_set() and time.monotonic() < deadline
                   and any(not inv.waiting for p in self.partitions.values() for inv in p.active)):
                await asyncio.sleep(0.01)
                now = int(time.time() * 1000)
                for part in self.partitions.values():
                    part.fire_timers(now)
            if txn is not None and txn.ready and self.consumer is not None:
                for part in self.partitions.values():
                    part.suspend_waiting()
                try:
                    self.commit()
                except Stuck as e:
                    log.warning("final commit abandoned: %s", e)
        finally:
            self._close_clients()
            self.progress.stopped()

    def _close_clients(self) -> None:
        if self.assignment is not None:
            self.assignment.close()
        closer = Worker("close", self.interrupt)
        if self.consumer is not None:
            consumer = self.consumer
            self.consumer = None
            try:
                closer.call(consumer.close, self.bound, "closing the consumer")
            except Stuck as e:
                log.warning("%s", e)
                if self.txn is not None:
                    self.txn.stats.abandoned += 1
            except Exception as e:  # leaving the group is best effort
                log.warning("closing the consumer: %s", e)
        if self.txn is not None:
            self.txn.close()
        if self.restorer is not None:
            restorer = self.restorer
            self.restorer = None
            try:
                closer.call(restorer.close, self.bound, "closing the restore consumer")
            except Exception as e:
                log.warning("closing the restore consumer: %s", e)
        closer.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
