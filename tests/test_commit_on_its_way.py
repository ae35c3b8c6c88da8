"""The loop goes on while a commit is on its way (commit_loop.py).

A commit's broker round trips run on the producer's worker thread; the
loop keeps reading and running handlers meanwhile, their records held until
the next transaction begins and their state in a second overlay. One commit
is made slow here (its job waits before it commits, as a slow broker
would), on a real broker:

- while it is on its way, handlers keep running and their sums end exact;
- when that slow commit then fails (an abortable error, so the producer
  really aborts it), what ran meanwhile (state, and the outputs held for
  the next transaction) is dropped with it, the partitions rewind, and the
  sums and outputs are still exact: nothing counted twice, nothing lost.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import orjson
from confluent_kafka import KafkaError, KafkaException

import oncely
from oncely.testing import create_topic, read_to_end, unique_name
from support import CounterTraffic, InProcessProcessor, feed, wait_until

SLOW = 2.0


def _app(name: str, kafka: str, state_dir: Path, runs: list[float]) -> oncely.App:
    app = oncely.App(name, partitions=4, bootstrap=kafka, state_dir=str(state_dir))
    app.sink(f"{name}.out")
    counter = app.keyed("counter")

    @counter.handler
    async def add(ctx: oncely.Context, amount: int) -> None:
        runs.append(time.monotonic())
        n = ctx.get("n", 0) + amount
        ctx.set("n", n)
        ctx.emit(f"{name}.out", n, key=ctx.key)  # a record made while a commit is on its way waits for the next

    return app


def _emitted_exactly_once(kafka: str, name: str, sums: dict[bytes, int]) -> None:
    """Each key's outputs are its running totals, each once, in order."""
    seen: dict[bytes, list[int]] = {}
    for r in read_to_end(kafka, f"{name}.out"):
        seen.setdefault(r.key, []).append(orjson.loads(r.value))
    for key, totals in seen.items():
        assert totals == sorted(set(totals)), f"{key!r}: an output twice or out of order: {totals}"
    assert {k: v[-1] for k, v in seen.items()} == sums, "the last output of a key is not its sum"


class _SlowWorker:
    """Stands in front of the producer's worker for one commit: its job
    waits `SLOW` seconds first, then commits (or fails as a broker error would)."""

    def __init__(self, real: Any, fail: bool, window: list[float]) -> None:
        self.real, self.fail, self.window = real, fail, window

    def start(self, fn: Callable[[], Any], bound: float) -> Any:
        def slow() -> Any:
            self.window.append(time.monotonic())
            time.sleep(SLOW)
            self.window.append(time.monotonic())
            if self.fail:
                raise KafkaException(KafkaError(KafkaError._STATE, "injected: the commit failed",
                                                txn_requires_abort=True))
            return fn()

        return self.real.start(slow, bound)


def _slow_down_one_commit(runner: InProcessProcessor, fail: bool) -> list[float]:
    """The next commit the loop starts is slow; returns its [start, end] once it ran."""
    window: list[float] = []

    def install() -> None:
        txn = runner.processor.txn
        real_start = txn.start_commit

        def start_commit(offsets: Any, group_metadata: Any) -> Any:
            txn.start_commit = real_start  # only this one
            worker = txn._worker
            txn._worker = _SlowWorker(worker, fail, window)
            try:
                return real_start(offsets, group_metadata)
            finally:
                txn._worker = worker

        txn.start_commit = start_commit

    runner.on_loop(install)
    return window


def _run_with_one_slow_commit(kafka: str, tmp_path: Path, fail: bool) -> tuple[list[float], list[float], Any]:
    name = unique_name("on-its-way")
    create_topic(kafka, f"{name}.out", 2)
    runs: list[float] = []
    runner = InProcessProcessor(_app(name, kafka, tmp_path, runs)).start()
    traffic = CounterTraffic(kafka, name, keys=30, seed=3)
    stop = threading.Event()
    try:
        traffic.send(200)
        wait_until(traffic.exact, 60, 0.3, "the first sums")
        feeder = feed(traffic, stop)
        window = _slow_down_one_commit(runner, fail)
        wait_until(lambda: len(window) == 2, 30, 0.05, "the slow commit")
        time.sleep(1)
        stop.set()
        feeder.join(30)
        wait_until(traffic.exact, 90, 0.5, "exact sums")
        aborts = runner.processor.aborts
    finally:
        stop.set()
        runner.stop()
    _emitted_exactly_once(kafka, name, traffic.sums)
    return runs, window, aborts


def test_handlers_run_while_a_slow_commit_is_on_its_way(kafka: str, tmp_path: Path) -> None:
    runs, (began, ended), aborts = _run_with_one_slow_commit(kafka, tmp_path, fail=False)
    during = [t for t in runs if began + 0.2 < t < ended]
    # Traffic arrives at about 400 records/s: a loop blocked by the commit runs none.
    assert len(during) >= 100, f"only {len(during)} handler runs during a {SLOW} s commit: the loop waited for it"
    assert aborts == 0


def test_what_ran_during_a_commit_that_fails_is_dropped_with_it(kafka: str, tmp_path: Path) -> None:
    runs, (began, ended), aborts = _run_with_one_slow_commit(kafka, tmp_path, fail=True)
    assert aborts >= 1, "the injected failure must abort the transaction"
    assert len([t for t in runs if began + 0.2 < t < ended]) >= 100, "handlers must have run during the commit"
    # exact sums (checked in the run) mean: the failed transaction's records
    # and everything made while it was on its way were replayed exactly once.


def test_records_held_during_a_commit_go_into_the_next_one_in_order(kafka: str) -> None:
    """Records produced while a commit is on its way wait in the producer,
    then go into the next transaction in the order they were made
    (TxnProducer._replay): plain ones straight to librdkafka, one with
    headers, a delivery report or an owner to attribute to through
    `produce`; each exactly once."""
    from oncely.processor.producer import TxnProducer
    from oncely.processor.txn_state import Committing, Outcome

    out = f"{unique_name('held')}.out"
    create_topic(kafka, out, 1)
    txn = TxnProducer({"bootstrap.servers": kafka, "transactional.id": out, "enable.idempotence": True,
                       "transaction.timeout.ms": 30_000}, 10.0, 5.0, threading.Event())
    txn.start()
    reported: list[bytes] = []
    try:
        txn.produce(out, b"k", b"first")
        committing = txn.start_commit([], None)
        assert isinstance(committing, Committing), committing
        txn.careful = 2  # (attributing owners' records: one transaction of it is left at the replay)
        for i in range(40):
            v = b"%d" % i
            if i % 10 == 3:
                txn.produce(out, b"k", v, [("h", b"x")])
            elif i % 10 == 5:
                txn.produce(out, b"k", v, owner=b"inv-%d" % i)
            elif i % 10 == 7:
                txn.produce(out, b"k", v, on_delivery=lambda err, msg: reported.append(msg.value()))
            else:
                txn.produce(out, b"k", v, partition=0)
        assert txn.end_commit(committing).outcome is Outcome.COMMITTED
        assert txn.commit([], None).outcome is Outcome.COMMITTED
    finally:
        txn.close()
    records = wait_until(lambda: (lambda rs: rs if len(rs) >= 41 else None)(read_to_end(kafka, out)), 30, 0.2,
                         "every record committed")
    assert [r.value for r in records] == [b"first"] + [b"%d" % i for i in range(40)], "each once, in order"
    assert [r.value for r in records if r.headers] == [b"3", b"13", b"23", b"33"]
    assert sorted(reported) == [b"17", b"27", b"37", b"7"]
