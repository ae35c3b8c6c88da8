"""Egress: transactional emits, exactly once under kill -9, Avro output,
schema violations and terminal failures — against the real broker."""

from __future__ import annotations

import io
import random
import time
from collections import defaultdict
from pathlib import Path

import fastavro
import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

import oncely
from oncely.egress import dead_letters as dl
from oncely.testing import create_topic, read_to_end, unique_name
from support import (REPO, InProcessProcessor, ProcessorProcess, caught_up, changelog_state, wait_for_app_topics,
                     wait_until)

AVSC = REPO / "tests/apps/deposit.avsc"


def _send(bootstrap: str, topic: str, records: list[tuple]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for key, value, headers in records:
        while True:
            try:
                p.produce(topic, key=key, value=value, headers=headers)
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(60) == 0


def test_enriched_orders_exactly_once_under_kill9(kafka: str, tmp_path: Path) -> None:
    app, source, out = unique_name("enrich"), unique_name("orders"), unique_name("enriched")
    create_topic(kafka, source, 4)
    create_topic(kafka, out, 3)
    rng = random.Random(5)
    orders = []
    for i in range(30_000):
        cust = f"c{rng.randrange(500)}"
        orders.append({"id": f"o{i}", "customer": cust, "amount": rng.randint(1, 20)})
    # The sequential computation: each customer's orders in the order sent
    # (all of a customer's orders share a source partition, keyed by customer).
    running: dict[str, int] = defaultdict(int)
    expected: dict[str, int] = {}
    for o in orders:
        running[o["customer"]] += o["amount"]
        expected[o["id"]] = running[o["customer"]]
    records = [(o["customer"].encode(), orjson.dumps(o), [("Idempotency-Key", o["id"].encode())]) for o in orders]

    env = {"ENRICH_APP": app, "ORDERS_TOPIC": source, "ENRICHED_TOPIC": out}
    proc = ProcessorProcess("oncely.examples.enrichment:app", kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    try:
        wait_for_app_topics(kafka, app)
        batches, size = 10, len(records) // 10
        watcher = Consumer({"bootstrap.servers": kafka, "group.id": unique_name("watch")})

        def produced() -> int:
            """Output records written so far, committed or not (the high
            watermarks): cheap enough to poll every few ms, where reading
            the committed output took long enough for a fast processor to
            finish the whole batch (and the kill then hit no open work)."""
            return sum(watcher.get_watermark_offsets(TopicPartition(out, p), timeout=5)[1] for p in range(3))

        interrupted = 0  # kills that left their batch unfinished
        for b in range(batches):
            before = produced()
            _send(kafka, source, records[b * size:(b + 1) * size])
            if b in (2, 5, 8):
                # Kill while this run works on the batch just sent.
                wait_until(lambda: "running [('" in proc.log_text().split("===== start")[-1], 60, 0.1,
                           "the processor to own partitions")
                # Some of the batch's output written: the rest is being worked
                # on (in open transactions, or held while a commit is on its way).
                wait_until(lambda: produced() >= before + size // 10, 60, 0.005,
                           "a tenth of this batch's output written")
                time.sleep(rng.uniform(0.0, 0.02))
                proc.kill9()
                # Did the kill interrupt the batch? With the process dead,
                # what is committed of it can be counted at leisure.
                if len(read_to_end(kafka, out)) < (b + 1) * size:
                    interrupted += 1
                proc.start()
        watcher.close()
        got = wait_until(lambda: (r := read_to_end(kafka, out)) and len(r) >= len(orders) and r, 300, 2.0,
                         "every enriched order")
        # Anything extra would be committed with the offsets of its input:
        # wait until every input (source and log) is consumed and committed.
        wait_until(lambda: caught_up(kafka, app, [source, f"{app}.log"]), 120, 0.5, "the processor to catch up")
        got = read_to_end(kafka, out)
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    values = [orjson.loads(r.value) for r in got]
    ids = [v["id"] for v in values]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} enriched orders appear twice"
    assert set(ids) == set(expected), "enriched orders are missing"
    assert {v["id"]: v["running_total"] for v in values} == expected
    assert all(r.key == orjson.loads(r.value)["customer"].encode() for r in got)
    assert all(r.header("source") == b"oncely" for r in got)
    # The kills hit work in progress: its batch not yet all committed (its
    # records in open transactions, held while a commit was on its way, or
    # not yet read). Aborted output shows under read_uncommitted only when
    # a kill found records already in an open transaction, which a fast
    # processor often leaves no time for (CI: 0 aborted in one run), so
    # that is printed, not required.
    assert interrupted >= 2, f"only {interrupted} of 3 kills found their batch unfinished"
    uncommitted = read_to_end(kafka, out, isolation="read_uncommitted")
    print(f"{interrupted} of 3 kills mid-batch; read_committed {len(got)} records, "
          f"read_uncommitted {len(uncommitted)}")


def _avro(value: bytes) -> dict:
    schema = fastavro.parse_schema(orjson.loads(AVSC.read_bytes()))
    return fastavro.schemaless_reader(io.BytesIO(value), schema, None)


def test_avro_output_round_trips_and_a_bad_value_is_dead_lettered(kafka: str, tmp_path: Path) -> None:
    name, out = unique_name("avroout"), unique_name("deposits-avro")
    create_topic(kafka, out, 1)
    app = oncely.App(name, partitions=2, bootstrap=kafka, state_dir=str(tmp_path),
                     retry=oncely.RetryPolicy(max_attempts=2, initial_interval=0.05))
    app.sink(out, value=f"avro:{AVSC}")
    acct = app.keyed("acct")

    @acct.handler
    async def record(ctx: oncely.Context, d: dict) -> None:
        ctx.set("seen", ctx.get("seen", 0) + 1)
        ctx.emit(out, {"amount": d["amount"], "note": d.get("note", "")}, key=ctx.key)

    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=name)
        for i in range(50):
            client.send(record, f"a{i % 3}", {"amount": i, "note": f"n{i}"})
        client.send(record, "bad", {"amount": "not an int"})       # does not fit the schema
        client.send(record, "big", {"amount": 2**40})              # not an Avro int either
        client.flush()
        dead = wait_until(lambda: (d := read_to_end(kafka, f"{name}.dlq")) and len(d) == 2 and d, 60, 0.5,
                          "two dead letters")
        got = wait_until(lambda: (r := read_to_end(kafka, out)) and len(r) >= 50 and r, 60, 0.5, "50 records")
        time.sleep(1)
    finally:
        runner.stop()
    got = read_to_end(kafka, out, isolation="read_uncommitted")
    assert len(got) == 50, "a half or extra record reached the sink"
    assert sorted((_avro(r.value)["amount"], _avro(r.value)["note"]) for r in got) == sorted(
        (i, f"n{i}") for i in range(50))
    for d in dead:
        assert d.header(dl.H_REASON) == b"retries-exhausted"
        assert b"does not fit the Avro schema" in d.header(dl.H_ERROR)
    assert {d.key for d in dead} == {b"bad", b"big"}
    state = changelog_state(kafka, name)
    assert ("acct", b"bad", "seen") not in state, "a failed invocation's state was kept"


