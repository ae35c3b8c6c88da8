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

So the loop serves reports on every pass (`TxnProducer.poll`: poll(0),
never blocks), and the commit's job first waits, sleeping on the worker,
until librdkafka's queue is empty (`len(producer)` counts unserved reports
too): delivered and served by the loop. It waits only while the loop is
busy (`TxnProducer.serving`, set by each pass) and while the count keeps
falling. An idle loop naps up to 5 ms and competes for nothing: then, or
when the count stalls for `STALL` (the broker takes nothing, or the loop is
held up), commit_transaction flushes and serves what is left itself, as
before. (Waiting for an idle loop's next pass added 8-10 ms to the median
latency at 1,000 records/s: the nap, and librdkafka's `linger.ms`, which a
flush skips and a wait does not. Serving the reports on the worker with
poll(0) while the loop naps was no faster and added the same linger.)
The wait ends once fewer than `FEW` records are left: librdkafka holds the
last ones of a transaction for `linger.ms` (5 ms) before it sends them,
which a flush skips, and serving a few reports on the worker costs less
than that. At 1,000 records/s a commit holds a dozen: it no longer waits
out the linger at all. Nothing depends on the wait for correctness:
commit_transaction flushes every record either way.
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
# Records left to the commit's own flush (at ~10 µs a report against a busy
# loop, about half of librdkafka's linger.ms).
FEW = 200
# How long the worker sleeps between looks at the count.
_NAP = 0.001


def wait_for_reports(p: Producer, serving: Callable[[], bool], limit: float = MAX_WAIT) -> int:
    """Sleep until `p` has fewer than FEW records left to deliver or
    report, while the loop is `serving` reports and the count falls (at
    most `limit` s); returns the records still counted."""
    left = len(p)
    now = time.monotonic()
    end, moved = now + limit, now
    while left >= FEW and serving() and now < end and now - moved < STALL:
        time.sleep(_NAP)
        n = len(p)
        now = time.monotonic()
        if n < left:
            moved = now
        left = n
    return left
