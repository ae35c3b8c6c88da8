"""Getting a working transactional producer, and letting go of a broken one.

The producer's `start` retries (each try bounded) until librdkafka hands out
a producer with an open transaction; `replace` drops a producer whose
transaction's outcome is unknown or that is unusable, without another
transactional call, and starts a new one under the same transactional.id
(producer.py says when). Every blocking call runs on the producer's
`Worker` (worker.py); a stuck one is abandoned and counted, and too many
make the process give up (a supervisor restarts it).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from confluent_kafka import KafkaException, Producer

from oncely.processor.overflow import OVERFLOW_WAIT
from oncely.processor.txn_opener import TxnOpener
from oncely.processor.txn_state import GiveUp, OpenTxn, TxnStats
from oncely.processor.worker import Stuck, Worker

log = logging.getLogger("oncely.producer")

# A process that has abandoned this many stuck producers gives up (exits;
# a supervisor restarts it): librdkafka is not recovering in this process.
MAX_ABANDONED = 3
# Transactions whose owned records are attributed after one failed (a
# rewind replays a failed transaction's records within the first few).
CAREFUL_TXNS = 10


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
        # The loop is busy and serves delivery reports each pass (it sets this): the commit's job leaves
        # them to it (reports.py). Off while it naps or waits for a commit, and with no loop at all.
        self.serving = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """A producer with an open transaction; retried (each try bounded)
        until it works or a stop is requested."""
        attempt = 0
        while True:
            attempt += 1
            worker = Worker(f"producer-{self.stats.replacements + attempt}", self.interrupt)
            try:
                p = worker.call(lambda: Producer(self.conf), self.bound, "creating the producer")
                self._init(worker, p)
                worker.call(p.begin_transaction, self.bound, "begin_transaction")
            except Stuck as e:
                self._count_abandoned()
                if e.interrupted:
                    raise
                continue
            except KafkaException as e:
                worker.close()
                raise GiveUp(f"cannot start a transactional producer: {e.args[0]}") from None
            self._producer, self._worker = p, worker
            self.txn = OpenTxn()
            self._prepare_opener()
            return

    def _init(self, worker: Worker, p: Producer) -> None:
        """init_transactions, again while librdkafka calls the error
        retriable (the coordinator is loading or unreachable)."""
        while True:
            try:
                worker.call(lambda: p.init_transactions(self.call_timeout), self.bound, "init_transactions")
                return
            except KafkaException as e:
                err = e.args[0]
                if not err.retriable() or err.fatal():
                    raise
                if self.interrupt.is_set():
                    raise Stuck("init_transactions", 0.0, interrupted=True) from None
                log.warning("init_transactions: %s; trying again", err)

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

    def _count_abandoned(self) -> None:
        self.stats.abandoned += 1
        if self.stats.abandoned >= MAX_ABANDONED and not self.interrupt.is_set():
            raise GiveUp(f"{self.stats.abandoned} Kafka producers got stuck in librdkafka calls; exiting so that "
                         "a supervisor restarts the process (its state is safe in Kafka)")

    def replace(self, why: str, cause: str = "other") -> None:
        """Drop the producer (without another transactional call) and start
        a new one under the same transactional.id. `cause`: stuck, fatal,
        unknown-outcome, abort-failed, begin-failed (counted per cause)."""
        self.stats.replaced_for[cause] += 1
        self.careful = CAREFUL_TXNS
        self._drop()
        if self.interrupt.is_set():
            log.warning("dropped the transactional producer (%s); stopping, so no new one", why)
            return
        log.error("replacing the transactional producer: %s", why)
        self.stats.replacements += 1
        self.start()

    def _drop(self) -> None:
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
            worker.call(destroy, self.bound, "closing the old producer")
        except Stuck:
            self._count_abandoned()
        except KafkaException:
            box.clear()
        worker.close()

    def close(self) -> None:
        """Abort what is open and close (bounded; a stuck producer is left)."""
        p, worker = self._producer, self._worker
        if p is None or worker is None:
            return
        if not worker.stuck:
            try:
                worker.call(lambda: p.abort_transaction(min(5.0, self.call_timeout)), self.bound, "abort on close")
            except (KafkaException, Stuck):
                pass
        self._drop()

    @property
    def ready(self) -> bool:
        return self._producer is not None
