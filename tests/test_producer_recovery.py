"""A producer that must be replaced during a broker outage never holds the
loop (processor/producer_lifecycle.py), on a real broker that is stopped:

- a processor under counter traffic loses its broker for 12 s: its commit
  fails, and the producer aborts (abort_transaction waits up to its
  timeout) or is replaced (the commit's outcome unknown; init_transactions
  is retried until the broker is back). The loop answers within 2 s all
  through (it was held for the abort, or for the rest of the outage,
  before), and every sum and output is exact afterwards;
- the producer alone (no loop to step it): an abort waits for its recovery,
  as before, and the producer goes on.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from oncely.local_kafka import LocalKafka
from oncely.processor.producer import TxnProducer
from oncely.processor.txn_state import Outcome
from oncely.testing import create_topic, read_to_end, unique_name
from support import InProcessProcessor, slowest_answer, wait_for_app_topics, wait_until
from test_txn_opener import _app, _outputs_exact, _Traffic

def outage_run(tmp_path: Path, prefix: str, outage: float, probe: Callable[[Any], int],
               **settings: Any) -> tuple[float, int]:
    """A counter app (test_txn_opener's) under traffic loses its broker for
    `outage` s, with records in flight. Returns the longest its loop took
    to answer meanwhile, and how much `probe(processor)` (read on the loop)
    grew by the time every sum is exact; every output is checked too."""
    broker = LocalKafka(data_dir=tmp_path / "broker")
    bootstrap = broker.start().bootstrap
    name = unique_name(prefix)
    runner = None
    try:
        create_topic(bootstrap, f"{name}.out", 2)
        app = _app(name, bootstrap, tmp_path / "state", **{"commit_interval": 0.05, **settings})
        runner = InProcessProcessor(app).start()
        wait_for_app_topics(bootstrap, name)
        traffic = _Traffic(bootstrap, name)
        traffic.send(400)
        wait_until(traffic.exact, 90, 0.5, "the first sums")
        processor = runner.processor
        before = runner.on_loop(lambda: probe(processor))
        traffic.send(600)  # in flight when the broker goes
        broker.stop()
        slowest = slowest_answer(runner, outage)
        broker.start()
        wait_until(traffic.exact, 180, 0.5, "exact sums after the outage")
        grew = runner.on_loop(lambda: probe(processor), timeout=60.0) - before
        _outputs_exact(bootstrap, name, traffic)
    finally:
        if runner is not None:
            runner.stop()
        broker.stop()
    return slowest, grew


@pytest.mark.slow
def test_the_loop_answers_while_its_producer_recovers_in_an_outage(tmp_path: Path) -> None:
    slowest, recovered = outage_run(tmp_path, "recover", 12.0, lambda p: p.aborts + p.producer_restarts)
    assert slowest < 2.0, f"the loop took {slowest:.1f} s to answer while its producer recovered"
    assert recovered >= 1, "the outage was to make the processor abort or replace its producer"


def test_a_standalone_abort_waits_for_its_recovery(kafka: str) -> None:
    name = unique_name("recover-alone")
    create_topic(kafka, f"{name}.out", 1)
    txn = TxnProducer({"bootstrap.servers": kafka, "transactional.id": name, "enable.idempotence": True,
                       "transaction.timeout.ms": 30_000}, 10.0, 5.0, threading.Event())
    txn.start()
    try:
        txn.produce(f"{name}.out", b"k", b"aborted")
        assert txn.abort("a test") is Outcome.REWIND
        assert txn.ready and not txn.recovering
        txn.produce(f"{name}.out", b"k", b"committed")
        assert txn.commit([], None).outcome is Outcome.COMMITTED
    finally:
        txn.close()
    wait_until(lambda: [r.value for r in read_to_end(kafka, f"{name}.out")] == [b"committed"], 30, 0.2,
               "only the committed record")
