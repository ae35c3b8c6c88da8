"""Local starts (processor/local_start.py): a subscribed record whose log
partition runs in this process starts without crossing Kafka twice, and
per-key order holds as if it had gone through the log.

- Waiting and in transit: a record of a busy key waits here for it; what
  still waits at a commit goes to the log, and the key's later records
  follow it there until it is read back.
- Caught up: Invokes already on the log when a partition starts (left there
  by another process) run before a new record of their key starts locally.
- Two processes, one started mid-stream, one killed -9 and restarted: every
  key's state lists its records in source order, every output once.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

import oncely
from oncely.testing import create_topic, read_to_end, unique_name
from oncely.topics import ensure_topics
from support import InProcessProcessor, ProcessorProcess, changelog_state, wait_for_app_topics, wait_until
from apps.local_order import build

SPEC = "tests.apps.local_order:app"


def _produce_at_once(kafka: str, topic: str, records: list[tuple[str, dict]]) -> None:
    """In one transaction: a read_committed reader sees all of them at once (a backlog)."""
    p = Producer({"bootstrap.servers": kafka, "transactional.id": unique_name("txp"), "linger.ms": 20})
    p.init_transactions(30)
    p.begin_transaction()
    for key, value in records:
        while True:
            try:
                p.produce(topic, orjson.dumps(value), key.encode())
                break
            except BufferError:
                p.poll(0.05)
    p.commit_transaction(60)


def _lists(kafka: str, app: str) -> dict[str, list[int]]:
    return {k.decode(): v for (svc, k, name), v in changelog_state(kafka, app).items() if name == "seen"}


def _wait_lists(kafka: str, app: str, want: dict[str, list[int]], timeout: float) -> dict[str, list[int]]:
    """Until every key's list is `want`'s; on timeout, fails naming the first key that differs."""
    deadline = time.monotonic() + timeout
    while True:
        got = _lists(kafka, app)
        if got == want:
            return got
        if time.monotonic() > deadline:
            bad = next(k for k in sorted(set(want) | set(got)) if got.get(k) != want.get(k))
            g, w = got.get(bad) or [], want.get(bad) or []
            i = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            raise AssertionError(f"key {bad}: {len(g)} entries, {len(w)} wanted; from index {i}: {g[i:i + 8]} "
                                 f"where {w[i:i + 8]} was wanted")
        time.sleep(0.5)


def _stats(runner: InProcessProcessor) -> dict[str, int]:
    return runner.on_loop(lambda: dict(runner.app.subscriptions[0].stats))


@pytest.mark.parametrize("suspend_after", [30.0, 0.05], ids=["held", "suspended"])
def test_a_key_with_records_in_transit_waits_for_them(kafka: str, tmp_path: Path, suspend_after: float) -> None:
    """Under a backlog, records of a busy key wait here for it; now and then
    a record sleeps (durably) so its key is still held at a commit, and the
    records waiting behind it go to the log in that commit (or at once, when
    the sleeper is suspended): the key's later records follow them through
    the log until they are read back, and every key's list keeps its order."""
    name, source, results = unique_name("transit"), unique_name("transit-src"), unique_name("transit-out")
    create_topic(kafka, source, 1)
    create_topic(kafka, results, 1)
    app = build(name, source, results, partitions=1, bootstrap=kafka, state_dir=str(tmp_path),
                commit_interval=0.2, suspend_after=suspend_after)
    keys = [f"k{i}" for i in range(8)]
    runner = InProcessProcessor(app).start()
    try:
        _produce_at_once(kafka, source, [(k, {"k": k, "n": 0}) for k in keys])
        wait_until(lambda: len(_lists(kafka, name)) == len(keys), 60, 0.3, "the first records")
        local = runner.processor.assignment.local  # type: ignore[union-attr]
        assert runner.on_loop(lambda: local.caught_up(0)), "not caught up after reading its records back"
        before = _stats(runner)
        n = 1000  # more than the read-ahead bound: the source pauses and resumes
        _produce_at_once(kafka, source, [(k, {"k": k, "n": i, **({"busy": 0.3} if i % 100 == 50 else {})})
                                         for i in range(1, n + 1) for k in keys])
        wait_until(lambda: _stats(runner)["read"] == len(keys) * (n + 1), 60, 0.3, "every record read")
        _wait_lists(kafka, name, {k: list(range(n + 1)) for k in keys}, 60)
        stats = _stats(runner)
        flushed = runner.on_loop(lambda: local.flushed)
    finally:
        runner.stop()
    taken, sent = stats["local"] - before["local"], stats["invoked"] - stats["local"] - (
        before["invoked"] - before["local"])
    print(f"taken here {taken}, of which flushed to the log {flushed}; sent to the log {sent}")
    # Records waited here, and the sleepers' followers went through the log.
    assert taken > 0 and flushed > 0, (taken, flushed, sent)
    out = Counter((v["k"], v["n"]) for r in read_to_end(kafka, results) if (v := orjson.loads(r.value)))
    assert out == {(k, i): 1 for k in keys for i in range(n + 1)}
    assert read_to_end(kafka, f"{name}.dlq") == []


