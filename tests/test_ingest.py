"""Subscriptions: exactly-once ingest with deduplication under kill -9,
replay, dead letters, and dedup expiry — against the real broker."""

from __future__ import annotations

import io
import os
import random
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import fastavro
import orjson
from confluent_kafka import Producer

from oncely.admin import changelog_latest
from oncely.egress import dead_letters as dl
from oncely.processor import keys
from oncely.testing import create_topic, read_to_end, unique_name
from support import (REPO, ProcessorProcess, caught_up, changelog_state, state_from, store_kv, wait_for_app_topics,
                     wait_until)


def _producer(bootstrap: str) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})


def _send(producer: Producer, topic: str, records: list[tuple]) -> None:
    """records: (partition, key, value bytes, headers)."""
    for part, key, value, headers in records:
        while True:
            try:
                producer.produce(topic, key=key, value=value, partition=part, headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


def _order(oid: str, customer: str, amount: int) -> bytes:
    return orjson.dumps({"id": oid, "customer": customer, "amount": amount})


def _totals(bootstrap: str, app: str) -> tuple[dict, dict]:
    st = changelog_state(bootstrap, app)
    return ({k: v for (_, k, n), v in st.items() if n == "total"},
            {k: v for (_, k, n), v in st.items() if n == "orders"})


def _orders_env(app: str, source: str, **extra: str) -> dict[str, str]:
    return {"ONCELY_TEST_APP": app, "ONCELY_TEST_SOURCE": source, **extra}


def test_ingest_with_duplicates_exact_under_kill9(kafka: str, tmp_path: Path) -> None:
    app, source = unique_name("ingest"), unique_name("orders")
    src_parts = 4
    create_topic(kafka, source, src_parts)
    rng = random.Random(4)
    distinct = 45_000
    orders = [(f"o{i}", f"c{rng.randrange(2000)}", rng.randint(1, 9)) for i in range(distinct)]
    sums: dict[bytes, int] = defaultdict(int)
    counts: dict[bytes, int] = defaultdict(int)
    for _, cust, amount in orders:
        sums[cust.encode()] += amount
        counts[cust.encode()] += 1

    # The stream: every order once on its source partition, plus 5,000
    # duplicates (same Idempotency-Key and body): adjacent, far apart, and on
    # another source partition than the original.
    placed: list[tuple] = []
    home = {}
    for oid, cust, amount in orders:
        part = rng.randrange(src_parts)
        home[oid] = part
        rec = (part, cust.encode(), _order(oid, cust, amount), [("Idempotency-Key", oid.encode())])
        placed.append(rec)
        if rng.random() < 0.04:                       # adjacent duplicate
            placed.append(rec)
    while len(placed) < 50_000:
        oid, cust, amount = orders[rng.randrange(distinct)]
        part = home[oid] if rng.random() < 0.5 else (home[oid] + 1) % src_parts   # across partitions
        dup = (part, cust.encode(), _order(oid, cust, amount), [("Idempotency-Key", oid.encode())])
        placed.insert(rng.randrange(len(placed) // 2, len(placed)), dup)            # far apart
    assert len(placed) == 50_000

    proc = ProcessorProcess("tests.apps.orders:app", kafka, tmp_path / "state", _orders_env(app, source),
                            tmp_path / "p.log").start()
    producer = _producer(kafka)
    try:
        wait_for_app_topics(kafka, app)
        batches = 10
        size = len(placed) // batches
        kills = 0
        for b in range(batches):
            before = sum(_totals(kafka, app)[1].values()) if b else 0
            _send(producer, source, placed[b * size:(b + 1) * size])
            if b in (2, 5, 8):
                # Kill while it processes the batch just sent: this run owns
                # partitions and has committed state changes of its own.
                wait_until(lambda: "running [('" in proc.log_text().split("===== start")[-1], 60, 0.1,
                           "the processor to own partitions")
                wait_until(lambda: sum(_totals(kafka, app)[1].values()) > before, 60, 0.2,
                           "committed progress of this run")
                time.sleep(rng.uniform(0.0, 0.5))
                proc.kill9()
                kills += 1
                proc.start()
        assert kills >= 3
        assert proc.log_text().count("running [('") >= 3, "the kills did not hit a working processor"
        wait_until(lambda: _totals(kafka, app) == (dict(sums), dict(counts)), 300, 2.0,
                   "every customer's total over distinct orders")
        assert proc.stop() == 0
        assert read_to_end(kafka, f"{app}.dlq") == []
        kv = store_kv(tmp_path / "state", app, 8)
        st = state_from(kv)
        assert {k: v for (_, k, n), v in st.items() if n == "total"} == dict(sums)
    finally:
        if proc.alive():
            proc.kill9()


def _replay(kafka: str, spec: str, env: dict, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "oncely.cli", "replay", spec, "--bootstrap", kafka, *args],
                         cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _summary(text: str) -> dict[str, int]:
    m = re.search(r"records read (\d+), invoked (\d+), deduplicated (\d+), dead-lettered (\d+)", text)
    assert m, text
    return dict(zip(("read", "invoked", "deduplicated", "dead"), map(int, m.groups())))


def test_replay_without_new_ids_changes_nothing_and_with_new_ids_doubles(kafka: str, tmp_path: Path) -> None:
    app, source = unique_name("replay"), unique_name("orders")
    create_topic(kafka, source, 2)
    env = _orders_env(app, source)
    rng = random.Random(9)
    records = []
    for i in range(3000):
        cust = f"c{rng.randrange(50)}"
        records.append((i % 2, cust.encode(), _order(f"o{i}", cust, rng.randint(1, 9)),
                        [("Idempotency-Key", f"o{i}".encode())]))
    proc = ProcessorProcess("tests.apps.orders:app", kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    try:
        _send(_producer(kafka), source, records)
        wait_for_app_topics(kafka, app)
        sums: dict[bytes, int] = defaultdict(int)
        for _, k, v, _ in records:
            sums[k] += orjson.loads(v)["amount"]
        wait_until(lambda: _totals(kafka, app)[0] == dict(sums), 120, 1.0, "first totals")

        same = _summary(_replay(kafka, "tests.apps.orders:app", env, "--topic", source, "--from-offset", "0"))
        assert same == {"read": 3000, "invoked": 0, "deduplicated": 3000, "dead": 0}
        wait_until(lambda: caught_up(kafka, app, [f"{app}.log"]), 120, 0.5, "the processor to catch up")
        assert _totals(kafka, app)[0] == dict(sums), "a replay without --new-ids changed state"

        # --new-ids on partition 0, offsets [100, 600): those 500 records count twice.
        again = _summary(_replay(kafka, "tests.apps.orders:app", env, "--topic", source, "--partition", "0",
                                 "--from-offset", "100", "--to-offset", "600", "--new-ids"))
        assert again == {"read": 500, "invoked": 500, "deduplicated": 0, "dead": 0}
        doubled = dict(sums)
        part0 = [r for r in records if r[0] == 0]
        for _, k, v, _ in part0[100:600]:
            doubled[k] += orjson.loads(v)["amount"]
        wait_until(lambda: _totals(kafka, app)[0] == doubled, 120, 1.0, "the replayed contributions doubled")
        wait_until(lambda: caught_up(kafka, app, [f"{app}.log"]), 120, 0.5, "the processor to catch up")
        assert _totals(kafka, app)[0] == doubled
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()


def test_bad_records_go_to_the_dlq_and_nothing_stalls_or_is_lost(kafka: str, tmp_path: Path) -> None:
    app = unique_name("mixed")
    jt, at = unique_name("dep-json"), unique_name("dep-avro")
    create_topic(kafka, jt, 2)
    create_topic(kafka, at, 1)
    env = {"ONCELY_TEST_APP": app, "ONCELY_TEST_JSON_TOPIC": jt, "ONCELY_TEST_AVRO_TOPIC": at}
    schema = fastavro.parse_schema(orjson.loads((REPO / "tests/apps/deposit.avsc").read_bytes()))

    def avro(amount: int) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema, {"amount": amount, "note": "ok"})
        return buf.getvalue()

    good_json = [(i % 2, f"acct{i % 5}".encode(), orjson.dumps({"amount": i}), None) for i in range(200)]
    good_avro = [(0, f"acct{i % 5}".encode(), avro(i), None) for i in range(100)]
    bad_json = {
        "malformed": (0, b"acct1", b'{"amount": 5', None),
        "null-key": (1, None, orjson.dumps({"amount": 7}), None),
        "oversized": (0, b"acct2", orjson.dumps({"amount": 1, "pad": "x" * 5000}), None),
        "non-utf8-key": (1, b"\xff\xfe\x00", orjson.dumps({"amount": 11}), None),  # a key, not an error
    }
    bad_avro = {"wrong-avro": (0, b"acct3", b"\x02garbage", None)}
    producer = _producer(kafka)
    # Bad records in the middle of good ones: the consumer must get past them.
    _send(producer, jt, good_json[:100] + list(bad_json.values()) + good_json[100:])
    _send(producer, at, good_avro[:50] + list(bad_avro.values()) + good_avro[50:])

    proc = ProcessorProcess("tests.apps.mixed:app", kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    try:
        wait_for_app_topics(kafka, app)
        expected: dict[bytes, int] = defaultdict(int)
        for _, k, v, _ in good_json:
            expected[k] += orjson.loads(v)["amount"]
        for i in range(100):
            expected[f"acct{i % 5}".encode()] += i
        expected[b"\xff\xfe\x00"] += 11

        def balances() -> dict:
            return {k: v for (_, k, n), v in changelog_state(kafka, app).items() if n == "balance"}

        wait_until(lambda: balances() == dict(expected), 120, 1.0, "every good record's deposit")
        dead = wait_until(lambda: (d := read_to_end(kafka, f"{app}.dlq")) and len(d) >= 4 and d, 60, 0.5, "4 dead")
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()

    assert len(dead) == 4
    reasons = sorted(d.header(dl.H_REASON).decode() for d in dead)
    assert reasons == ["missing-key", "too-large", "undecodable", "undecodable"]
    # Coordinates: the record in the DLQ is the bad record at its source offset.
    source = read_to_end(kafka, jt) + read_to_end(kafka, at)
    by_coord = {(r.topic, r.partition, r.offset): r for r in source}
    for d in dead:
        coord = (d.header(dl.H_SOURCE_TOPIC).decode(), int(d.header(dl.H_SOURCE_PARTITION)),
                 int(d.header(dl.H_SOURCE_OFFSET)))
        original = by_coord[coord]
        assert (d.key, d.value) == (original.key, original.value)
        assert d.header("oncely.subscription") in (b"json-deposits", b"avro-deposits")
    texts = {d.header(dl.H_REASON).decode() + ":" + d.header(dl.H_SOURCE_TOPIC).decode(): d for d in dead}
    assert b"max_bytes=2048" in texts[f"too-large:{jt}"].header(dl.H_ERROR)
    assert b"the record's key is null" in texts[f"missing-key:{jt}"].header(dl.H_ERROR)
    assert b"not json" in texts[f"undecodable:{jt}"].header(dl.H_ERROR)
    assert b"not an Avro datum" in texts[f"undecodable:{at}"].header(dl.H_ERROR)
    produced = len(good_json) + len(good_avro) + len(bad_json) + len(bad_avro)
    processed = sum(v for (_, _, n), v in changelog_state(kafka, app).items() if n == "deposits")
    assert processed + len(dead) == produced, "a record was lost or processed twice"


def test_dedup_entries_expire_and_are_removed_everywhere(kafka: str, tmp_path: Path) -> None:
    app, source = unique_name("expiry"), unique_name("orders")
    create_topic(kafka, source, 1)
    env = _orders_env(app, source, ONCELY_TEST_RETENTION="3")
    proc = ProcessorProcess("tests.apps.orders:app", kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    producer = _producer(kafka)
    rec = (0, b"k", _order("o1", "alice", 5), [("Idempotency-Key", b"o1")])
    try:
        wait_for_app_topics(kafka, app)
        _send(producer, source, [rec, rec])
        wait_until(lambda: _totals(kafka, app)[0] == {b"alice": 5}, 60, 0.5, "the first order")

        def dedup_keys() -> list[bytes]:
            return [k for k in changelog_latest(kafka, app) if k[:1] in (keys.DEDUP, keys.EXPIRY)]

        present = dedup_keys()
        assert len(present) == 2, "one dedup entry and its expiry index"
        wait_until(lambda: dedup_keys() == [], 30, 0.5, "the dedup entry to be tombstoned in the changelog")
        tombstones = [r for r in read_to_end(kafka, f"{app}.changelog") if r.key in present and r.value is None]
        assert {r.key for r in tombstones} == set(present)
        # After the retention the same idempotency key is a new invocation.
        _send(producer, source, [rec])
        wait_until(lambda: _totals(kafka, app)[0] == {b"alice": 10}, 60, 0.5, "the order after expiry")
        wait_until(lambda: dedup_keys() == [], 30, 0.5, "the second entry to expire")
        assert proc.stop() == 0
        kv = store_kv(tmp_path / "state", app, 8)
        assert [k for k in kv if k[:1] in (keys.DEDUP, keys.EXPIRY)] == [], "expired entries remain in RocksDB"
        assert changelog_state(kafka, app)[("customers", b"alice", "last_source")] == [source, 0, 2]
    finally:
        if proc.alive():
            proc.kill9()
