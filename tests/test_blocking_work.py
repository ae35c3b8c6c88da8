"""Long work never stops the other partitions.

- A synchronous ctx.run step runs in a worker thread: a 15 s step (longer
  than transaction.timeout.ms) completes once while other keys commit. On
  the loop it stopped every commit, the broker aborted the transaction and
  the step ran again, forever.
- A partition restoring a long changelog is recovered off the loop: the
  process's other partitions keep committing meanwhile.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from confluent_kafka import Producer

import oncely
from oncely.sdk.protocol import encode_value
from oncely.processor import keys
from oncely.testing import unique_name
from support import CounterTraffic, InProcessProcessor, changelog_state, feed, wait_until


def _app(kafka: str, state_dir: Path, name: str, **config: object) -> tuple[oncely.App, list[float]]:
    app = oncely.App(name, partitions=4, bootstrap=kafka, state_dir=str(state_dir))
    for k, v in config.items():
        setattr(app.config, k, v)
    counter = app.keyed("counter")
    steps: list[float] = []

    def blocking_step(seconds: float) -> float:
        steps.append(time.monotonic())
        time.sleep(seconds)  # a worker thread, not the event loop
        return seconds

    @counter.handler
    async def add(ctx: oncely.Context, amount: int) -> None:
        ctx.set("n", ctx.get("n", 0) + amount)

    @counter.handler
    async def slow(ctx: oncely.Context, seconds: float) -> None:
        ctx.set("slept", await ctx.run("block", blocking_step, seconds))

    return app, steps


def test_a_long_sync_step_runs_once_while_other_keys_commit(kafka: str, tmp_path: Path) -> None:
    name = unique_name("blocking")
    app, steps = _app(kafka, tmp_path, name)
    runner = InProcessProcessor(app).start()
    commits: list[float] = []
    try:
        runner.processor.on_commit = lambda: commits.append(time.monotonic())
        sums = CounterTraffic(kafka, name, keys=40, seed=9)
        sums.send(100)
        wait_until(sums.exact, 60, 0.3, "the first sums")
        sums.client.send("counter", "sleeper", "slow", 15.0)
        sums.client.flush()
        wait_until(lambda: steps, 30, 0.1, "the step to start")
        started = steps[0]
        while time.monotonic() < started + 14:
            sums.send(20)
            time.sleep(0.5)
        wait_until(lambda: changelog_state(kafka, name).get(("counter", b"sleeper", "slept")) == 15.0, 60, 0.5,
                   "the step's result")
        wait_until(sums.exact, 60, 0.5, "exact sums for the other keys")
    finally:
        runner.stop()
    assert len(steps) == 1, f"the 15 s step ran {len(steps)} times"
    during = [t for t in commits if started + 1 < t < started + 14]
    assert len(during) >= 10, f"only {len(during)} commits during the 15 s step: the loop was blocked"


def test_other_partitions_commit_while_one_restores_a_long_changelog(kafka: str, tmp_path: Path) -> None:
    name = unique_name("restoring")
    # Without static membership a stopped process hands its partitions over
    # at once (it leaves the group), which is what this test needs.
    b_app, _ = _app(kafka, tmp_path / "b", name, static_membership=False)
    b = InProcessProcessor(b_app).start()
    a: InProcessProcessor | None = None
    sums = CounterTraffic(kafka, name, keys=40, seed=9)
    stop_traffic = threading.Event()
    b_stopped = False
    try:
        wait_until(lambda: b.on_loop(lambda: len(b.processor.partitions)) == 4, 60, 0.1, "b running every partition")
        a_app, _ = _app(kafka, tmp_path / "a", name, static_membership=False)
        a = InProcessProcessor(a_app).start()
        wait_until(lambda: a.on_loop(lambda: len(a.processor.partitions)) >= 1
                   and b.on_loop(lambda: len(b.processor.partitions)) < 4, 60, 0.1,
                   "a rebalance that gives a some partitions")
        mine = a.on_loop(lambda: sorted(a.processor.partitions))
        theirs = b.on_loop(lambda: sorted(b.processor.partitions))
        # 200,000 changelog records on one of b's partitions: a must restore
        # them when it takes that partition over.
        big = theirs[0]
        producer = Producer({"bootstrap.servers": kafka, "linger.ms": 20})
        value = encode_value(1)
        for i in range(200_000):
            sk = keys.service_key("filler", f"f{i}".encode())
            while True:
                try:
                    producer.produce(f"{name}.changelog", key=keys.state(sk, "v"), value=value, partition=big)
                    break
                except BufferError:
                    producer.poll(0.05)
        assert producer.flush(60) == 0

        samples: list[tuple[float, bool, dict]] = []  # taken on a's loop, at each commit

        def on_commit() -> None:
            asg = a.processor.assignment
            samples.append((time.monotonic(), bool(asg.recovering),
                            {p: asg.committed.get((f"{name}.log", p)) for p in mine}))

        a.processor.on_commit = on_commit

        feeder = feed(sums, stop_traffic)
        time.sleep(1)
        b.stop()
        b_stopped = True
        wait_until(lambda: a.on_loop(lambda: len(a.processor.partitions)) == 4, 120, 0.1,
                   "a to run every partition")
        stop_traffic.set()
        feeder.join(30)
        wait_until(sums.exact, 90, 0.5, "exact sums")
    finally:
        stop_traffic.set()
        if a is not None:
            a.stop()
        if not b_stopped:
            b.stop()
    restoring = [s for s in samples if s[1]]
    advanced = sum(1 for prev, cur in zip(restoring, restoring[1:]) if cur[2] != prev[2])
    assert advanced >= 3, (f"a's own partitions {mine} advanced in {advanced} commits while it restored "
                           f"partition {big} ({len(restoring)} commits during the restore)")
