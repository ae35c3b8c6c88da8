"""Records that cannot be produced, and the invocations that made them.

Records are attributed to the invocation that made them (`owner`): when a
commit fails because a record can never be produced (too large, topic gone,
not authorised), the owners are reported as poisoned, so the rewind fails
those invocations instead of replaying them forever. Attributing costs a
delivery report per record, so the producer (producer.py) attributes only
for a few transactions after one failed.
"""

from __future__ import annotations

from typing import Any, Callable

from confluent_kafka import KafkaError, KafkaException

from oncely.processor.txn_state import OpenTxn

# Errors that belong to one record (it can never be produced as it is), not
# to the broker or the transaction.
RECORD_FAULTS = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE,
                 KafkaError.INVALID_RECORD, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC,
                 KafkaError._UNKNOWN_PARTITION, KafkaError.TOPIC_AUTHORIZATION_FAILED,
                 KafkaError.POLICY_VIOLATION, KafkaError.TOPIC_EXCEPTION}


def refused(txn: OpenTxn, e: KafkaException, topic: str, owner: bytes | None) -> None:
    """librdkafka refused a record at once (other than for a full queue,
    overflow.py): the transaction is poisoned (its commit aborts), and the
    owner with it when the record itself is at fault."""
    err = e.args[0]
    if txn.error is None:
        txn.error = err
    if owner is not None and err.code() in RECORD_FAULTS:
        txn.faults.append((owner, f"a record for {topic} cannot be produced: {err.str()}"))


def attributed(txn: OpenTxn, owner: bytes, topic: str,
               then: Callable[[Any, Any], None] | None) -> Callable[[Any, Any], None]:
    """A delivery report for `owner`'s record in `txn` that keeps it
    undelivered until acked, and names the owner when the record is at fault."""
    txn.seq += 1
    seq = txn.seq
    txn.unacked[seq] = (owner, topic)

    def delivered(err: Any, msg: Any) -> None:
        if err is None:
            txn.unacked.pop(seq, None)
        elif err.code() in RECORD_FAULTS:
            txn.unacked.pop(seq, None)
            txn.faults.append((owner, f"a record for {msg.topic()} cannot be produced: {err.str()}"))
        # Any other error (purged by an abort, failed with the whole
        # transaction) leaves it undelivered: the caller may look closer.
        if then is not None:
            then(err, msg)

    return delivered
