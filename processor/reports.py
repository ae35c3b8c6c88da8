"""Delivery reports: served by the loop, waited for by the commit.

librdkafka reports every record's delivery, and confluent-kafka takes the
GIL for each report it serves, callback or not (its `dr_msg_cb` frees the
per-record state it keeps). Whoever calls poll(), flush() or
commit_transaction() serves them. Left to the commit's job on the worker
thread, commit_transaction's own flush served a transaction's ~5,700
reports one GIL hand-over at a time against a loop that is busy in Python:
the flush took 65-70 ms instead of ~7 ms, the commit was longer than the
loop's next transaction took to fill, and the loop waited for it
(docs/benchmark-log.md, fourteenth session).

So reports are served by whichever thread has the GIL to spare: the loop on
every pass (`TxnProducer.poll`: poll(0), never blocks), and the commit's
job while the loop naps or waits for this commit (`TxnProducer.serving`
is off then: an idle pass sleeps up to 5 ms and competes for nothing). The
job serves what is there (poll(0) on the worker) and sleeps 1 ms at a
time until librdkafka's queue is empty (`len(producer)` counts unserved
reports too), then commits; waiting for the loop's next pass instead added
5 ms to the median latency at 1,000 records/s, and ending the wait at the
first nap cost a fifth of the throughput under a backlog (the loop naps
between fetches, then competes with the flush). When the count stalls for
`STALL` (the broker takes nothing) commit_transaction flushes and serves
what is left itself, as before. Nothing depends on the wait for
correctness: commit_transaction flushes every record either way.
"""

from __future__ import annotations

import time
from typing import Callable

from confluent_kafka import Producer

# How long the count may stay put before the job stops waiting (a loop pass
# takes a few ms; a loop blocked on this commit never serves another report).
STALL = 0.05
# The longest the job waits for reports at all, however steadily they come.
MAX_WAIT = 1.0
# How long the worker sleeps between looks at the count.
_NAP = 0.001


def wait_for_reports(p: Producer, serving: Callable[[], bool], limit: float = MAX_WAIT) -> int:
    """Sleep until `p` has nothing left to deliver or report (at most
    `limit` s, and while the count falls), serving the reports here while
    the loop is not `serving` them; returns how many records' reports this
    thread served or leaves to commit_transaction."""
    left = len(p)
    here = 0
    now = time.monotonic()
    end, moved = now + limit, now
    while left and now < end and now - moved < STALL:
        if not serving():
            p.poll(0)  # the loop naps: serving them here costs it nothing
            n = len(p)
            here += left - n
            if n < left:
                moved = now
            left = n
            if not left:
                break
        time.sleep(_NAP)
        n = len(p)
        now = time.monotonic()
        if n < left:
            moved = now
        left = n
    return here + left
