"""Delivery reports are served by the loop, not by the commit's flush on the
worker (processor/reports.py), on a real broker:

- the producer alone: a commit started right after 3,000 records were
  produced waits for them to be delivered and for their reports to be
  served by the thread that polls (the loop's part), and commits: every
  report was served on that thread, none by commit_transaction on the worker;
- nobody polls (no loop, or one that naps or waits for this very commit):
  the job does not wait, and commit_transaction serves the reports itself;
- a processor working through a backlog: its commits find their reports
  served (an idle loop leaves them to the commit: it competes for nothing).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from oncely.processor import reports
from oncely.processor.producer import TxnProducer
from oncely.processor.txn_state import Committing, Outcome
from oncely.testing import create_topic, read_to_end, unique_name
from support import InProcessProcessor, wait_until
from test_txn_opener import _app, _outputs_exact, _Traffic

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
    assert by_others == 0, f"{by_others} of {RECORDS} reports were served off the polling thread (by the commit)"
    assert txn.stats.reports_left == 0


def test_without_a_poller_the_commit_serves_the_reports_itself(kafka: str) -> None:
    txn, served_on = _commit_records(kafka, "reports-alone", poll=False)
    assert threading.get_ident() not in served_on, "nobody polled, yet the caller's thread served reports"
    assert txn.stats.reports_left == RECORDS


def test_a_processor_serves_its_reports_on_the_loop(kafka: str, tmp_path: Path) -> None:
    """A processor working through a backlog serves most of its records'
    reports on the loop (an idle loop's naps between fetches leave the
    reports of the records made just before to the commit)."""
    name = unique_name("reports-loop")
    create_topic(kafka, f"{name}.out", 2)
    app = _app(name, kafka, tmp_path)
    runner = InProcessProcessor(app).start()  # (it creates the app's topics)
    traffic = _Traffic(kafka, name)
    try:
        traffic.send(50)
        wait_until(traffic.exact, 60, 0.3, "the first sums")
    finally:
        runner.stop()
    traffic.send(BACKLOG)
    runner = InProcessProcessor(app).start()
    try:
        wait_until(traffic.exact, 120, 0.5, "exact sums after the backlog")
        left = runner.processor.txn.stats.reports_left
    finally:
        runner.stop()
    _outputs_exact(kafka, name, traffic)
    # Without the loop's poll the commits serve every record's report themselves (20,000 outputs and more).
    assert left * 4 <= BACKLOG, f"the commits served {left} records' reports themselves"
