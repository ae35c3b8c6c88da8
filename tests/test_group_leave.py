"""A processor stopped at any moment of its group membership exits
promptly, with nothing lost or counted twice.

CI once hung for good inside `consumer.close()`: the close's revoke callback
called `incremental_unassign`, which never returned (librdkafka waited for a
reply from a consumer group it had already terminated), with the GIL held,
so no timeout of ours could fire. A stop now leaves the group first
(processor/rebalance.py). A hang that holds the GIL can only be watched from
outside, so every stop here happens in a process of its own that must end
within a bound.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oncely.testing import unique_name
from support import REPO, CounterTraffic, ProcessorProcess, wait_for_app_topics, wait_until

# A clean stop: finish what runs (grace 5 s), commit, leave the group (at
# most 3 s), close. Well under it on this machine; a hang never ends.
STOP_BOUND = 20.0
ROUNDS = 6
# Stops right after the consumer subscribed: before the fix, one of the first
# few hung (three rounds, the first time it was tried).
SOON_ROUNDS = 25


def test_a_processor_stopped_while_it_joins_its_group_stops(kafka: str, tmp_path: Path) -> None:
    """The stop lands 0-300 ms after the subscription: during the join, the
    assignment, the recovery of the partitions."""
    try:
        run = subprocess.run([sys.executable, str(REPO / "tests" / "apps" / "stop_soon.py"), kafka, str(tmp_path),
                              str(SOON_ROUNDS), "0.3"], cwd=REPO, capture_output=True, text=True,
                             timeout=SOON_ROUNDS * STOP_BOUND / 2)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout
        raise AssertionError(f"a stop hung; rounds done:\n{out}") from None
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("stopped in") == SOON_ROUNDS, run.stdout


def test_processors_stopped_at_any_moment_of_a_rebalance_exit_promptly_and_lose_nothing(
        kafka: str, tmp_path: Path) -> None:
    name = unique_name("leave")
    env = {"ONCELY_TEST_APP": name, "ONCELY_TEST_PARTITIONS": "4"}
    procs = [ProcessorProcess("tests.apps.counter:app", kafka, tmp_path / f"state{i}", env, tmp_path / f"p{i}.log")
             for i in range(2)]
    traffic = CounterTraffic(kafka, name, keys=40)
    rng = random.Random(11)
    took: list[float] = []
    try:
        procs[0].start()
        wait_for_app_topics(kafka, name)
        traffic.send(200)
        for r in range(ROUNDS):
            starting = procs[r % 2]
            if not starting.alive():
                starting.start()
            time.sleep(rng.uniform(0.0, 4.0))
            traffic.send(50)
            victim = starting if rng.random() < 0.5 else procs[(r + 1) % 2]
            if not victim.alive():
                victim = starting
            t0 = time.monotonic()
            code = victim.stop(timeout=STOP_BOUND)
            took.append(time.monotonic() - t0)
            assert code == 0, f"round {r}: the stop exited with {code} (a Kafka client was abandoned); " \
                              f"log: {victim.log}"
        for p in procs:
            if not p.alive():
                p.start()
        traffic.send(100)
        wait_until(traffic.exact, 120, 0.5, "exact sums after the stops")
        print("stops took (s):", [round(t, 1) for t in took])
    finally:
        for p in procs:
            if p.alive():
                p.kill9()


@pytest.mark.parametrize("static", [True, False])
def test_a_static_member_stays_in_its_group_after_a_stop_and_any_other_leaves(
        kafka: str, tmp_path: Path, static: bool) -> None:
    """KIP-345: a static member's stop drops its consumer without a
    LeaveGroup, so its restart takes its partitions back without a
    rebalance; a member without an instance id leaves at once."""
    from confluent_kafka.admin import AdminClient

    import oncely
    from oncely.runtime import ProcessorThread

    name = unique_name("member")
    app = oncely.App(name, partitions=2, bootstrap=kafka, state_dir=str(tmp_path))
    app.config.static_membership = static
    counter = app.keyed("counter")

    @counter.handler
    async def add(ctx: oncely.Context, n: int) -> None:
        ctx.set("n", ctx.get("n", 0) + n)

    proc = ProcessorThread(app).start()
    wait_until(lambda: proc.processor is not None and proc.processor.partitions, 60, 0.2, "the assignment")
    proc.stop()
    admin = AdminClient({"bootstrap.servers": kafka})  # (kept: the request dies with its client)
    group = admin.describe_consumer_groups([name])[name].result(30)
    assert len(group.members) == (1 if static else 0), (static, group.state, group.members)
