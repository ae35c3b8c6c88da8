"""The poll loop: one consumer, one transactional producer, one transaction
per commit.

Every commit interval the process commits ONE Kafka transaction holding the
changelog records of every store change since the last commit, every record
produced by handlers and by ingest, and the consumer offsets of every
consumed partition. RocksDB is written only after the commit returns.
Anything not in a committed transaction did not happen: when a transaction
is aborted or its outcome is unknown, the partitions rewind (see
assignment.py) to what Kafka says is committed. The loop does not wait for
a commit's round trips: it goes on with the next transaction meanwhile
(`start_commit`, `end_commit`; one commit on its way at a time).

Who owns what:
- transaction.py: one interval's transaction (offsets, changelog, commit);
- producer.py: the producer and librdkafka's errors → COMMITTED / REWIND / REPLACE;
- assignment.py: partitions from assigned to running, revocation, rewind;
- rebalance.py: the group's callbacks, and letting go of the consumer at a stop;
- recovery.py: what the loop does when a Kafka client fails;
- dispatch.py: each record read, to its partition or to the log;
- pacing.py: input backpressure, and the drain before a commit;
- partition.py: the invocations of one log partition;
- this module: reading, deciding when to commit, shutdown.

No blocking librdkafka call runs unbounded on the loop thread (worker.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from confluent_kafka import Consumer, KafkaError, KafkaException

from oncely.egress.sinks import Sinks
from oncely.processor import dispatch, recovery
from oncely.processor.assignment import Assignment
from oncely.preflight import check_app_settings
from oncely.processor.clients import KafkaClients, close_clients, source_start
from oncely.remote.executor import executor_for
from oncely.processor.identity import StateDirLock, transactional_id
from oncely.processor.overflow import OVERFLOW_WAIT
from oncely.processor.pacing import Pacing
from oncely.processor.partition import PartitionProcessor
from oncely.processor.producer import TxnProducer
from oncely.processor.txn_opener import TxnOpener, opener_group
from oncely.processor.txn_state import CommitResult, Outcome
from oncely.processor.progress import Progress
from oncely.processor.rebalance import GroupMember
from oncely.sdk.protocol import CLIENT_MAX_BYTES, limits_for
from oncely.processor.restore import Restorer
from oncely.processor.store import PartitionStore
from oncely.processor.transaction import Transaction
from oncely.processor.worker import Stuck

if TYPE_CHECKING:
    from oncely.app import App, AppConfig

log = logging.getLogger("oncely.commit")

# The watchdog's bound on one blocking client call, beyond librdkafka's own timeout.
WATCHDOG_SLACK = 2.0
# Records one poll takes at most; a poll that took fewer than EARLY_BELOW
# read what was there, not a backlog (early commits, below).
POLL_BATCH = 500
EARLY_BELOW = 50
# The longest sleep of an idle loop pass: what a record arriving after a
# quiet spell waits before it is read (an idle pass only polls the local
# queue and the timers).
IDLE_MAX = 0.005


class CommitLoop:
    """Runs the partitions this process owns and commits them together."""

    def __init__(self, app: "App", config: "AppConfig", topic_facts: dict[str, Any] | None = None,
                 interrupt: threading.Event | None = None) -> None:
        check_app_settings(app)  # the same checks as `oncely run` makes before creating anything
        self.source_start = source_start(config)
        self.app = app
        self.log_topic = app.log_topic  # (a property that formats it: read once per record)
        self.cfg = config
        self.facts = topic_facts or {}
        self.root = Path(config.state_dir) / app.name
        self.clients = KafkaClients(app, config, self.root)
        # Set by a stop request (a signal): waits on stuck client calls end.
        self.interrupt = interrupt or threading.Event()
        self.sources: dict[str, list[Any]] = {}
        for sub in app.subscriptions:
            for t in sub.topics:
                self.sources.setdefault(t, []).append(sub)
        self.executor = executor_for(app)  # in-process, or routing to remote deployments too
        self.sinks = Sinks(app.sinks, self.clients.topic_exists)
        client_max = int(config.kafka.get("message.max.bytes", CLIENT_MAX_BYTES))
        topic_max = self.facts.get("max_message_bytes", {})
        self.limits = limits_for(app.changelog_topic, app.log_topic, topic_max, client_max)
        self.sinks.topic_max, self.sinks.client_max = topic_max, client_max
        self.bound = config.txn_call_timeout + WATCHDOG_SLACK
        # Invocations whose records can never be produced (or whose outcome
        # could not be applied): failed with the reason when they next start,
        # instead of being replayed after every rewind.
        self.poisoned: dict[bytes, str] = {}
        self.rewinds = 0
        self.consumer_restarts = 0
        self._last_commit = time.monotonic()
        self.stopping = False  # set by shutdown: rebalance callbacks then only let go
        self.pacing = Pacing(self)
        self.lock: StateDirLock | None = None
        self.txn: TxnProducer | None = None
        self.open: Transaction | None = None
        self.committing: Transaction | None = None  # the one whose commit is on its way
        self.consumer: Consumer | None = None
        self.member: GroupMember | None = None
        self.restorer: Restorer | None = None
        self.assignment: Assignment | None = None
        self.on_commit: Callable[[], None] | None = None  # test hook
        self.metrics: Any = None  # oncely.observe.Metrics when --metrics is on
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

    # -- TxnOutput (what partitions produce through) ---------------------------------

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]] | None = None, partition: int | None = None,
                owner: bytes | None = None) -> None:
        # Straight to the producer (the open Transaction only forwards);
        # `start` binds it in place of this method.
        self.txn.produce(topic, key, value, headers, partition, owner)  # type: ignore[union-attr]

    def fault(self, inv_id: bytes, why: str) -> None:
        """An invocation's outcome could not be applied (an internal error):
        the open transaction may hold half of it, so it is aborted and the
        invocation fails with the reason when it next starts."""
        log.error("invocation %s: %s; aborting the transaction", inv_id.hex(), why)
        self.poisoned[inv_id] = why
        assert self.open is not None
        self.open.fault = why

    def subscribe(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.pacing.paused_sources.clear()
        self.member = GroupMember(self, consumer)  # its rebalance callbacks: rebalance.py

    # -- commit ---------------------------------------------------------------------

    def commit(self, force: bool = False) -> bool:
        """Commit the open transaction and wait for it (after the one on its
        way, if any); returns True when it committed."""
        if self.committing is not None:
            self.end_commit()
        return self.start_commit(force) and self.end_commit()

    def start_commit(self, force: bool = False) -> bool:
        """Send the open transaction's commit on its way and open the next
        transaction; True when a commit is on its way (`end_commit`)."""
        txn, consumer, open_ = self.txn, self.consumer, self.open
        assert txn is not None and consumer is not None and open_ is not None and self.committing is None
        if not txn.ready:
            return False  # dropped on a stop request; nothing can commit now
        self._last_commit = time.monotonic()
        if not force and not open_.dirty(self.partitions.values()):
            return False
        failed = open_.start(self.partitions, consumer.consumer_group_metadata)
        if failed is not None:
            self._failed(failed[0])
            return False
        if open_.on_its_way is None:
            return False
        if self.metrics is not None:
            self.metrics.freeze()
        self.committing = open_
        self.new_transaction()
        return True

    def end_commit(self) -> bool:
        """Take the outcome of the commit on its way (waiting for it up to
        its bound); returns True when it committed."""
        committing = self.committing
        assert committing is not None and committing.on_its_way is not None
        started = committing.pending.started
        try:
            result, done = committing.end(self.partitions)
        finally:
            self.committing = None
        if done is None:
            self._failed(result)
            return False
        self.progress.committed(done.records, done.finished, done.failed)
        if self.metrics is not None:
            # (the job may have gone on to open the next transaction: that is not this commit's time)
            self.metrics.committed(time.monotonic() - started - done.opening_s, done.produced)
        self.assignment.committed.update(done.offsets)  # type: ignore[union-attr]
        if self.on_commit:
            self.on_commit()
        if result.next_lost:
            self.settle(Outcome.REPLACE)
        return True

    def _failed(self, result: CommitResult) -> None:
        for owner, reason in result.faults:
            self.poisoned.setdefault(owner, reason)
        recovery.poison_missing_topics(self, result.undelivered)
        self.settle(result.outcome)

    def new_transaction(self) -> None:
        assert self.txn is not None
        self.open = Transaction(self.txn, self.app.changelog_topic, self.app.log_topic)

    def settle(self, outcome: Outcome) -> None:
        """After an abort or a replaced producer: a new transaction, and
        every partition rewinds to what Kafka says is committed."""
        assert self.assignment is not None
        self.new_transaction()
        if outcome is Outcome.COMMITTED:
            return
        self.rewinds += 1
        if self.metrics is not None:
            self.metrics.rewound()
        self.assignment.rewind()

    # -- the loop ---------------------------------------------------------------------

    def _handle_all(self, msgs: list[Any], consumer: Consumer) -> None:
        """One poll's records, in order; the in-process executor's spare
        task stays current across their handlers' first steps (executor.py)."""
        batch = self.executor.in_process
        if batch is not None:
            batch.enter_batch()
        try:
            for m in msgs:
                self._handle(m)
                if self.consumer is not consumer:
                    break  # replaced: the rest belongs to the old membership
        finally:
            if batch is not None:
                batch.end_batch()

    def _handle(self, m: Any) -> None:
        err = m.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return
            if err.fatal() or err.code() == KafkaError._FATAL:
                recovery.replace_consumer(self, str(err))
                return
            log.warning("consumer: %s", err)
            return
        topic, p = m.topic(), m.partition()
        local = self.assignment.local  # type: ignore[union-attr]
        if topic == self.log_topic:
            part = self.partitions.get(p)
            if part is None:
                return
            dispatch.log_record(self.app, part, m, self, local)
        else:
            subs = self.sources.get(topic)
            if subs is None:
                return
            for sub in subs:
                dispatch.source_record(self.app, sub, m, self, local)
        assert self.open is not None
        self.open.consumed_record(topic, p, m.offset())

    def new_partition(self, p: int, store: PartitionStore) -> PartitionProcessor:
        return PartitionProcessor(self.app, p, store, self.executor, self, self.cfg.net_effects, sinks=self.sinks,
                                  poisoned=self.poisoned, limits=self.limits)

    def _open_store(self, p: int) -> PartitionStore:
        store = PartitionStore(self.root / str(p), self.app.name, self.app.partitions, p)
        store.open()
        return store

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = StateDirLock(self.root)
        clients = self.clients
        self.restorer = Restorer(clients.base(), self.app.changelog_topic,
                                 self.facts.get("changelog_delete_retention_ms", 24 * 3600 * 1000))
        opener = TxnOpener(clients.base(), opener_group(self.app.name), self.app.changelog_topic)
        self.txn = TxnProducer(clients.producer_conf(transactional_id(self.root, self.app.name)), self.bound,
                               self.cfg.txn_call_timeout, self.interrupt, opener)
        self.restorer.metrics = self.metrics
        # Waiting for room in a full queue beyond half the transaction timeout is futile (overflow.py).
        self.txn.overflow_wait = min(OVERFLOW_WAIT, self.cfg.transaction_timeout_ms / 2000)
        self.txn.start()
        # What partitions produce through, bound to the producer itself: one
        # Python call less for every record (the method below is the same).
        self.produce = self.txn.produce  # type: ignore[method-assign]
        self.new_transaction()
        consumer = clients.consumer()
        self.assignment = Assignment(self.app.log_topic, consumer, self.restorer, clients.fetch_committed,
                                     self.new_partition, self._open_store, self.source_start, self.interrupt)
        self.subscribe(consumer)

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

    def _fire_timers(self) -> None:
        now = int(time.time() * 1000)
        for part in self.partitions.values():
            part.fire_timers(now)

    async def _loop(self, stop: asyncio.Event) -> None:
        cfg = self.cfg
        assignment, txn = self.assignment, self.txn
        assert assignment is not None and txn is not None
        idle = 0.0
        while not stop.is_set() and not self.interrupt.is_set():
            if self.committing is not None and self.committing.pending.ready():
                self.end_commit()
            started = assignment.poll()
            if assignment.failures >= recovery.FETCH_FAILURES_BEFORE_REPLACE:
                recovery.unblock_offsets(self)
            if started:
                self.progress.started(started)
            self.progress.tick()
            consumer = self.consumer  # replaced after a fatal error
            assert consumer is not None
            open_ = self.open
            assert open_ is not None
            try:
                # While a commit is on its way the loop goes on, up to a full
                # transaction (records wait in memory until the next begins).
                # Nor while records wait for room in the producer's queue
                # (overflow.py): the commit below takes them first.
                full = (self.committing is not None and open_.records >= cfg.max_batch) or txn.overflowing
                msgs = [] if full else consumer.consume(POLL_BATCH, timeout=0)
            except KafkaException as e:
                if not e.args[0].fatal():
                    raise
                recovery.replace_consumer(self, str(e.args[0]))
                continue
            if msgs:
                self._handle_all(msgs, consumer)
            self.pacing.pump()
            txn.poll()  # delivery reports, here rather than in the commit's flush (reports.py)
            self._fire_timers()
            await asyncio.sleep(0)
            since = time.monotonic() - self._last_commit
            open_ = self.open
            assert open_ is not None
            # Produced records wait for the commit before anyone can read
            # them (a reply, an output, a callee's Invoke): when the poll
            # found no backlog, commit them now (early commit), as soon as
            # the commit before is done (one at a time).
            if self.committing is None and (
                    since >= cfg.commit_interval or open_.records >= cfg.max_batch or open_.fault is not None
                    or txn.overflowing or (open_.outputs and len(msgs) < EARLY_BELOW)):
                await self.pacing.drain_and_commit()
            if msgs:
                idle = 0.0
            else:
                idle = min(IDLE_MAX, idle + 0.001)  # (less when the commit on its way ends sooner:)
                txn.serving = False  # the commit's job serves the reports while the loop naps (reports.py)
                await (asyncio.sleep(idle) if self.committing is None else self.committing.pending.nap(idle))
            txn.serving = True


    async def shutdown(self, grace: float = 5.0) -> None:
        """Finish what runs (up to `grace` s), commit, leave, close. Every
        step is bounded: a stop during a broker outage still ends."""
        self.stopping = True
        deadline = time.monotonic() + grace
        txn = self.txn
        try:
            # Sleeping invocations are not waited for: their timers are
            # durable and wake them after the restart.
            while (txn is not None and txn.ready and not self.interrupt.is_set() and time.monotonic() < deadline
                   and any(not inv.waiting for p in self.partitions.values() for inv in p.active)):
                await asyncio.sleep(0.01)
                self._fire_timers()
            if txn is not None and txn.ready and self.consumer is not None:
                try:
                    if self.committing is not None:
                        self.end_commit()
                    for part in self.partitions.values():
                        part.suspend_waiting()
                    self.commit()
                except Stuck as e:
                    log.warning("final commit abandoned: %s", e)
        finally:
            close_clients(self)
            self.progress.stopped()