def test_emit_of_a_terminally_failed_invocation_is_not_visible(kafka: str, tmp_path: Path) -> None:
    name, out = unique_name("termemit"), unique_name("out")
    create_topic(kafka, out, 1)
    app = oncely.App(name, partitions=1, bootstrap=kafka, state_dir=str(tmp_path))
    app.sink(out)
    svc = app.keyed("svc")

    @svc.handler
    async def work(ctx: oncely.Context, x: dict) -> None:
        ctx.emit(out, {"x": x["n"], "stage": "before"})
        if x["fail"]:
            raise oncely.TerminalError("rejected after emitting")
        ctx.emit(out, {"x": x["n"], "stage": "after"})

    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=name)
        client.send(work, "k", {"n": 1, "fail": False})
        client.send(work, "k", {"n": 2, "fail": True})
        client.send(work, "k", {"n": 3, "fail": False})
        client.flush()
        wait_until(lambda: len(read_to_end(kafka, out)) >= 4 and read_to_end(kafka, f"{name}.dlq"), 60, 0.5,
                   "both good invocations and the dead letter")
        time.sleep(1)
    finally:
        runner.stop()
    for isolation in ("read_committed", "read_uncommitted"):
        values = [orjson.loads(r.value) for r in read_to_end(kafka, out, isolation=isolation)]
        assert values == [{"x": 1, "stage": "before"}, {"x": 1, "stage": "after"},
                          {"x": 3, "stage": "before"}, {"x": 3, "stage": "after"}], isolation


def test_missing_sink_topic_is_refused_or_created(kafka: str, tmp_path: Path) -> None:
    import pytest

    name, out = unique_name("nosink"), unique_name("absent")
    app = oncely.App(name, partitions=2, bootstrap=kafka, state_dir=str(tmp_path))
    app.sink(out)
    with pytest.raises(oncely.ConfigError, match=r"do not exist: create them \(`oncely topics create`\), or let "
                                                 r"oncely create them with App\(\.\.\., create_sink_topics=True\)"):
        InProcessProcessor(app).start()
    with pytest.raises(ValueError):  # refused before any of the app's topics was created
        read_to_end(kafka, f"{name}.log")
    app.config.create_sink_topics = True
    InProcessProcessor(app).start().stop()
    assert read_to_end(kafka, out) == []  # it exists now
