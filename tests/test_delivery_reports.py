"""Delivery reports are served by the loop while it is busy, not by the
commit's flush on the worker (processor/reports.py), on a real broker:

- the producer alone: a commit started right after 3,000 records were
  produced waits for them to be delivered and for their reports to be
  served by the thread that polls (the loop's part), and commits: every
  report was served on that thread but the last few (fewer than
  `reports.FEW`, which its flush sends without waiting out linger.ms);
- nobody polls (no loop, or one that naps or waits for this very commit):
  the job does not wait, and commit_transaction serves the reports itself;
- a transaction of a few records (1,000 records/s) does not wait at all;
- a processor working through a backlog of subscribed records: its loop
  serves most reports (commit_transaction serves them only while it naps).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import orjson
from confluent_kafka import Producer

import oncely
from oncely.processor import reports
from oncely.processor.producer import TxnProducer
from oncely.processor.txn_state import Committing, Outcome
from oncely.testing import create_topic, read_to_end, unique_name
from support import InProcessProcessor, wait_until

RECORDS = 3000
BACKLOG = 20_000


def _commit_records(kafka: str, prefix: str, poll: bool) -> tuple[TxnProducer, list[int]]:
    """Produce RECORDS and commit them at once, with this thread polling
    meanwhile (the loop's part: a pass, then poll) or just waiting; the
    producer and the threads that served each record's report."""
    name = unique_name(prefix)
    create_topic(kafka, f"{name}.out", 4)
    txn = TxnProducer({"bootstrap.servers": kafka, "transactional.id": name, "enable.idempotence": True,
                       "transaction.timeout.ms": 30_000, "linger.ms": 5}, 10.0, 5.0, threading.Event())
    txn.start()
    served_on: list[int] = []

    def report(err: object, msg: object) -> None:
        assert err is None, err
        served_on.append(threading.get_ident())

    try:
        for i in range(RECORDS):
            txn.produce(f"{name}.out", b"k%d" % (i % 10), b"%d" % i, on_delivery=report)
        txn.serving = poll  # as the loop says while it is busy
        committing = txn.start_commit([], None)
        assert isinstance(committing, Committing), committing
        while poll and not committing.ready():
            txn.poll()
            time.sleep(0.001)
        result = txn.end_commit(committing)
        assert result.outcome is Outcome.COMMITTED, result
    finally:
        txn.close()
    assert len(served_on) == RECORDS
    # (the coordinator writes the markers after the commit returns: until then the records are not readable)
    wait_until(lambda: len(read_to_end(kafka, f"{name}.out")) == RECORDS, 30, 0.2, "every record, committed once")
    return txn, served_on


def test_the_commit_waits_for_the_loop_to_serve_its_reports(kafka: str, monkeypatch) -> None:
    # A generous stall: this test is about who serves the reports, not about a slow machine.
    monkeypatch.setattr(reports, "STALL", 2.0)
    txn, served_on = _commit_records(kafka, "reports", poll=True)
    me = threading.get_ident()
    by_others = sum(1 for t in served_on if t != me)
    assert by_others < reports.FEW, f"{by_others} of {RECORDS} reports were served off the polling thread (by the commit)"
    assert txn.stats.reports_left < reports.FEW


def test_a_few_records_are_left_to_the_flush_a_backlog_is_waited_for(monkeypatch) -> None:
    """Real librdkafka queues (the broker is unreachable: nothing leaves them):
    with fewer than FEW records the job does not sleep at all (it would wait
    out linger.ms for reports the flush serves at once); with more it waits
    until the count stalls."""
    naps: list[float] = []
    monkeypatch.setattr(reports.time, "sleep", naps.append)  # (counts the naps; the clock moves on by itself)
    monkeypatch.setattr(reports, "STALL", 0.005)
    p = Producer({"bootstrap.servers": "127.0.0.1:9", "message.timeout.ms": 0, "log_level": 0})
    for n in (reports.FEW // 2, reports.FEW * 2):  # (the count has a few other events too)
        while len(p) < n:
            p.produce("t", b"v")
        naps.clear()
        assert reports.wait_for_reports(p, lambda: True) >= n
        assert (len(naps) > 0) == (n >= reports.FEW), f"{n} records: {len(naps)} naps"
    p.purge()
    p.flush(1)


def test_without_a_poller_the_commit_serves_the_reports_itself(kafka: str) -> None:
    txn, served_on = _commit_records(kafka, "reports-alone", poll=False)
    assert threading.get_ident() not in served_on, "nobody polled, yet the caller's thread served reports"
    assert txn.stats.reports_left >= RECORDS  # (the count has a few other events too)


def _enrichment(name: str, kafka: str, state_dir: Path) -> oncely.App:
    """bench_peers' workload: each order adds to its customer's total and is emitted with it."""
    app = oncely.App(name, partitions=4, bootstrap=kafka, state_dir=str(state_dir), commit_interval=0.1)
    app.sink(f"{name}.out")
    customers = app.keyed("customers")

    @customers.handler
    async def enrich(ctx: oncely.Context, order: dict) -> None:
        total = ctx.get("total", 0) + order["amount"]
        ctx.set("total", total)
        ctx.emit(f"{name}.out", {**order, "total": total}, key=ctx.key)

    app.subscribe(f"{name}.src", enrich)
    return app


def test_a_busy_processor_serves_its_reports_on_the_loop(kafka: str, tmp_path: Path, monkeypatch) -> None:
    """A processor working through a backlog of subscribed records (its
    loop busy in Python, as in the peer benchmark) serves its records'
    reports on the loop; its commits serve few (those of the loop's naps).
    (Every commit's job waits for all of them here, not only up to the last
    FEW, so that what the loop serves is all that is counted.)"""
    monkeypatch.setattr(reports, "FEW", 1)
    name = unique_name("reports-busy")
    create_topic(kafka, f"{name}.src", 4)
    create_topic(kafka, f"{name}.out", 4)
    app = _enrichment(name, kafka, tmp_path)
    producer = Producer({"bootstrap.servers": kafka, "linger.ms": 20})
    totals: dict[bytes, int] = {}

    def orders(n: int) -> None:
        for i in range(n):
            key = b"c%d" % (i % 100)
            totals[key] = totals.get(key, 0) + 1
            while True:
                try:
                    producer.produce(f"{name}.src", orjson.dumps({"n": i, "amount": 1}), key)
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.flush(60)

    runner = InProcessProcessor(app).start()  # (it creates the app's topics)
    try:
        orders(100)
        wait_until(lambda: len(read_to_end(kafka, f"{name}.out")) == 100, 60, 0.3, "the first outputs")
    finally:
        runner.stop()
    orders(BACKLOG)
    runner = InProcessProcessor(app).start()
    try:
        wait_until(lambda: len(read_to_end(kafka, f"{name}.out")) >= 100 + BACKLOG, 120, 0.5, "every output")
        left = runner.processor.txn.stats.reports_left
    finally:
        runner.stop()
    last = {r.key: orjson.loads(r.value)["total"] for r in read_to_end(kafka, f"{name}.out")}
    assert last == totals, "each customer's last output carries its exact total"
    assert len(read_to_end(kafka, f"{name}.out")) == 100 + BACKLOG, "every order once"
    # Without the loop's poll the commits serve every record's report (20,000 outputs and more: ~27,800
    # here); with it, those of the passes before the loop's naps between fetches (1-5k here, more on a busy machine).
    assert left * 2 <= BACKLOG, f"the commits served {left} records' reports, not the loop"
