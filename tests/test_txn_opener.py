"""The next transaction is opened at the coordinator right after a commit
when records wait for it (processor/txn_opener.py), on a real broker:

- it happens under ordinary traffic, through the app's own `.open-txn`
  group and never the app's group, and sums and outputs stay exact;
- when the broker refuses it, the commit before still stands, the records
  that waited are replayed once (the partitions rewind), opening is turned
  off, and sums and outputs are still exact; the producer alone shows the
  commit counted as committed and the waiting record dropped.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

import oncely
from oncely.processor.producer import TxnProducer
from oncely.processor.txn_opener import TxnOpener, opener_group
from oncely.processor.txn_state import Outcome
from oncely.testing import create_topic, read_to_end, unique_name
from support import CounterTraffic, InProcessProcessor, feed, wait_until


def _app(name: str, bootstrap: str, state_dir: Path, **settings: Any) -> oncely.App:
    app = oncely.App(name, partitions=4, bootstrap=bootstrap, state_dir=str(state_dir),
                     **{"commit_interval": 0.02, **settings})
    app.sink(f"{name}.out")
    counter = app.keyed("counter")

    @counter.handler
    async def add(ctx: oncely.Context, amount: int) -> None:
        n = ctx.get("n", 0) + amount
        ctx.set("n", n)
        ctx.emit(f"{name}.out", n, key=ctx.key)  # made while a commit is on its way: waits for the next

    return app


class _Traffic(CounterTraffic):
    """Also keeps each key's amounts in order: its outputs must be their running totals."""

    def __init__(self, bootstrap: str, app: str) -> None:
        super().__init__(bootstrap, app, keys=30, seed=7)
        self.amounts: dict[bytes, list[int]] = {}

    def send(self, n: int) -> None:
        client = self.client
        for _ in range(n):
            key = f"k{self.rng.randrange(self.keys)}"
            amount = self.rng.randint(1, 9)
            client.send("counter", key, "add", amount)
            self.amounts.setdefault(key.encode(), []).append(amount)
            self.sums[key.encode()] = self.sums.get(key.encode(), 0) + amount
        client.flush(60)


def _outputs_exact(kafka: str, name: str, traffic: _Traffic) -> None:
    """Every key's outputs are its running totals, each once, in order."""
    seen: dict[bytes, list[int]] = {}
    for r in read_to_end(kafka, f"{name}.out"):
        seen.setdefault(r.key, []).append(orjson.loads(r.value))
    for key, amounts in traffic.amounts.items():
        totals = list(itertools.accumulate(amounts))
        assert seen.get(key) == totals, f"{key!r}: outputs {seen.get(key)} are not the running totals {totals}"
    assert seen.keys() == traffic.amounts.keys()


def _committed(kafka: str, group: str, topic: str) -> list[TopicPartition]:
    admin = AdminClient({"bootstrap.servers": kafka})
    req = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(4)])
    res = admin.list_consumer_group_offsets([req], request_timeout=30)[group].result(timeout=30)
    return [tp for tp in res.topic_partitions if tp.offset >= 0]


def _run(kafka: str, tmp_path: Path, refuse: bool) -> tuple[oncely.App, _Traffic, dict[str, int]]:
    name = unique_name("opener")
    create_topic(kafka, f"{name}.out", 2)
    app = _app(name, kafka, tmp_path)
    runner = InProcessProcessor(app).start()
    traffic = _Traffic(kafka, name)
    stop = threading.Event()
    seen: dict[str, int] = {}
    try:
        traffic.send(100)
        wait_until(traffic.exact, 60, 0.3, "the first sums")
        txn = runner.processor.txn
        opener = txn.opener
        assert opener is not None and opener.ready
        rewinds = runner.processor.rewinds
        if refuse:  # the broker refuses offsets of a topic it does not have
            runner.on_loop(lambda: setattr(opener, "offsets", [TopicPartition(f"{name}.no-such-topic", 0, 0)]))
        feeder = feed(traffic, stop, pause=0.02)
        wait_until(lambda: opener.off if refuse else opener.opened >= 20, 60, 0.1, "transactions opened early")
        time.sleep(1)
        stop.set()
        feeder.join(30)
        wait_until(traffic.exact, 90, 0.5, "exact sums")
        seen = {"opened": opener.opened, "off": opener.off, "rewinds": runner.processor.rewinds - rewinds,
                "aborts": runner.processor.aborts}
    finally:
        stop.set()
        runner.stop()
    _outputs_exact(kafka, name, traffic)
    return app, traffic, seen


