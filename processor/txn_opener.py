"""Opening the next transaction at the coordinator before its first record.

Right after a commit returns, the coordinator is still writing that
transaction's markers, and answers CONCURRENT_TRANSACTIONS to whatever the
next transaction sends until they are written (librdkafka has no
transactions v2, KIP-890). Two requests open a transaction there, and
librdkafka retries them differently:

- AddPartitionsToTxn, which the first record produced to a partition sends,
  is retried after a fixed 20 ms (rdkafka_txnmgr.c, not configurable). The
  records produced while a commit was on its way go in right after it, so
  about one commit in four waited those 20 ms (bench/peer_breakdown.py: two
  modes, 11 and 30 ms, in commit_transaction).
- AddOffsetsToTxn is retried after retry.backoff.ms (1 ms here, doubling).

So when records wait for the next transaction, the producer's worker opens
it right after the commit with an offset commit, and the records go in once
that returned: the coordinator has the transaction open then, and their
partitions register at once. The offset is committed to a group of its own,
`<app>.open-txn` (the changelog's partition 0, offset 0), never the app's
group: nobody fetches it, so its pending offset holds up no one (under
read_committed an offset fetch waits while one is pending, KIP-447; one for
the app's group would stall a new owner's start until this transaction
ended). Nothing relies on it but latency: when the broker refuses it (no
ACL for the group, say) opening is turned off for good with one warning.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

log = logging.getLogger("oncely.producer")

# The opening's own timeout: the conflict it waits out clears in a few ms on
# a healthy broker, and the commit job's bound must not be spent on it.
OPEN_TIMEOUT = 1.0
# Failed openings in a row that turn it off (each costs an abort and a rewind).
MAX_FAILURES = 3
# Refusals that will not go away by themselves.
_REFUSED = {KafkaError.GROUP_AUTHORIZATION_FAILED, KafkaError.TOPIC_AUTHORIZATION_FAILED,
            KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError.INVALID_GROUP_ID}


def opener_group(app_name: str) -> str:
    """The group whose offsets open transactions (not the app's group)."""
    return f"{app_name}.open-txn"


class TxnOpener:
    """Opens a begun transaction at the coordinator (`open`, on the
    producer's worker); `prepare` makes the group's metadata once."""

    def __init__(self, consumer_conf: dict[str, Any], group: str, topic: str) -> None:
        self.consumer_conf = consumer_conf
        self.group = group
        self.offsets = [TopicPartition(topic, 0, 0)]
        self.metadata: Any = None  # the group's ConsumerGroupMetadata (generation -1: no member)
        self.off = False
        self.opened = 0
        self.failures = 0  # in a row

    @property
    def ready(self) -> bool:
        return self.metadata is not None and not self.off

    def prepare(self) -> None:
        """The group's metadata, from a consumer that never joins it (it may
        look up the group's coordinator: run it on a worker)."""
        if self.metadata is not None:
            return
        consumer = Consumer({**self.consumer_conf, "group.id": self.group})
        try:
            self.metadata = consumer.consumer_group_metadata()
        finally:
            consumer.close()

    def open(self, producer: Producer) -> None:
        """Open `producer`'s begun transaction at the coordinator."""
        producer.send_offsets_to_transaction(self.offsets, self.metadata, OPEN_TIMEOUT)
        self.opened += 1
        self.failures = 0

    def failed(self, error: BaseException) -> None:
        """Opening failed: a refusal, or MAX_FAILURES in a row, turns it off
        for good."""
        self.failures += 1
        err = error.args[0] if isinstance(error, KafkaException) and error.args else None
        refused = isinstance(err, KafkaError) and err.code() in _REFUSED
        if refused or self.failures >= MAX_FAILURES:
            self.turn_off(err.str() if isinstance(err, KafkaError) else f"{type(error).__name__}: {error}")

    def turn_off(self, why: str) -> None:
        self.off = True
        log.warning("opening transactions early through group %s is off (%s); records made during a commit may "
                    "wait up to 20 ms more", self.group, why)
