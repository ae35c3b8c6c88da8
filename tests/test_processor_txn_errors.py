"""Each branch of the transaction error policy, provoked on a real broker:

- fenced: another producer takes the processor's transactional.id;
- abortable: the broker rejects the transaction's changelog records;
- unknown outcome: the broker is frozen (SIGSTOP) during commits, so they
  time out; the producer is replaced, never asked to commit again.

After each, every key's state must still be exact: nothing of an aborted or
fenced transaction may survive, nothing committed may be lost.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

import oncely
from oncely.local_kafka import LocalKafka
from oncely.testing import unique_name
from support import CounterTraffic, InProcessProcessor, changelog_state, wait_until


def _counter_app(name: str, bootstrap: str, state_dir: Path, **config) -> oncely.App:
    app = oncely.App(name, partitions=4, bootstrap=bootstrap, state_dir=str(state_dir))
    for k, v in config.items():
        setattr(app.config, k, v)
    counter = app.keyed("counter")

    @counter.handler
    async def add(ctx: oncely.Context, amount: int) -> int:
        n = ctx.get("n", 0) + amount
        ctx.set("n", n)
        return n

    @counter.handler
    async def nap(ctx: oncely.Context, seconds: float) -> None:
        await ctx.sleep(seconds)
        ctx.set("woke", 1)

    return app


def test_fenced_producer_is_replaced_and_state_stays_exact(kafka: str, tmp_path: Path) -> None:
    name = unique_name("fenced")
    app = _counter_app(name, kafka, tmp_path)
    runner = InProcessProcessor(app).start()
    try:
        stream = CounterTraffic(kafka, name, keys=100, seed=11)
        stream.send(2000)
        # A zombie with the same transactional.id: init_transactions bumps the
        # epoch, so the processor's open transaction is fenced.
        tid = (tmp_path / name / "transactional-id").read_text().strip()
        zombie = Producer({"bootstrap.servers": kafka, "transactional.id": tid})
        zombie.init_transactions(30)
        stream.send(2000)
        wait_until(lambda: runner.processor.producer_restarts >= 1, 60, 0.2, "the processor to replace its producer")
        stream.send(2000)
        wait_until(lambda: stream.exact(), 90, 1.0, "exact sums after fencing")
    finally:
        runner.stop()
    assert runner.processor.producer_restarts >= 1


def test_abortable_error_aborts_rewinds_and_state_stays_exact(kafka: str, tmp_path: Path) -> None:
    name = unique_name("abortable")
    app = _counter_app(name, kafka, tmp_path)
    runner = InProcessProcessor(app).start()
    admin = AdminClient({"bootstrap.servers": kafka})

    def set_max_bytes(value: str | None) -> None:
        op = AlterConfigOpType.SET if value else AlterConfigOpType.DELETE
        entry = ConfigEntry("max.message.bytes", value or "", incremental_operation=op)
        r = ConfigResource(ConfigResource.Type.TOPIC, f"{name}.changelog", incremental_configs=[entry])
        admin.incremental_alter_configs([r])[r].result(30)

    try:
        stream = CounterTraffic(kafka, name, keys=100, seed=11)
        stream.send(1000)
        wait_until(lambda: stream.exact(), 60, 0.5, "the first sums")
        # Changelog batches are now too large for the broker (control records,
        # which carry the transaction markers, still fit): produces fail, which
        # makes the transaction abortable.
        set_max_bytes("200")
        stream.send(1000)
        wait_until(lambda: runner.processor.aborts >= 2, 60, 0.2, "aborted transactions")
        set_max_bytes(None)
        stream.send(1000)
        wait_until(lambda: stream.exact(), 90, 1.0, "exact sums after aborts")
    finally:
        runner.stop()
    assert runner.processor.aborts >= 2
    # An abortable error is aborted, not answered by a new producer. (A
    # commit or an abort that times out afterwards, while librdkafka bumps
    # the epoch, has an unknown outcome and does replace it: the other branch.)
    causes = runner.processor.txn.stats.replaced_for
    assert set(causes) <= {"unknown-outcome", "abort-failed"}, f"an abortable error replaced the producer: {causes}"


def test_a_commit_timed_out_in_a_frozen_broker_replaces_the_producer(tmp_path: Path) -> None:
    # A broker of its own: this test freezes it.
    broker = LocalKafka(data_dir=tmp_path / "broker")
    info = broker.start()
    bootstrap = info.bootstrap
    name = unique_name("retriable")
    app = _counter_app(name, bootstrap, tmp_path / "state", txn_call_timeout=0.5)
    runner = InProcessProcessor(app).start()
    try:
        stream = CounterTraffic(bootstrap, name, keys=100, seed=11)
        stream.send(500)
        wait_until(lambda: stream.exact(), 60, 0.5, "the first sums")
        # Invocations whose timers fire while the broker is frozen: each
        # firing changes state that must be committed, so commits are bound
        # to reach the frozen broker and time out.
        for i in range(10):
            stream.client.send("counter", f"nap{i}", "nap", 1.0 + i * 0.25)
        stream.client.flush()
        wait_until(lambda: runner.on_loop(lambda: sum(inv.waiting for part in runner.processor.partitions.values()
                                                      for inv in part.active)) == 10, 30, 0.01,
                   "ten sleeping invocations")
        os.kill(info.pid, signal.SIGSTOP)
        try:
            time.sleep(4)
        finally:
            os.kill(info.pid, signal.SIGCONT)
        stream.send(500)
        wait_until(lambda: stream.exact(), 90, 1.0, "exact sums after the freeze")
        woke = wait_until(lambda: sum(1 for (_, k, n), v in changelog_state(bootstrap, name).items()
                                      if n == "woke" and v == 1) == 10, 60, 0.5, "every nap to wake")
        assert woke
    finally:
        runner.stop()
        broker.stop()
    # A commit that times out has an unknown outcome (no transactions v2 in
    # librdkafka: a late marker could land in the next transaction), so it
    # is never retried on the same producer: a new one settles it.
    causes = runner.processor.txn.stats.replaced_for
    assert causes["unknown-outcome"] + causes["stuck"] >= 1, "no transaction call timed out: the freeze missed"
    assert set(causes) <= {"unknown-outcome", "stuck"}, f"unexpected replacements: {causes}"