# Held: the sleepers stay in memory. Suspended: they leave memory while
# records of their key wait here and more arrive.
@pytest.mark.parametrize("busy,suspend_after", [(0.01, 30.0), (0.1, 0.02)], ids=["held", "suspended"])
def test_records_arriving_while_their_key_is_in_transit_follow_it(kafka: str, tmp_path: Path, busy: float,
                                                                  suspend_after: float) -> None:
    """Records arrive one by one; every fifth of key `a` sleeps briefly, so
    at a commit records of `a` often wait behind it and go to the log, and
    the sleeper ends before they are read back: a record of `a` read then
    must wait for them (they are in transit), not start on the free key; and
    one read while others of its key wait here waits behind them, also when
    the key's holder was suspended meanwhile."""
    name, source, results = unique_name("trickle"), unique_name("trickle-src"), unique_name("trickle-out")
    create_topic(kafka, source, 1)
    create_topic(kafka, results, 1)
    app = build(name, source, results, partitions=1, bootstrap=kafka, state_dir=str(tmp_path), commit_interval=0.05,
                suspend_after=suspend_after)
    runner = InProcessProcessor(app).start()
    n = 1500
    try:
        p = Producer({"bootstrap.servers": kafka, "linger.ms": 0})
        for i in range(n):
            p.produce(source, orjson.dumps({"k": "a", "n": i, **({"busy": busy} if i % 5 == 0 else {})}), b"a")
            p.produce(source, orjson.dumps({"k": "b", "n": i}), b"b")
            p.poll(0)
            time.sleep(0.002)
        p.flush(30)
        _wait_lists(kafka, name, {"a": list(range(n)), "b": list(range(n))}, 90)
        stats = _stats(runner)
        flushed = runner.on_loop(lambda: runner.processor.assignment.local.flushed)  # type: ignore[union-attr]
    finally:
        runner.stop()
    sent = stats["invoked"] - stats["local"]
    print(f"taken here {stats['local']}, of which flushed to the log {flushed}; sent to the log {sent}")
    assert flushed > 0 and sent > 0, (flushed, sent)


def test_invokes_left_on_the_log_run_before_new_records_of_their_key(kafka: str, tmp_path: Path) -> None:
    name, source, results = unique_name("caught"), unique_name("caught-src"), unique_name("caught-out")
    create_topic(kafka, source, 1)
    create_topic(kafka, results, 1)
    app = build(name, source, results, partitions=1, bootstrap=kafka, state_dir=str(tmp_path),
                max_inflight_per_partition=10_000)
    ensure_topics(AdminClient({"bootstrap.servers": kafka}), app)
    # What a process that died left on the log: first many Invokes of other
    # keys (reading them takes several batches), then those of `keys`.
    client = oncely.Client(kafka, app=name)
    fill, keys, old, new = [f"f{i}" for i in range(100)], ["a", "b", "c", "d"], 50, 50
    for i in range(30):
        for f in fill:
            client.send("seq", f, "add", {"k": f, "n": i})
    for i in range(old):
        for k in keys:
            client.send("seq", k, "add", {"k": k, "n": i})
    client.flush()
    client.close()
    _produce_at_once(kafka, source, [(k, {"k": k, "n": i}) for i in range(old, old + new) for k in keys])
    runner = InProcessProcessor(app).start()
    try:
        want = {**{f: list(range(30)) for f in fill}, **{k: list(range(old + new)) for k in keys}}
        _wait_lists(kafka, name, want, 90)
        stats = _stats(runner)
        local = runner.processor.assignment.local  # type: ignore[union-attr]
        marks = local.marks
    finally:
        runner.stop()
    assert stats["invoked"] == len(keys) * new and marks >= 1
    assert read_to_end(kafka, f"{name}.dlq") == [], "a marker was dead-lettered"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, int] | None:
    """oncely_subscription_records by outcome from a process's /metrics (None: not up)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    return {m.group(1): int(float(m.group(2))) for m in re.finditer(
        r'^oncely_subscription_records_total\{[^}]*outcome="(\w+)"[^}]*\} (\S+)', text, re.M)}


def _run_log(proc: ProcessorProcess) -> str:
    return proc.log_text().split("===== start #")[-1]


def _owned(proc: ProcessorProcess, topic: str) -> set[int]:
    """The partitions of `topic` the process's current run owns, from its log lines."""
    owned: set[int] = set()
    for line in _run_log(proc).splitlines():
        found = {int(p) for p in re.findall(rf"\('{re.escape(topic)}', (\d+)\)", line)}
        if "running [" in line:
            owned |= found
        elif "revoking [" in line or "assignment lost" in line:
            owned -= found
    return owned


