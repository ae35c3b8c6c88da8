"""Durable timers: delayed sends and sleeps fire once, never early, across kill -9
and a move of their partitions to another process."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import oncely
from oncely import schemas
from oncely.testing import read_to_end, unique_name
from support import ProcessorProcess, changelog_state, wait_for_app_topics, wait_until


def test_delayed_sends_and_sleeps_fire_once_and_not_early_across_kill9(kafka: str, tmp_path: Path) -> None:
    app = unique_name("timers")
    proc = ProcessorProcess("tests.apps.timers:app", kafka, tmp_path / "state", {"ONCELY_TEST_APP": app},
                            tmp_path / "p.log").start()
    rng = random.Random(6)
    try:
        wait_for_app_topics(kafka, app)
        client = oncely.Client(kafka, app=app)
        jobs = {n: round(rng.uniform(0.5, 10.0), 2) for n in range(1000)}
        for n, delay in jobs.items():
            client.send("sched", f"s{n}", "schedule", {"n": n, "delay": delay})
        naps = {f"z{i}": round(rng.uniform(4.0, 7.0), 2) for i in range(20)}
        for k, seconds in naps.items():
            client.send("napper", k, "nap", seconds)
        client.flush()

        def fired() -> dict:
            return {k: v for (svc, k, n), v in changelog_state(kafka, app).items() if n == "fired"}

        # Kill in the middle: some timers fired (delays 0.5-10 s), the rest
        # are pending, the naps (4-7 s) are asleep.
        wait_until(lambda: len(fired()) > 0, 60, 0.1, "the first timers to fire")
        time.sleep(2.0)
        proc.kill9()
        at_kill = len(fired())
        assert 0 < at_kill < 1000, at_kill
        # The partitions move to another process, with an empty state dir:
        # the pending timers and sleepers come back from the changelog.
        proc = ProcessorProcess("tests.apps.timers:app", kafka, tmp_path / "other", {"ONCELY_TEST_APP": app},
                                tmp_path / "p2.log").start()
        wait_until(lambda: len(fired()) == 1000, 120, 1.0, "every delayed send to fire")
        wait_until(lambda: sum(1 for (s, k, n), v in changelog_state(kafka, app).items() if n == "naps") == 20,
                   60, 1.0, "every nap to end")
        time.sleep(2)  # a second firing would show now
        state = changelog_state(kafka, app)
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    assert "resumed by replay" in proc.log_text(), "no sleeping invocation was in flight at the kill"
    assert "restored " in proc.log_text(), "the other process did not restore from the changelog"
    fired_counts = {k: v for (svc, k, n), v in state.items() if n == "fired"}
    assert fired_counts == {f"t{n}".encode(): 1 for n in jobs}, "a timer fired twice or not at all"
    early = {k: v for (svc, k, n), v in state.items() if n == "early_ms" and v > 0}
    assert early == {}, f"timers fired before their time: {early}"
    for k, seconds in naps.items():
        assert state[("napper", k.encode(), "naps")] == 1
        assert state[("napper", k.encode(), "slept_ms")] >= seconds * 1000
    assert read_to_end(kafka, f"{app}.dlq") == []
    # A timer fires once: exactly one Invoke per delayed send reached the log
    # (the callee's dedup would hide a second one from the state above).
    fires = Counter()
    for r in read_to_end(kafka, f"{app}.log"):
        kind, body = schemas.decode("log_record", r.value)["body"]
        if kind == "oncely.Invoke" and body["service"] == "target":
            fires[body["invocation_id"]] += 1
    assert len(fires) == 1000 and set(fires.values()) == {1}, "a delayed send was produced twice"
