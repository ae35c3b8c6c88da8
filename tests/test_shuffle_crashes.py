"""Calls, gathers and awakeables across kill -9: every result exactly once,
every state exact (tests/apps/shuffle.py)."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

import oncely
from oncely.admin import read_invocations
from oncely.testing import create_topic, read_to_end, unique_name
from support import REPO, ProcessorProcess, changelog_state, wait_for_app_topics, wait_until

SPEC = "tests.apps.shuffle:app"


def _env(app: str, results: str, **extra: str) -> dict[str, str]:
    return {"ONCELY_TEST_APP": app, "ONCELY_TEST_RESULTS": results, **extra}


def _owns_partitions(p: ProcessorProcess) -> bool:
    """The process's current run got log partitions (cooperative rebalances
    only add or take some, so it keeps some once it has been given any)."""
    return "running [('" in p.log_text().split("===== start #")[-1]


def test_scatter_gather_exact_with_two_processes_killed(kafka: str, tmp_path: Path) -> None:
    app, results = unique_name("scatter"), unique_name("scatter-out")
    create_topic(kafka, results, 2)
    env = _env(app, results, ONCELY_SESSION_TIMEOUT_MS="6000")
    procs = [ProcessorProcess(SPEC, kafka, tmp_path / n, env, tmp_path / f"{n}.log").start() for n in "ab"]
    rng = random.Random(11)
    rounds, per_round, fanout = 4, 6, 200
    hubs = rounds * per_round
    try:
        wait_for_app_topics(kafka, app)
        wait_until(lambda: all(_owns_partitions(p) for p in procs), 60, 0.2, "both processes to own partitions")
        client = oncely.Client(kafka, app=app)
        for r in range(rounds):
            for j in range(r * per_round, (r + 1) * per_round):
                client.send("hub", f"h{j}", "scatter", {"amount": j + 1, "fanout": fanout})
            client.flush()
            # Kill either process while this round's gathers are in flight;
            # the survivor takes over, the victim restarts and rejoins.
            time.sleep(rng.uniform(0.2, 0.8))
            victim = rng.choice(procs)
            victim.kill9()
            # Once down well past the session timeout (6 s), so the survivor takes
            # over and runs the partitions (its recovery can take seconds on a busy
            # machine) before the victim rejoins.
            time.sleep(14.0 if r == 1 else rng.uniform(0.2, 1.0))
            victim.start()
            wait_until(lambda: all(_owns_partitions(p) for p in procs), 90, 0.2, "both to own partitions again")

        def gathered() -> int:
            return sum(1 for (s, k, n) in changelog_state(kafka, app) if s == "hub" and n == "gathers")

        wait_until(lambda: gathered() == hubs, 300, 2.0, "every gather to complete")
        time.sleep(2)  # a second completion would show now
        state = changelog_state(kafka, app)
        for p in procs:
            assert p.stop() == 0
    finally:
        for p in procs:
            if p.alive():
                p.kill9()
    logs = "".join(p.log_text() for p in procs)
    assert sum(p.starts for p in procs) == 2 + rounds
    assert "resumed by replay" in logs, "no kill hit a gather in flight"
    assert any(run.count("running [('") >= 2 for p in procs for run in p.log_text().split("===== start #")), \
        "no process took over partitions of the other"
    for j in range(hubs):
        key = f"h{j}".encode()
        assert state[("hub", key, "gathers")] == 1, f"hub h{j} completed more than once"
        assert state[("hub", key, "sum")] == fanout * (j + 1), f"hub h{j} gathered a wrong sum"
    total = sum(j + 1 for j in range(hubs))
    for i in range(fanout):
        key = f"k{i}".encode()
        assert state[("leaf", key, "calls")] == hubs, f"leaf k{i} ran its update {state[('leaf', key, 'calls')]}x"
        assert state[("leaf", key, "total")] == total
    out = Counter(orjson.loads(r.value)["hub"] for r in read_to_end(kafka, results))
    assert out == {f"h{j}": 1 for j in range(hubs)}, "a gather's output is missing or duplicated"
    assert read_to_end(kafka, f"{app}.dlq") == []


def test_chains_across_partitions_with_a_crash_between_each_step(kafka: str, tmp_path: Path) -> None:
    app, results = unique_name("chain"), unique_name("chain-out")
    create_topic(kafka, results, 2)
    crash_dir = tmp_path / "crashes"
    crash_dir.mkdir()
    proc = ProcessorProcess(SPEC, kafka, tmp_path / "state", _env(app, results, ONCELY_TEST_CRASH_DIR=str(crash_dir)),
                            tmp_path / "p.log").start()
    chains = 20
    try:
        wait_for_app_topics(kafka, app)
        client = oncely.Client(kafka, app=app)
        for i in range(chains):
            client.send("a", f"a{i}", "a_start", i + 1)
        client.flush()

        def done() -> bool:
            if not proc.alive():
                proc.start()  # it killed itself at a crash point: restart, as a supervisor would
            return sum(1 for (s, k, n) in changelog_state(kafka, app) if s == "a" and n == "result") == chains

        wait_until(done, 300, 1.0, "every chain to finish")
        time.sleep(2)
        state = changelog_state(kafka, app)
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    assert sorted(p.name for p in crash_dir.iterdir()) == ["a-after-b", "b-after-c", "b-start", "c-start"]
    assert proc.starts == 5, "each crash point killed the process once"
    for i in range(chains):
        x = i + 1
        assert state[("a", f"a{i}".encode(), "result")] == 6 * x + 1
        for svc in "abc":
            assert state[(svc, f"{svc}{i}".encode(), "runs")] == 1, f"{svc}{i} ran its update more than once"
    out = Counter(orjson.loads(r.value)["chain"] for r in read_to_end(kafka, results))
    assert out == {f"a{i}": 1 for i in range(chains)}
    assert read_to_end(kafka, f"{app}.dlq") == []


def _awakeable_cli(kafka: str, *args: str) -> subprocess.CompletedProcess:
    """`oncely awakeable ...` as a user would run it."""
    return subprocess.run([sys.executable, "-m", "oncely.cli", "awakeable", *args, "--bootstrap", kafka], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_awakeables_resolved_while_suspended_and_while_the_process_is_down(kafka: str, tmp_path: Path) -> None:
    app, results = unique_name("awake"), unique_name("awake-out")
    create_topic(kafka, results, 2)
    proc = ProcessorProcess(SPEC, kafka, tmp_path / "state", _env(app, results, ONCELY_SUSPEND_AFTER="1"),
                            tmp_path / "p.log").start()
    n = 30
    try:
        wait_for_app_topics(kafka, app)
        client = oncely.Client(kafka, app=app)
        for i in range(n):
            client.send("waiter", f"w{i}", "wait", None)
        client.flush()

        def ids() -> dict[str, str]:
            return {v["waiter"]: v["awakeable"] for r in read_to_end(kafka, results)
                    if "awakeable" in (v := orjson.loads(r.value))}

        awk = wait_until(lambda: (d := ids()) and len(d) == n and d, 60, 0.5, "every awakeable id")
        wait_until(lambda: Counter(i.phase for i in read_invocations(kafka, app))["SUSPENDED"] == n, 60, 0.5,
                   "every waiter to be suspended")
        resolver = oncely.Client(kafka)
        # While suspended (the processor holds none of them in memory).
        for i in range(10):
            resolver.resolve_awakeable(awk[f"w{i}"], {"i": i})
        done = _awakeable_cli(kafka, "reject", awk["w10"], "declined")
        assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
        wait_until(lambda: sum(1 for (s, k, nm) in changelog_state(kafka, app) if s == "waiter" and nm == "wakes")
                   == 11, 60, 0.5, "the first 11 to wake")
        proc.kill9()
        # While the process is down: the completions wait on the log.
        for i in range(11, n - 1):
            resolver.resolve_awakeable(awk[f"w{i}"], {"i": i}, wait=False)
        resolver.resolve_awakeable(awk["w12"], {"i": "second"}, wait=False)  # loses to the first
        answer: list = []
        waiting = threading.Thread(target=lambda: answer.append(
            resolver.resolve_awakeable(awk[f"w{n - 1}"], {"i": n - 1}, timeout=120)))
        waiting.start()  # answered once the processor is back
        time.sleep(1)
        proc.start()
        waiting.join(150)
        assert answer == [None]
        wait_until(lambda: sum(1 for (s, k, nm) in changelog_state(kafka, app) if s == "waiter" and nm == "wakes")
                   == n, 120, 0.5, "every waiter to wake")
        with pytest.raises(oncely.AwakeableError, match="not in flight"):
            resolver.resolve_awakeable(awk["w0"], {"i": "again"})
        again = _awakeable_cli(kafka, "resolve", awk["w1"], '{"i": "again"}')
        assert again.returncode == 1 and "not in flight" in again.stderr, again.stderr
        time.sleep(1)
        state = changelog_state(kafka, app)
        resolver.close()
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    for i in range(n):
        key = f"w{i}".encode()
        assert state[("waiter", key, "wakes")] == 1
        if i == 10:
            assert state[("waiter", key, "rejected")] == "declined"
        else:
            assert state[("waiter", key, "got")] == {"i": i}
    woken = Counter(v["woken"] for r in read_to_end(kafka, results) if "woken" in (v := orjson.loads(r.value)))
    assert woken == {f"w{i}": 1 for i in range(n)}
    assert read_to_end(kafka, f"{app}.dlq") == []
