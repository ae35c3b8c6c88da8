"""Records librdkafka's local queue has no room for, without stopping the loop.

A produce() that meets a full queue (`queue.buffering.max.messages` or
`.kbytes`: a transaction's outputs outrunning the broker, or a broker that
takes nothing while it is down) raises BufferError. Polling until there is
room would hold the event loop for as long as the broker takes, up to the
delivery timeout. Instead the record joins the open transaction's overflow
(`OpenTxn.overflow`), and so does every record after it, so the transaction
keeps their order. The loop then reads no more records and commits at once:
the commit's job, on the producer's worker thread, produces the overflow
first, waiting for room there (`produce_waiting`, at most `OVERFLOW_WAIT`),
and then commits. Room that does not come in time aborts the transaction
(the partitions rewind and make the records again). The wait is at most
half the transaction timeout (the processor sets it): the coordinator
aborts a transaction that outlives its timeout anyway, and queued records
expire with it, so a transaction that cannot deliver its records within it
can never commit, overflow or not.

The overflow keeps the records' objects, not copies (librdkafka copies at
produce()): every caller hands over values and header lists it made for
the record and does not change afterwards.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from confluent_kafka import KafkaError, KafkaException, Producer

from oncely.processor.record_faults import refused
from oncely.processor.txn_state import OpenTxn

# (topic, value, key, partition, on_delivery, headers, owner): what produce() takes, in order.
Waiting = tuple[str, bytes | None, bytes | None, int, Callable[[Any, Any], None] | None,
                list[tuple[str, bytes]] | None, bytes | None]

# The longest the commit's job waits for room before it gives the transaction up (seconds).
OVERFLOW_WAIT = 30.0
# How long each wait for room lasts while the queue is full (on the worker).
POLL_WAIT = 0.05


def produce_waiting(p: Producer, txn: OpenTxn, limit: float = OVERFLOW_WAIT) -> None:
    """Produce the overflow into librdkafka, in order, waiting for room (on
    the worker: this blocks). Raises an abortable KafkaException when room
    does not come within `limit` seconds or librdkafka refused a record
    (which poisons the transaction, and its owner, as any refusal does)."""
    deadline = time.monotonic() + limit
    for topic, value, key, partition, on_delivery, headers, owner in txn.overflow:
        while True:
            try:
                p.produce(topic, value, key, partition, on_delivery=on_delivery, headers=headers)
                break
            except BufferError:
                if time.monotonic() >= deadline:
                    txn.overflow.clear()
                    raise KafkaException(KafkaError(
                        KafkaError._QUEUE_FULL, f"the producer's queue stayed full for {limit:.0f} s (the broker "
                        "takes the transaction's records slower than they are made, or not at all)",
                        txn_requires_abort=True)) from None
                p.flush(POLL_WAIT)  # (sends at once, linger.ms aside, and serves delivery reports)
            except KafkaException as e:
                refused(txn, e, topic, owner)
                txn.produced -= 1  # (counted when it joined the overflow)
                break
            except Exception as e:  # (a malformed record: on the loop it would have failed its invocation)
                refused(txn, KafkaException(KafkaError(KafkaError._INVALID_ARG, f"{type(e).__name__}: {e}")),
                        topic, None)
                if owner is not None:
                    txn.faults.append((owner, f"a record for {topic} cannot be produced: {type(e).__name__}: {e}"))
                txn.produced -= 1
                break
    txn.overflow.clear()
    err = txn.error
    if err is not None:  # a record refused: nothing of the transaction may commit
        raise KafkaException(KafkaError(err.code(), f"a record was refused: {err.str()}", fatal=err.fatal(),
                                        txn_requires_abort=not err.fatal()))
