"""Getting a working transactional producer, and letting go of a broken one.

`start` retries (each try bounded) until librdkafka hands out a producer
with an open transaction. After a failed transaction the producer gets an
open one back by a *recovery*: `abort` (abort_transaction, then
begin_transaction) or `replace` (the producer is dropped without another
transactional call, and a new one takes the same transactional.id: its
init_transactions bumps the epoch, which settles the old transaction on the
coordinator; producer.py says when). A recovery runs as bounded jobs on a
worker (worker.py); an abort that fails becomes a replacement. Standalone
(`stepped` off), the caller waits for it, as `start` does. Under the poll
loop (`stepped` on) the loop steps it each pass (`step`) and reads nothing
until it is done: during a broker outage a replacement retries
init_transactions until the broker answers, and the loop, meanwhile, keeps
answering (its admin API, a stop request; the group's callbacks wait, as
they waited for the blocked loop before). A stuck call is abandoned and
counted, and too many make the process give up (a supervisor restarts it).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from confluent_kafka import KafkaException, Producer

from oncely.processor.overflow import OVERFLOW_WAIT
from oncely.processor.txn_opener import TxnOpener
from oncely.processor.txn_state import GiveUp, OpenTxn, TxnStats
from oncely.processor.worker import Pending, Stuck, Worker

log = logging.getLogger("oncely.producer")

# A process that has abandoned this many stuck producers gives up (exits;
# a supervisor restarts it): librdkafka is not recovering in this process.
MAX_ABANDONED = 3
# Transactions whose owned records are attributed after one failed (a
# rewind replays a failed transaction's records within the first few).
CAREFUL_TXNS = 10
# Between two tries of init_transactions that failed retriably (each waits
# up to the call timeout for the broker, or fails at once when none is up).
RETRY_PAUSE = 0.5


class _Recovery:
    """A producer on its way back to an open transaction."""

    def __init__(self, kind: str, why: str) -> None:
        self.kind = kind  # "abort" (this producer), "replace" or "start" (a new one)
        self.why = why
        self.worker: Worker | None = None
        # The new producer, kept across retried init_transactions (a box per worker: a try that
        # outlived its bound and ends late writes into its own, abandoned box).
        self.made: list[Producer] = []
        self.pending: Pending[Producer] | None = None
        self.stage = ""
        self.not_before = 0.0


class ProducerLifecycle:
    """The producer's life: its state, `start`, `replace`, `close`
    (TxnProducer adds the transactions)."""

    def __init__(self, conf: dict[str, Any], bound: float, call_timeout: float, interrupt: threading.Event,
                 opener: TxnOpener | None = None) -> None:
        self.conf = conf
        self.opener = opener
        self.bound = bound                # the watchdog's limit for one blocking call
        self.call_timeout = call_timeout  # librdkafka's own timeout for it
        self.interrupt = interrupt
        self.stats = TxnStats()
        self.txn = OpenTxn()
        self._producer: Producer | None = None
        self._worker: Worker | None = None
        self.careful = 0  # transactions left that attribute their records (after a failure)
        self.committing: OpenTxn | None = None  # the transaction whose commit is on its way
        self._held: list[tuple[Any, ...]] = []  # records of the open one, produced once it begins
        self.overflow_wait = OVERFLOW_WAIT  # the commit's job waits this long for room in the queue (overflow.py)
        self.stepped = False  # a recovery is stepped by the poll loop (`step`), not waited for
        self._recovery: _Recovery | None = None
        self._closing: list[Pending[None]] = []  # old producers being destroyed, not waited for
        # The loop is busy and serves delivery reports each pass (it sets this): the commit's job leaves
        # them to it (reports.py). Off while it naps or waits for a commit, and with no loop at all.
        self.serving = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """A producer with an open transaction; retried (each try bounded)
        until it works or a stop is requested."""
        self._recover("start", "starting")

    @property
    def recovering(self) -> bool:
        """An abort or a replacement is under way: no open transaction yet."""
        return self._recovery is not None

    def _recover(self, kind: str, why: str) -> None:
        """Start a recovery (module docstring); standalone, wait for it."""
        assert self._recovery is None, "a recovery is under way"
        self.txn = OpenTxn()
        self._recovery = _Recovery(kind, why)
        if not self.stepped:
            while not self.step():
                if self.interrupt.is_set():
                    raise Stuck(self._recovery.stage if self._recovery else kind, 0.0, interrupted=True)
                time.sleep(0.005)

    def step(self) -> bool:
        """Take a recovery one step on without blocking (a finished job's
        outcome, the next job); True once the producer has an open
        transaction again. Raises GiveUp when it never will."""
        if self._closing:
            self._reap_closing()
        rec = self._recovery
        if rec is None:
            return True
        if rec.pending is None:
            if time.monotonic() >= rec.not_before:
                self._submit(rec)
            return False
        if not rec.pending.ready():
            return False
        pending, rec.pending = rec.pending, None
        try:
            p = pending.result(rec.stage)  # (done, or past its bound: Stuck)
        except Stuck as e:
            if e.interrupted:
                raise
            if rec.kind == "abort":
                self._to_replace(rec, f"abort_transaction: {e}", "abort-failed")  # (its drop counts it)
            else:
                self._count_abandoned()
                rec.worker, rec.made = None, []  # left behind; the next try makes new ones
            return False
        except KafkaException as e:
            err = e.args[0]
            if rec.kind == "abort":
                self._to_replace(rec, f"abort_transaction: {err}", "abort-failed")
                return False
            if not err.retriable() or err.fatal():
                if rec.worker is not None:
                    rec.worker.close()
                self._recovery = None
                raise GiveUp(f"cannot start a transactional producer: {err}") from None
            log.warning("init_transactions: %s; trying again", err)
            rec.not_before = time.monotonic() + RETRY_PAUSE
            return False
        self._producer, self._worker = p, rec.worker
        self._recovery = None
        self.txn = OpenTxn()
        if rec.kind != "abort":
            self._prepare_opener()
        return True

    def _submit(self, rec: _Recovery) -> None:
        """The recovery's next job: the abort, or one try of a new producer."""
        timeout = self.call_timeout
        if rec.kind == "abort":
            p, worker = self._producer, self._worker
            assert p is not None and worker is not None

            def abort() -> Producer:
                p.poll(0)  # abort_transaction wants the delivery reports at hand served first
                p.abort_transaction(timeout)
                p.begin_transaction()
                return p

            rec.worker, rec.stage = worker, "abort_transaction"
            try:
                rec.pending = worker.start(abort, self.bound)
            except Stuck as e:  # (an earlier call on it is stuck)
                self._to_replace(rec, str(e), "abort-failed")
            return
        if rec.worker is None:
            rec.worker = Worker(f"producer-{self.stats.replacements + self.stats.abandoned + 1}", self.interrupt)
        conf, made = self.conf, rec.made

        def attempt() -> Producer:
            if not made:
                made.append(Producer(conf))
            p = made[0]  # init_transactions is retried on the same producer
            p.init_transactions(timeout)
            p.begin_transaction()
            return p

        rec.stage = "init_transactions"
        rec.pending = rec.worker.start(attempt, self.bound)

    def _to_replace(self, rec: _Recovery, why: str, cause: str) -> None:
        """The abort failed: the producer is replaced instead."""
        self._count_replacement(why, cause)
        self._drop()
        rec.kind, rec.why, rec.worker, rec.made, rec.not_before = "replace", why, None, [], 0.0

    def _count_abandoned(self) -> None:
        self.stats.abandoned += 1
        if self.stats.abandoned >= MAX_ABANDONED and not self.interrupt.is_set():
            raise GiveUp(f"{self.stats.abandoned} Kafka producers got stuck in librdkafka calls; exiting so that "
                         "a supervisor restarts the process (its state is safe in Kafka)")

    def _count_replacement(self, why: str, cause: str) -> None:
        self.stats.replaced_for[cause] += 1
        self.stats.replacements += 1
        self.careful = CAREFUL_TXNS
        log.error("replacing the transactional producer: %s", why)

    def _prepare_opener(self) -> None:
        """On a worker of its own: a stuck lookup must not cost the producer."""
        opener = self.opener
        if opener is not None and opener.metadata is None and not opener.off:
            worker = Worker("opener", self.interrupt)
            try:
                worker.call(opener.prepare, self.bound, "preparing the transaction opener")
            except (Stuck, KafkaException) as e:
                opener.turn_off(str(e))
            finally:
                worker.close()

    def replace(self, why: str, cause: str = "other") -> None:
        """Drop the producer (without another transactional call) and start
        a new one under the same transactional.id. `cause`: stuck, fatal,
        unknown-outcome, abort-failed, begin-failed (counted per cause)."""
        self._drop()
        if self.interrupt.is_set():
            self.stats.replaced_for[cause] += 1
            self.careful = CAREFUL_TXNS
            log.warning("dropped the transactional producer (%s); stopping, so no new one", why)
            return
        self._count_replacement(why, cause)
        self._recover("replace", why)

    def _drop(self, wait: bool = False) -> None:
        """Let go of the producer: purged and destroyed on its worker,
        waited for only when `wait` (a close); a destroy that outlives its
        bound counts as an abandoned producer (`_reap_closing`)."""
        p, worker = self._producer, self._worker
        self._producer = self._worker = None
        if p is None or worker is None:
            return
        if worker.stuck:
            self._count_abandoned()  # never touch it again; its thread stays blocked
            return
        box = [p]
        del p

        def destroy() -> None:
            box[0].purge(in_queue=True, in_flight=True)
            box.clear()  # the last reference: rd_kafka_destroy runs here, on the worker

        try:
            pending = worker.start(destroy, self.bound)
            if wait:
                pending.result("closing the old producer")
            else:
                self._closing.append(pending)
        except Stuck:
            self._count_abandoned()
        except KafkaException:
            box.clear()
        worker.close()

    def _reap_closing(self) -> None:
        for pending in list(self._closing):
            if pending.future.done():
                self._closing.remove(pending)
            elif pending.ready():  # past its bound: stuck in rd_kafka_destroy
                self._closing.remove(pending)
                pending.worker.stuck = True
                self._count_abandoned()

    def close(self) -> None:
        """Abort what is open and close (bounded; a stuck producer is left).
        An abort under way is waited for instead of aborted again; a new
        producer on its way is left to its worker."""
        rec, self._recovery = self._recovery, None
        aborting = rec is not None and rec.kind == "abort" and rec.pending is not None
        if aborting:
            try:
                rec.pending.result("abort on close")  # type: ignore[union-attr]
            except (KafkaException, Stuck):
                pass
        elif rec is not None and rec.worker is not None and rec.worker is not self._worker:
            rec.worker.close()
        p, worker = self._producer, self._worker
        if p is not None and worker is not None and not worker.stuck and not aborting:
            try:
                worker.call(lambda: p.abort_transaction(min(5.0, self.call_timeout)), self.bound, "abort on close")
            except (KafkaException, Stuck):
                pass
        self._drop(wait=True)
        for pending in self._closing:  # old producers still being destroyed: up to their bound
            try:
                pending.result("closing an old producer")
            except Stuck:
                self.stats.abandoned += 1
            except KafkaException:
                pass
        self._closing.clear()

    @property
    def ready(self) -> bool:
        """A producer with an open transaction (no recovery under way)."""
        return self._producer is not None and self._recovery is None