def test_transactions_open_early_through_their_own_group(kafka: str, tmp_path: Path) -> None:
    app, _, seen = _run(kafka, tmp_path, refuse=False)
    assert seen["opened"] >= 20 and not seen["off"]
    assert seen["aborts"] == 0 and seen["rewinds"] == 0, seen
    # The opening offsets go to the opener's group, never the app's.
    assert [(tp.partition, tp.offset) for tp in _committed(kafka, opener_group(app.name), app.changelog_topic)] \
        == [(0, 0)]
    assert _committed(kafka, app.name, app.changelog_topic) == []


def test_a_refused_opening_turns_it_off_and_loses_nothing(kafka: str, tmp_path: Path) -> None:
    _, _, seen = _run(kafka, tmp_path, refuse=True)
    assert seen["off"], "a refusal turns opening off"
    # The refused opening aborted the empty next transaction and its waiting
    # records were replayed once: one rewind, and exact sums and outputs (_run).
    assert seen["rewinds"] == 1 and seen["aborts"] == 1, seen


def test_a_failed_opening_keeps_the_commit_and_drops_what_waited(kafka: str) -> None:
    """The producer alone: the commit before a failed opening is committed
    and counted as such; the record that waited for the next transaction is
    dropped with it (`next_lost`: the processor rewinds and makes it again),
    and the next transaction works."""
    name = unique_name("opener-producer")
    create_topic(kafka, f"{name}.out", 1)
    opener = TxnOpener({"bootstrap.servers": kafka}, opener_group(name), f"{name}.no-such-topic")
    txn = TxnProducer({"bootstrap.servers": kafka, "transactional.id": name, "enable.idempotence": True,
                       "transaction.timeout.ms": 10_000, "retry.backoff.ms": 1}, 10.0, 5.0, threading.Event(),
                      opener)
    txn.start()
    try:
        assert opener.ready
        txn.produce(f"{name}.out", b"k", b"committed")
        committing = txn.start_commit([], None)
        txn.produce(f"{name}.out", b"k", b"waited")  # made while the commit is on its way
        result = txn.end_commit(committing)
        assert result.outcome is Outcome.COMMITTED and result.next_lost, result
        assert (txn.stats.commits, txn.stats.aborts, opener.opened, opener.failures) == (1, 1, 0, 1)
        txn.produce(f"{name}.out", b"k", b"after")
        assert txn.commit([], None).outcome is Outcome.COMMITTED
    finally:
        txn.close()
    assert [r.value for r in read_to_end(kafka, f"{name}.out")] == [b"committed", b"after"]


def test_the_commit_duration_leaves_out_opening_the_next_transaction(kafka: str, tmp_path: Path) -> None:
    """oncely_commit_duration_seconds times a commit. The job that commits
    it goes on to open the next transaction when records wait for it, which
    is not this commit's time: with opening slowed to 0.4 s (on the
    producer's worker, inside the job), the commits that opened one do not
    show it."""
    name = unique_name("opener-metric")
    create_topic(kafka, f"{name}.out", 2)
    app = _app(name, kafka, tmp_path)
    runner = InProcessProcessor(app, metrics="127.0.0.1:0").start()
    traffic = _Traffic(kafka, name)
    stop = threading.Event()
    try:
        traffic.send(50)
        wait_until(traffic.exact, 60, 0.3, "the first sums")
        opener = runner.processor.txn.opener
        assert opener is not None and opener.ready
        opens = opener.open

        def slow_open(producer: object) -> None:
            time.sleep(0.4)
            opens(producer)

        runner.on_loop(lambda: setattr(opener, "open", slow_open))
        before = opener.opened
        feeder = feed(traffic, stop, pause=0.02)
        wait_until(lambda: opener.opened >= before + 5, 60, 0.1, "transactions opened (slowly)")
        stop.set()
        feeder.join(30)
        wait_until(traffic.exact, 90, 0.5, "exact sums")
        opened = opener.opened - before
        hist = runner.on_loop(lambda: runner.processor.metrics.commit_seconds)
        over = dict(hist.cumulative())
        slow = over["+Inf"] - over["0.25"]  # commits that took more than 0.25 s
    finally:
        stop.set()
        runner.stop()
    assert slow < opened, f"{slow} commits over 0.25 s, {opened} of them opened the next transaction in 0.4 s"
