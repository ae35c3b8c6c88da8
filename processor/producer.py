"""The transactional producer: one open transaction at a time, and every
librdkafka error class mapped to one of three outcomes.

- COMMITTED: the transaction committed.
- REWIND: it was aborted (an abortable error); the caller rewinds to what
  Kafka says is committed and goes on with the same producer.
- REPLACE: the outcome is unknown or the producer is unusable (fatal,
  fenced, a timed-out commit/abort/send-offsets, a call that outlived its
  bound). The producer is dropped without another transactional call and a
  new one takes its transactional.id: its `init_transactions` bumps the
  epoch, which settles the old transaction on the coordinator (librdkafka has
  no transactions v2, KIP-890, so a timed-out commit is never retried on the
  same producer: a late marker could land in the next transaction). The
  caller then rewinds.

Records are attributed to the invocations that made them (record_faults.py)
only after a transaction failed (`CAREFUL_TXNS`): the rewind replays what
that transaction held, this time attributed, and the next failure names its
owners.

A commit is two calls: `start_commit` sends it on its way (a `Pending` job
on the worker), `end_commit` takes its outcome. librdkafka accepts no
records in between, so records produced meanwhile wait here (`_held`) and
go into the next transaction once it begins, or are dropped with it.

A full local queue never holds the loop: the records wait in the open
transaction and its commit's job produces them first (overflow.py).

Every blocking call runs on this producer's `Worker` (see worker.py); its
life, start to replacement, is producer_lifecycle.py's.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Collection

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from oncely.processor.overflow import produce_waiting
from oncely.processor.producer_lifecycle import CAREFUL_TXNS, ProducerLifecycle
from oncely.processor.record_faults import attributed, refused
from oncely.processor.reports import MAX_WAIT, wait_for_reports
from oncely.processor.txn_state import CommitResult, Committing, OpenTxn, Outcome
from oncely.processor.worker import Stuck

log = logging.getLogger("oncely.producer")

_FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH,
           KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED}
# Stages of a commit's job after commit_transaction returned (txn_opener.py).
OPENING = "opening the next transaction"
OPENED = "opened the next transaction"


class TxnProducer(ProducerLifecycle):
    """The open transaction's records, its commit and its abort."""

    # -- the open transaction -------------------------------------------------------

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]] | None = None, partition: int | None = None,
                owner: bytes | None = None, on_delivery: Callable[[Any, Any], None] | None = None) -> None:
        """Add a record to the open transaction. A failure poisons the
        transaction (the commit then aborts), and its owner with it. While
        the previous transaction commits, librdkafka takes no records: they
        wait here until the next one begins."""
        if self.committing is not None:
            self._held.append((topic, key, value, headers, partition, owner, on_delivery))
            self.txn.produced += 1
            return
        txn = self.txn
        if owner is not None and self.careful:
            on_delivery = attributed(txn, owner, topic, on_delivery)
        p = self._producer
        assert p is not None, "no producer"
        part = -1 if partition is None else partition  # -1: librdkafka's partitioner decides
        if txn.overflow:  # behind the records the queue had no room for (overflow.py)
            txn.overflow.append((topic, value, key, part, on_delivery, headers or None, owner))
            txn.produced += 1
            return
        try:
            # Positional, and keywords only when set: the common record (no
            # headers, no report) takes the cheapest call confluent-kafka has.
            if on_delivery is None and not headers:
                p.produce(topic, value, key, part)
            else:
                p.produce(topic, value, key, part, on_delivery=on_delivery, headers=headers or None)
        except BufferError:
            txn.overflow.append((topic, value, key, part, on_delivery, headers or None, owner))
        except KafkaException as e:
            refused(txn, e, topic, owner)
            return
        txn.produced += 1

    @property
    def overflowing(self) -> bool:
        """Records of the open transaction wait for room in librdkafka's
        queue: the loop reads no more and commits (overflow.py)."""
        return bool(self.txn.overflow)

    def produce_all(self, topic: str, partition: int, records: Collection[tuple[bytes, bytes | None]],
                    on_last: Callable[[Any, Any], None] | None = None) -> None:
        """Add many unowned records (a partition's changelog at a commit) to
        the open transaction, in order; `on_last` reports the last one."""
        p = self._producer
        assert p is not None and self.committing is None, "no producer, or one committing"
        produce = p.produce
        txn = self.txn
        overflow = txn.overflow
        last = len(records) - 1
        for i, (key, value) in enumerate(records):
            report = on_last if i == last else None
            if overflow:  # (overflow.py)
                overflow.append((topic, value, key, partition, report, None, None))
                txn.produced += 1
                continue
            try:
                if report is None:
                    produce(topic, value, key, partition)
                else:
                    produce(topic, value, key, partition, on_delivery=report)
            except BufferError:
                overflow.append((topic, value, key, partition, report, None, None))
            except KafkaException as e:
                refused(txn, e, topic, None)
                continue
            txn.produced += 1

    def _serving(self) -> bool:
        return self.serving

    def poll(self) -> None:
        """Serve delivery reports that are ready (never blocks): the loop
        does on every pass, so the commit finds them served (reports.py)."""
        p = self._producer
        if p is None:
            return
        try:
            p.poll(0)
        except KafkaException as e:
            # confluent-kafka raises a fatal error from here the first time
            # it is served. The next transactional call fails with it too,
            # and that is where the outcome is decided (REPLACE).
            log.debug("poll: %s", e)

    # -- commit and abort -------------------------------------------------------------

    def commit(self, offsets: list[TopicPartition], group_metadata: Any) -> CommitResult:
        """Commit the open transaction (with the consumer offsets), waiting
        for it, and open the next one."""
        started = self.start_commit(offsets, group_metadata)
        return started if isinstance(started, CommitResult) else self.end_commit(started)

    def start_commit(self, offsets: list[TopicPartition], group_metadata: Any) -> "Committing | CommitResult":
        """Send the open transaction's commit (with the consumer offsets) on
        its way; records produced meanwhile belong to the next transaction.
        A transaction that cannot commit is aborted at once (a CommitResult)."""
        p, worker, txn = self._producer, self._worker, self.txn
        assert p is not None and worker is not None and self.committing is None
        if txn.error is not None:  # a produce() failed at once: nothing of it may commit
            why = "; ".join(w for _, w in txn.faults[:3]) or f"produce failed: {txn.error}"
            undelivered = list(txn.unacked.values())
            return CommitResult(self.abort(why), why, list(txn.faults), undelivered)
        stage = ["send_offsets_to_transaction"]
        timeout = self.call_timeout
        opener = self.opener if self.opener is not None and self.opener.ready else None
        held = self._held  # records produced meanwhile, for the next transaction
        opening: list[float] = []

        def commit() -> None:
            if txn.overflow:  # records the queue had no room for go first, waiting for it here
                stage[0] = "producing the records the producer's queue had no room for"
                produce_waiting(p, txn, self.overflow_wait)
            # Delivered and reported first, the reports served by the loop,
            # not one GIL hand-over each by commit_transaction here (reports.py).
            stage[0] = "waiting for delivery reports"
            self.stats.reports_left += wait_for_reports(p, self._serving, min(MAX_WAIT, timeout / 4))
            stage[0] = "send_offsets_to_transaction"
            t0 = time.monotonic()
            if offsets:
                p.send_offsets_to_transaction(offsets, group_metadata, timeout)
            stage[0] = "commit_transaction"
            p.commit_transaction(timeout)  # it flushes first; a record that failed makes it abortable
            # Committed. Records wait: open the next one for them (txn_opener.py),
            # unless the commit was slow (the job's bound is shared) or its
            # producer was given up meanwhile.
            if opener is not None and held and time.monotonic() - t0 < self.bound / 2 and self._worker is worker:
                stage[0] = OPENING
                opening.append(time.monotonic())
                p.begin_transaction()
                opener.open(p)
                stage[0] = OPENED
                opening.append(time.monotonic())

        self.committing, self.txn = txn, OpenTxn()
        bound = self.bound + (self.overflow_wait if txn.overflow else 0.0)
        return Committing(worker.start(commit, bound), stage, opening)

    def end_commit(self, committing: "Committing") -> CommitResult:
        """The commit's outcome (waiting for it, up to its bound). Committed:
        the next transaction begins with the records held meanwhile; else
        they are dropped with it (the caller rewinds)."""
        self.serving = False  # (waiting here, the caller serves no reports: reports.py)
        p, worker, txn = self._producer, self._worker, self.committing
        assert p is not None and worker is not None and txn is not None
        held, self._held = self._held, []
        try:
            committing.pending.result(committing.stage[0])
        except (Stuck, KafkaException) as e:
            if committing.stage[0] in (OPENING, OPENED):  # committed; opening the next one failed
                return self._not_opened(e, produced=self.txn.produced)
            return self._not_committed(committing, e)
        self.committing = None
        self.stats.commits += 1
        if self.careful:
            self.careful -= 1
        produced = self.txn.produced
        if committing.stage[0] == OPENED:
            self.txn = OpenTxn()
        elif not self._begin():
            # A new producer: the records made meanwhile are gone with the
            # old one, so the caller rewinds after applying this commit.
            return CommitResult(Outcome.COMMITTED, next_lost=produced > 0)
        if held:
            self._replay(held)
        self.txn.produced = produced  # (counted when held)
        return CommitResult(Outcome.COMMITTED)

    def _replay(self, held: list[tuple]) -> None:
        """The records held while the commit was on its way, into the new
        transaction: a plain one (no headers, report or attribution) straight
        to librdkafka, one call for each of these ~40 % of all records; any
        other, or one refused here, through `produce`, which says why."""
        p, txn, produce = self._producer, self.txn, self.produce
        assert p is not None
        librdkafka = p.produce
        careful = self.careful
        for record in held:
            topic, key, value, headers, partition, owner, on_delivery = record
            if on_delivery is None and not headers and not txn.overflow and (owner is None or not careful):
                try:
                    librdkafka(topic, value, key, -1 if partition is None else partition)
                    continue
                except (BufferError, KafkaException):
                    pass  # (produce records the fault, or the overflow)
            produce(*record)

    def _not_committed(self, committing: "Committing", e: Exception) -> CommitResult:
        p, worker, txn = self._producer, self._worker, self.committing
        assert p is not None and worker is not None and txn is not None
        self.committing = None
        if isinstance(e, Stuck):
            undelivered = list(txn.unacked.values())
            return CommitResult(self._replace_now("stuck", str(e)), str(e), list(txn.faults), undelivered)
        self.txn = txn  # what abort() aborts; the held records never reached librdkafka
        during = committing.stage[0]
        err = e.args[0]
        if err.txn_requires_abort() and not err.fatal():
            try:  # delivery reports of the failed records name their owners
                worker.call(lambda: p.poll(0), self.bound, "poll")
            except Stuck as stuck:
                return CommitResult(self._replace_now("stuck", str(stuck)), str(stuck))
        undelivered = list(txn.unacked.values())
        return CommitResult(self._classify(err, during), f"{during}: {err}", list(txn.faults), undelivered)

    def _not_opened(self, e: Exception, produced: int) -> CommitResult:
        """The commit went through, opening the next transaction did not:
        it is aborted (the producer replaced when stuck), and the records
        held for it are dropped (the caller rewinds after applying the
        commit)."""
        self.committing = None
        self.stats.commits += 1
        why = f"{OPENING}: {e}"
        assert self.opener is not None
        self.opener.failed(e)  # (a stuck one too: each costs an abandoned producer)
        if isinstance(e, Stuck):
            self.replace(why, "stuck")
        else:
            self.abort(why)
        return CommitResult(Outcome.COMMITTED, next_lost=produced > 0)

    def _classify(self, err: KafkaError, during: str) -> Outcome:
        if err.fatal() or err.code() in _FENCED:
            return self._replace_now("fatal", f"{during}: {err}")
        if err.txn_requires_abort():
            return self.abort(f"{during}: {err}")
        # Retriable (a timeout) or anything else: the outcome is unknown.
        return self._replace_now("unknown-outcome", f"{during} (outcome unknown): {err}")

    def abort(self, why: str) -> Outcome:
        """Abort the open transaction and open the next one: REWIND, or
        REPLACE when the abort itself fails or times out."""
        log.warning("aborting the transaction: %s", why)
        assert self.committing is None, "a commit is on its way"
        self.stats.aborts += 1
        self.careful = CAREFUL_TXNS
        p, worker = self._producer, self._worker
        assert p is not None and worker is not None
        def abort() -> None:
            p.poll(0)  # abort_transaction wants the delivery reports at hand served first
            p.abort_transaction(self.call_timeout)

        try:
            worker.call(abort, self.bound, "abort_transaction")
        except (Stuck, KafkaException) as e:
            return self._replace_now("abort-failed", f"abort_transaction: {e}")
        self._begin()
        return Outcome.REWIND

    def clear_pending_offsets(self, offsets: list[TopicPartition], group_metadata: Any) -> Outcome:
        """Abort the open transaction after adding the group's offsets to
        it. The abort marker the coordinator then writes for our producer id
        completes every pending offset commit of that id in the group, also
        a late one from an earlier epoch (a TxnOffsetCommit retried after its
        transaction ended: without transactions v2 the group coordinator
        accepts it, and it would hold read_committed offset fetches for good).
        REWIND, or REPLACE when a call fails."""
        p, worker = self._producer, self._worker
        assert p is not None and worker is not None
        log.warning("clearing pending offset commits of this producer with an aborted transaction")
        try:
            worker.call(lambda: p.send_offsets_to_transaction(offsets, group_metadata, self.call_timeout),
                        self.bound, "send_offsets_to_transaction")
        except (Stuck, KafkaException) as e:
            return self._replace_now("offsets-blocked", f"clearing pending offsets: {e}")
        return self.abort("clearing pending offset commits")

    def _begin(self) -> bool:
        """Open the next transaction; False: it took a new producer."""
        self.txn = OpenTxn()
        p, worker = self._producer, self._worker
        assert p is not None and worker is not None
        try:
            worker.call(p.begin_transaction, self.bound, "begin_transaction")
        except (Stuck, KafkaException) as e:
            self.replace(f"begin_transaction: {e}", "begin-failed")
            return False
        return True

    def _replace_now(self, cause: str, why: str) -> Outcome:
        self.replace(why, cause)
        return Outcome.REPLACE
