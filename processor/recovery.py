"""What the poll loop does when a Kafka client fails under it.

Each function takes the `CommitLoop` and leaves it able to go on: a consumer
with a fatal error is replaced, offsets held by a pending commit of ours are
released, records whose topic is gone fail their owners instead of failing
every commit. Producer failures are producer.py's (REPLACE).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from confluent_kafka import TopicPartition

from oncely.processor.worker import Stuck, Worker

if TYPE_CHECKING:
    from oncely.processor.commit_loop import CommitLoop

log = logging.getLogger("oncely.commit")

# Recovery jobs that fail in a row (offset fetches timing out) before the
# pending offsets are cleared, in case a transaction of ours holds them.
FETCH_FAILURES_BEFORE_REPLACE = 2


def replace_consumer(loop: CommitLoop, why: str) -> None:
    """A consumer with a fatal error (e.g. a static member fenced after its
    session expired in a broker outage) reads nothing more: abort the open
    transaction (our membership is gone), drop the consumer and join the
    group with a new one. The close serves no callback: librdkafka's close
    of a consumer with a fatal error returns that error at once, and the
    destroy after it runs without a consumer close (design.md, Failover)."""
    log.error("replacing the consumer: %s", why)
    if loop.committing is not None:
        loop.end_commit()  # its outcome first: it carries offsets of the old membership
    loop.consumer_restarts += 1
    if loop.metrics is not None:
        loop.metrics.rewound()
    old, txn, assignment = loop.consumer, loop.txn, loop.assignment
    assert assignment is not None and txn is not None and old is not None
    if txn.ready:
        txn.abort(f"consumer failed: {why}")
    closer = Worker("close-consumer", loop.interrupt)
    try:
        closer.call(old.close, loop.bound, "closing the failed consumer")
    except Stuck:
        txn.stats.abandoned += 1
    except Exception as e:
        log.warning("closing the failed consumer: %s", e)
    closer.close()
    consumer = loop.clients.consumer()
    loop.new_transaction()  # the partitions go with the old membership
    assignment.reset(consumer)
    loop.subscribe(consumer)


def unblock_offsets(loop: CommitLoop) -> None:
    """Offset fetches keep timing out. Under read_committed they wait while
    an offset commit of a transaction is pending, and after a broker restart
    one of ours can be left pending for good: a TxnOffsetCommit that
    librdkafka retried after its transaction was aborted. An aborted
    transaction holding the group's offsets completes it (the marker is per
    producer id); the partitions rewind."""
    if loop.committing is not None:
        loop.end_commit()
    assignment, txn, consumer = loop.assignment, loop.txn, loop.consumer
    assert assignment is not None and txn is not None and consumer is not None
    assignment.failures = 0
    tps = [TopicPartition(t, p) for t, p in assignment.owned()]
    worker = Worker("offsets", loop.interrupt)
    try:
        seen = worker.call(lambda: loop.clients.fetch_committed(tps, stable=False), loop.bound, "offset fetch")
    except Exception as e:
        log.warning("cannot read the group's offsets either: %s", e)
        return
    finally:
        worker.close()
    # Aborted, so the values do not matter; they only name the group.
    offsets = [TopicPartition(tp.topic, tp.partition, max(tp.offset, 0)) for tp in seen]
    loop.settle(txn.clear_pending_offsets(offsets, consumer.consumer_group_metadata()))


def poison_missing_topics(loop: CommitLoop, undelivered: list[tuple[bytes, str]]) -> None:
    """Records that never left because their topic is gone (a sink deleted
    after start): librdkafka retries them until the commit times out, every
    time. Their owners fail instead."""
    topics = {t for _, t in undelivered if t not in loop.app.internal_topics}
    if not topics:
        return
    worker = Worker("metadata", loop.interrupt)
    try:
        existing = worker.call(lambda: loop.clients.admin().list_topics(timeout=loop.cfg.txn_call_timeout).topics,
                               loop.bound, "list_topics")
    except Exception as e:  # the broker may be the problem: decide nothing
        log.warning("cannot check the topics of undelivered records: %s", e)
        return
    finally:
        worker.close()
    for owner, topic in undelivered:
        if topic in topics and topic not in existing:
            loop.poisoned.setdefault(owner, f"a record for {topic} cannot be produced: the topic does not exist "
                                            "(deleted after the processor started?)")