def test_key_order_and_exactly_once_across_rebalances_and_a_kill(kafka: str, tmp_path: Path) -> None:
    name, source, results = unique_name("localord"), unique_name("localord-src"), unique_name("localord-out")
    create_topic(kafka, source, 4)
    create_topic(kafka, results, 2)
    ports = {n: _free_port() for n in "ab"}
    procs = {n: ProcessorProcess(SPEC, kafka, tmp_path / n, {
        "ONCELY_TEST_APP": name, "ONCELY_TEST_SOURCE": source, "ONCELY_TEST_RESULTS": results,
        "ONCELY_TEST_PARTITIONS": "4", "ONCELY_SESSION_TIMEOUT_MS": "6000",
        "ONCELY_METRICS": f"127.0.0.1:{ports[n]}"}, tmp_path / f"{n}.log") for n in "ab"}
    keys = [f"k{i}" for i in range(40)]
    busy = set(keys[:8])  # their records wait 50 ms: records behind them go through the log
    rng = random.Random(13)
    sent: Counter[str] = Counter()
    seen: dict[tuple[str, int], dict[str, int]] = {}  # (process, run) -> last counters scraped
    stop = threading.Event()

    def feed() -> None:
        p = Producer({"bootstrap.servers": kafka, "linger.ms": 5, "enable.idempotence": True})
        while not stop.is_set() and sum(sent.values()) < 6000:
            for _ in range(40):
                k = rng.choice(keys)
                rec = {"k": k, "n": sent[k]}
                if k in busy:
                    rec["busy"] = 0.05
                p.produce(source, orjson.dumps(rec), k.encode())
                sent[k] += 1
            p.poll(0)
            time.sleep(0.25)
        p.flush(30)

    def scrape() -> None:
        for n, proc in procs.items():
            got = _scrape(ports[n]) if proc.alive() else None
            if got:
                seen[(n, proc.starts)] = got

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        procs["a"].start()
        wait_for_app_topics(kafka, name)
        wait_until(lambda: "running [('" in procs["a"].log_text(), 180, 0.2, "a to run its partitions")
        feeder.start()
        for _ in range(10):
            time.sleep(0.5)
            scrape()
        procs["b"].start()  # mid-stream: the partitions are shared out
        wait_until(lambda: "running [('" in procs["b"].log_text(), 90, 0.2, "b to run partitions")
        for _ in range(8):
            time.sleep(0.5)
            scrape()
        # Kill the one running more log partitions (its local invocations in
        # flight are lost with it) mid-stream: the other takes its partitions
        # after the session timeout.
        victim = max(procs.values(), key=lambda p: (len(_owned(p, f"{name}.log")), len(_owned(p, source))))
        assert _owned(victim, f"{name}.log"), "no process runs log partitions"
        victim.kill9()
        for _ in range(16):
            time.sleep(0.5)
            scrape()
        victim.start()
        wait_until(lambda: "running [('" in _run_log(victim), 90, 0.2, "the restarted process to run partitions")
        feeder.join(120)
        assert not feeder.is_alive()

        want = {k: list(range(sent[k])) for k in sent}
        wait_until(lambda: scrape() or sum(map(len, _lists(kafka, name).values())) >= sum(sent.values()), 240,
                   1.0, "an entry for every record")
        _wait_lists(kafka, name, want, 10)
        scrape()
        for proc in procs.values():
            assert proc.stop() == 0
    finally:
        stop.set()
        for proc in procs.values():
            if proc.alive():
                proc.kill9()
    out = Counter((v["k"], v["n"]) for r in read_to_end(kafka, results) if (v := orjson.loads(r.value)))
    assert out == {(k, i): 1 for k in sent for i in range(sent[k])}, "an output is missing or duplicated"
    assert read_to_end(kafka, f"{name}.dlq") == [], "a marker or record was dead-lettered"
    local = sum(c.get("local", 0) for c in seen.values())
    via_log = sum(c.get("invoked", 0) - c.get("local", 0) for c in seen.values())
    assert local > 0 and via_log > 0, seen


class _Msg:
    """A source record as the router reads it (confluent_kafka.Message's API)."""

    def __init__(self, key: bytes | None, value: bytes, headers: list | None) -> None:
        self._key, self._value, self._headers = key, value, headers

    def topic(self) -> str:
        return "src"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return 41

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return 1, 1_700_000_000_000


def test_a_local_invoke_is_the_invoke_the_log_would_carry() -> None:
    """No broker: what a local start hands the partition equals what it would
    decode from the log record."""
    from oncely import schemas
    from oncely.ingest.router import Routed, route
    from oncely.shuffle.envelope import DECODED, invoke_body

    app = build("unit", "src", "out", partitions=4)
    sub = app.subscriptions[0]
    for headers in (None, [("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"), ("h", None)]):
        routed = route(app.name, app.partitions, sub, _Msg(b"k1", b'{"k": "k1", "n": 3}', headers))
        assert isinstance(routed, Routed)
        local = dict(routed.invoke)
        assert local.pop(DECODED) == {"k": "k1", "n": 3}  # the handler's first run takes it as its input
        assert schemas.decode("log_record", routed.value)["body"] == ("oncely.Invoke", local)
        # route builds invoke_body's dict itself: the same fields.
        assert set(local) - {"traceparent"} == set(invoke_body(b"\0" * 16, "s", "h", None, b"", "JSON"))
