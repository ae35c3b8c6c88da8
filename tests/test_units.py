"""Pure logic: routing, ids, schemas, the store overlay, Context replay,
retry policy and configuration. No broker needed, except the murmur2 check
against librdkafka's Java-compatible partitioner."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import oncely
from oncely import schemas
from oncely.app import AppConfig, RetryPolicy
from oncely.context import KeyedContext
from oncely.errors import ConfigError, NonDeterminismError, TerminalError, UsageError
from oncely.processor import keys
from oncely.sdk.journal import JournalContext, KeyedJournalContext, context_for
from oncely.sdk.protocol import Entry, HandlerCall, decode_value, encode_value
from oncely.sdk.runner import run_handler
from oncely.processor.store import PartitionStore
from oncely.shuffle.ids import (child_id, format_awakeable, format_id, idempotent_id, parse_awakeable, parse_id,
                               random_id, source_record_id)
from oncely.shuffle.routing import murmur2, partition_for

# Partitions (of 1000) that Kafka's default partitioner gives these keys;
# taken from librdkafka's murmur2_random partitioner on a real broker.
VECTORS = {b"": 681, b"a": 524, b"ab": 434, b"abc": 107, b"abcd": 100, b"alice": 749,
           "ünïcode".encode(): 253, bytes(range(256)): 374}


def test_murmur2_matches_kafkas_default_partitioner() -> None:
    for key, expected in VECTORS.items():
        assert partition_for(key, 1000) == expected, key
    assert 0 <= murmur2(b"x") < 2**32


def test_murmur2_against_librdkafka_on_the_broker(kafka: str, kafka_topic) -> None:
    import uuid

    from confluent_kafka import Producer

    topic = kafka_topic(partitions=7)
    producer = Producer({"bootstrap.servers": kafka, "partitioner": "murmur2_random"})
    got: list[tuple[bytes, int]] = []
    ks = [uuid.uuid4().bytes[: i % 17] + bytes([i % 256]) * (i % 5) for i in range(300)]
    for k in ks:
        producer.produce(topic, key=k, value=b"v", on_delivery=lambda e, m: got.append((m.key(), m.partition())))
    producer.flush(30)
    assert len(got) == len(ks)
    assert all(p == partition_for(k, 7) for k, p in got)


def test_ids_are_deterministic_where_duplicates_must_be_recognised() -> None:
    a = idempotent_id("counter", "add", b"alice", "order-1")
    assert a == idempotent_id("counter", "add", b"alice", "order-1")
    assert a != idempotent_id("counter", "add", b"bob", "order-1")
    assert a != idempotent_id("counter", "sub", b"alice", "order-1")
    assert source_record_id("t", 0, 5, "s/h") != source_record_id("t", 0, 6, "s/h")
    assert source_record_id("t", 1, 5, "s/h") != source_record_id("t1", 0, 5, "s/h")
    assert source_record_id("t", 0, 5, "s/h") != source_record_id("t", 0, 5, "s/g")
    # A replay recognises what the live path made by this id: it must not change between versions.
    assert source_record_id("t", 0, 5, "s/h").hex() == "1f77eb13bdfaaaa2dc69a3652469638c"
    assert child_id(a, 3) == child_id(a, 3) != child_id(a, 4)
    r = random_id()
    assert parse_id(format_id(r)) == r
    with pytest.raises(ValueError, match="does not start"):
        parse_id("xyz")


def test_ids_keep_their_derivation_across_versions() -> None:
    # Ids are stored (dedup entries, statuses, callers' journals): a new
    # version must derive the same id for the same request.
    assert source_record_id("orders", 7, 123456789012, "svc/h").hex() == "4a0e6bd4fd2b7e679e92735e71d514f3"
    assert idempotent_id("svc", "h", b"k", "idem-1").hex() == "a08b793c3e3467d474d1e50585b86561"
    assert idempotent_id("svc", "h", None, "idem-1").hex() == "8536d14d0ec11796ebfc28caf01bdae0"
    assert child_id(bytes(range(16)), 5).hex() == "d8f610a20ac16ef1ae8874b1a2a73b7a"


# -- internal record encoding (schemas/) ------------------------------------------

INVOKE = {"invocation_id": b"i" * 16, "service": "s", "handler": "h", "key": b"\xff\x00", "payload": b"1",
          "payload_format": "JSON", "idempotency_key": "k", "idempotency_retention_ms": 5,
          "caller": {"invocation_id": b"c" * 16, "partition": 3, "journal_index": 2},
          "source": {"topic": "t", "partition": 1, "offset": 9, "timestamp_ms": 7, "key": None,
                     "headers": [{"name": "h", "value": b"v"}, {"name": "n", "value": None}]},
          "subscription": "sub"}
RECORDS = [
    ("log_record", {"body": ("oncely.Invoke", INVOKE)}),
    ("log_record", {"body": ("oncely.Invoke", {**INVOKE, "key": None, "idempotency_key": None, "caller": None,
                                               "idempotency_retention_ms": None, "source": None,
                                               "subscription": None, "payload_format": "BYTES"})}),
    ("log_record", {"body": ("oncely.Response", {"invocation_id": b"c" * 16, "journal_index": 2, "value": None,
                                                 "failure": "boom"})}),
    ("log_record", {"body": ("oncely.AwakeableResult", {"invocation_id": b"c" * 16, "journal_index": 0,
                                                        "value": b"1", "failure": None, "request_id": b"r"})}),
    ("invocation_status", {"invoke": INVOKE, "phase": "BACKING_OFF", "seq": 12, "attempt": 3,
                           "retry_at_ms": 99, "error": "e"}),
    ("journal_entry", {"kind": "call", "name": "", "completed": False, "value": None, "error": None}),
    ("dedup_entry", {"expires_at_ms": 5, "failed": True, "result": None, "error": "x"}),
    ("timer", {"kind": "SEND", "partition": 4, "routing_key": b"k", "record": b"\x02\x01"}),
    ("timer", {"kind": "WAKE", "partition": -1, "routing_key": None, "record": None}),
    ("checkpoint", {"app": "a", "partitions": 8, "partition": 1, "changelog_offset": 10, "written_at_ms": 1}),
    # The gateway's records (gateway/, processor/requests.py).
    ("log_record", {"body": ("oncely.Invoke", {**INVOKE, "reply": {"request_id": b"r" * 16, "partition": 2}})}),
    ("log_record", {"body": ("oncely.Attach", {"invocation_id": b"i" * 16, "wait": True,
                                               "reply": {"request_id": b"r" * 16, "partition": 0}})}),
    ("log_record", {"body": ("oncely.ReadState", {"service": "s", "key": b"\x00", "name": None,
                                                  "reply": {"request_id": b"r" * 16, "partition": 1}})}),
    ("log_record", {"body": ("oncely.Delay", {"at_ms": 9, "invocation_id": b"i" * 16, "partition": 3,
                                              "routing_key": b"k", "record": b"\x02\x01"})}),
    ("reply", {"invocation_id": None, "status": "state", "value": None, "error": None, "entries": {"n": b"j1"}}),
    ("reply", {"invocation_id": b"i" * 16, "status": "failed", "value": None, "error": "x", "entries": None}),
    # Invocation controls and status queries (processor/controls.py).
    ("log_record", {"body": ("oncely.Control", {"invocation_id": b"i" * 16, "action": "pause",
                                                "reply": {"request_id": b"r" * 16, "partition": 1}})}),
    ("log_record", {"body": ("oncely.Control", {"invocation_id": b"i" * 16, "action": "kill", "reply": None})}),
    ("log_record", {"body": ("oncely.Query", {"invocation_id": None, "phases": ["PAUSED"], "limit": 10,
                                              "reply": {"request_id": b"r" * 16, "partition": 0}})}),
    ("invocation_status", {"invoke": INVOKE, "phase": "PAUSED", "seq": 1, "attempt": 0, "retry_at_ms": 0,
                           "error": "paused", "held": True, "cancelled": False}),
    ("reply", {"invocation_id": b"i" * 16, "status": "conflict", "value": None, "error": "x", "entries": None}),
    # Remote deployments (remote/deployments.py) and the pin of an invocation.
    ("deployment", {"id": "dp_x", "uri": "http://h/", "manifest": b"{}", "headers": {"k": "v"},
                    "registered_at_ms": 1}),
    ("invocation_status", {"invoke": INVOKE, "phase": "SUSPENDED", "seq": 1, "attempt": 0, "retry_at_ms": 0,
                           "error": None, "deployment": "dp_x"}),
    # A partition's caught-up marker to itself (processor/local_start.py).
    ("log_record", {"body": ("oncely.Mark", {"token": b"t" * 16, "epoch": 3})}),
]


@pytest.mark.parametrize("name,record", RECORDS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(RECORDS)])
def test_schema_round_trip(name: str, record: dict) -> None:
    data = schemas.encode(name, record)
    assert data[0] == schemas.FORMAT
    assert schemas.decode(name, data) == record
    assert schemas.decode(name, memoryview(data)) == record  # no copy needed


def test_schema_checks_fields_on_decode() -> None:
    status = dict(RECORDS[4][1])
    with pytest.raises(schemas.SchemaError, match=r"invocation_status.*\$\.phase"):
        schemas.decode("invocation_status", schemas.encode("invocation_status", {**status, "phase": "DONE"}))
    with pytest.raises(schemas.SchemaError, match=r"missing required field `seq`"):
        schemas.decode("invocation_status", schemas.encode("invocation_status",
                                                            {k: v for k, v in status.items() if k != "seq"}))
    with pytest.raises(schemas.SchemaError, match=r"Expected `bytes`, got `str` - at `\$\.invoke\.payload`"):
        schemas.decode("invocation_status", schemas.encode("invocation_status",
                                                            {**status, "invoke": {**INVOKE, "payload": "1"}}))
    # A field this version does not know is ignored (a newer writer may add one).
    assert schemas.decode("dedup_entry", schemas.encode("dedup_entry", {**RECORDS[6][1], "new": 1})) == RECORDS[6][1]


def test_schema_garbage_and_old_formats() -> None:
    data = schemas.encode("log_record", RECORDS[0][1])
    for raw in (b"", b"garbage", data[:-1], data + b"\x00", b"\x02", b"\x02\x09\x80"):
        with pytest.raises(schemas.SchemaError):
            schemas.decode("log_record", raw)
    with pytest.raises(schemas.SchemaError, match="unknown kind"):
        schemas.decode("log_record", b"\x02\x7f\x80")  # a kind of a newer oncely
    with pytest.raises(schemas.SchemaError, match=r"older oncely \(Avro.*delete its state directory.*topics"):
        schemas.decode("invocation_status", b"\x01\x00\x20\x02")  # what the Avro format wrote
    with pytest.raises(schemas.SchemaError):
        schemas.decode("journal_entry", schemas.encode("timer", RECORDS[8][1]))  # another record kind
    with pytest.raises(schemas.SchemaError, match="unknown"):
        schemas.encode("log_record", {"body": ("oncely.Cancel", {"invocation_id": b"i" * 16})})


def test_overlay_net_effects(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "s", "app", 4, 1)
    store.open()
    store.put_fresh(b"vX", b"1")
    store.delete(b"vX")
    assert store.overlay == {}, "a fresh put deleted in the same interval must leave nothing"
    store.put(b"sA", b"1")
    store.commit(10)
    store.delete(b"sA")
    assert store.overlay == {b"sA": None}, "deleting a committed key must leave a tombstone"
    store.put_fresh(b"sA", b"2")  # key pending deletion: not fresh
    store.delete(b"sA")
    assert store.overlay == {b"sA": None}
    store.drop_overlay()
    assert store.get(b"sA") == b"1"
    store.put(b"sB", b"3")
    store.delete(b"sA")
    assert store.scan(b"s") == [(b"sB", b"3")]
    store.commit(11)
    assert store.checkpoint()["changelog_offset"] == 11
    store.close()


def test_a_frozen_overlay_is_read_beneath_the_new_one_and_committed_alone(tmp_path: Path) -> None:
    """While a commit is on its way (commit_loop.py) its overlay is frozen:
    reads see new over frozen over RocksDB, RocksDB gets only the frozen one,
    and dropping the overlays is a rewind to RocksDB."""
    store = PartitionStore(tmp_path / "s", "app", 4, 1)
    store.open()
    store.put(b"sA", b"1")
    store.put(b"sB", b"1")
    store.commit(1)
    store.put(b"sA", b"2")
    store.delete(b"sB")
    store.put_fresh(b"sC", b"2")
    store.freeze()  # the commit carrying A=2, B deleted, C=2 is on its way
    assert not store.has_changes()
    store.put(b"sA", b"3")
    store.put_fresh(b"sD", b"3")
    store.delete(b"sC")  # fresh in the frozen overlay, not in this one: a tombstone
    assert store.overlay == {b"sA": b"3", b"sD": b"3", b"sC": None}
    assert [store.get(k) for k in (b"sA", b"sB", b"sC", b"sD")] == [b"3", None, None, b"3"]
    assert store.scan(b"s") == [(b"sA", b"3"), (b"sD", b"3")]
    store.commit(2)  # the frozen overlay only
    assert store.committed_get(b"sA") == b"2" and store.committed_get(b"sC") == b"2"
    assert store.committed_get(b"sB") is None and store.committed_get(b"sD") is None
    assert store.scan(b"s") == [(b"sA", b"3"), (b"sD", b"3")], "the open overlay still applies"
    store.freeze()
    store.put(b"sE", b"4")
    store.drop_overlay()  # the commit failed: back to RocksDB
    assert store.scan(b"s") == [(b"sA", b"2"), (b"sC", b"2")]
    store.close()


def test_store_from_another_app_is_wiped(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "s", "app", 4, 1)
    store.open()
    store.put(b"sA", b"1")
    store.commit(5)
    store.close()
    other = PartitionStore(tmp_path / "s", "app", 8, 1)  # partition count changed: not trustworthy
    other.open()
    assert other.wiped and other.get(b"sA") is None
    other.close()


class _State:
    def __init__(self, values: dict[str, object]) -> None:
        self.values = {k: encode_value(v) for k, v in values.items()}

    def get(self, name: str) -> bytes | None:
        return self.values.get(name)

    def names(self) -> list[str]:
        return sorted(self.values)


def _call(journal: list[Entry], state: dict | None = None, keyed: bool = True) -> HandlerCall:
    return HandlerCall(invocation_id=b"\x01" * 16, service="svc", handler="h", key=b"k", payload=b"1",
                       payload_format="JSON", attempt=0, journal=journal, state=_State(state or {}))


def test_context_journals_and_replays_run_results() -> None:
    journal: list[Entry] = []
    calls: list[int] = []

    def effect() -> dict:
        calls.append(1)
        return {"token": len(calls)}

    async def handler(ctx: KeyedContext) -> tuple:
        n = ctx.get("n", 0)
        out = await ctx.run("charge", effect)
        ctx.set("n", n + 1)
        return out, ctx.random(), str(ctx.uuid()), ctx.now()

    first = asyncio.run(handler(context_for(_call(journal, {"n": 1}), True)))
    assert [e.kind for e in journal] == ["get", "run", "set", "random", "uuid", "now"]
    replay = asyncio.run(handler(context_for(_call(journal, {"n": 1}), True)))
    assert replay == first, "a replay must see the journaled results, seeded randomness and time"
    assert calls == [1], "a journaled step must not run again"


def test_context_detects_non_determinism_even_if_the_handler_catches_it() -> None:
    journal = [Entry("get", "n"), Entry("run", "charge", value=encode_value(1))]

    async def changed(ctx: KeyedContext) -> None:
        ctx.get("n")
        try:
            await ctx.run("refund", lambda: 2)
        except BaseException:
            pass

    ctx = context_for(_call(journal), True)
    asyncio.run(changed(ctx))
    assert isinstance(ctx.diverged, NonDeterminismError)
    assert ctx.diverged.index == 1
    assert "run('charge')" in str(ctx.diverged) and "run('refund')" in str(ctx.diverged)
    with pytest.raises(NonDeterminismError):
        ctx.get("n")


def test_context_state_view_and_terminal_run() -> None:
    journal: list[Entry] = []
    ctx = KeyedJournalContext(_call(journal, {"a": 1, "b": b"raw"}))
    ctx.set("c", [1, 2])
    ctx.clear("a")
    assert ctx.state_keys() == ["b", "c"]
    assert ctx.get("b") == b"raw" and ctx.get("a", "gone") == "gone"
    ctx.clear_all()
    assert ctx.state_keys() == []

    async def fails() -> None:
        raise TerminalError("card declined")

    with pytest.raises(TerminalError, match="card declined"):
        asyncio.run(ctx.run("pay", fails))
    assert journal[-1].kind == "run" and journal[-1].error == "card declined"
    with pytest.raises(TypeError, match="neither JSON-serialisable nor bytes"):
        ctx.set("bad", object())


def test_stateless_context_has_no_state() -> None:
    ctx = context_for(_call([]), keyed=False)
    assert ctx.key is None and ctx.raw_key is None
    assert isinstance(ctx, oncely.Context) and not isinstance(ctx, oncely.KeyedContext)
    for op, args in [("get", ("x",)), ("set", ("x", 1)), ("clear", ("x",)), ("clear_all", ()), ("state_keys", ())]:
        with pytest.raises(UsageError, match=rf"ctx\.{op}: service 'svc' is stateless; state belongs to keyed "
                                             r"services \(app\.keyed\)"):
            getattr(ctx, op)(*args)
    keyed = context_for(_call([]), keyed=True)
    assert isinstance(keyed, oncely.KeyedContext) and keyed.key == "k" and keyed.raw_key == b"k"


def test_the_runner_gives_keyed_handlers_a_keyed_context_and_maps_their_end() -> None:
    app = oncely.App("runner", partitions=1)
    seen: dict[str, object] = {}

    @app.keyed("counter").handler
    async def add(ctx: KeyedContext, n: int) -> int:
        seen["keyed"] = ctx
        ctx.set("n", ctx.get("n", 0) + n)
        return n

    @app.service("pure").handler
    async def peek(ctx: oncely.Context) -> None:
        seen["stateless"] = ctx
        ctx.get("n")  # type: ignore[attr-defined]  # what the type checker catches

    def call(service: str, handler: str) -> HandlerCall:
        c = _call([], {"n": 1})
        c.service, c.handler, c.payload = service, handler, b"2"
        return c

    done = asyncio.run(run_handler(app, call("counter", "add")))
    assert (done.status, decode_value(done.value), decode_value(done.state["n"])) == ("completed", 2, 3)
    assert isinstance(seen["keyed"], oncely.KeyedContext)
    failed = asyncio.run(run_handler(app, call("pure", "peek")))
    assert not isinstance(seen["stateless"], oncely.KeyedContext)
    assert failed.status == "terminal" and "ctx.get: service 'pure' is stateless" in failed.error
    missing = asyncio.run(run_handler(app, call("pure", "nope")))
    assert (missing.status, missing.error) == ("terminal", "no handler pure.nope in app 'runner'")


def test_values_are_json_or_bytes_never_pickle() -> None:
    assert decode_value(encode_value({"a": [1, "x"]})) == {"a": [1, "x"]}
    assert decode_value(encode_value(b"\x80\x00")) == b"\x80\x00"
    with pytest.raises(ValueError, match="unknown value tag"):
        decode_value(b"\x80\x04pickle")


def test_retry_policy_backoff() -> None:
    p = RetryPolicy(max_attempts=5, initial_interval=0.1, factor=2, max_interval=0.5)
    assert [p.delay(n) for n in (1, 2, 3, 4, 5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    with pytest.raises(ConfigError):
        RetryPolicy(max_attempts=0)


def test_config_from_environment_and_bad_values() -> None:
    cfg = AppConfig()
    cfg.load_env({"ONCELY_COMMIT_INTERVAL": "0.05", "ONCELY_NET_EFFECTS": "false", "ONCELY_MAX_BATCH": "10"})
    assert cfg.commit_interval == 0.05 and cfg.net_effects is False and cfg.max_batch == 10
    cfg.load_env({"ONCELY_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "ONCELY_KAFKA_AUTO_OFFSET_RESET": "latest",
                  "ONCELY_KAFKA_BOOTSTRAP": "h:1"})
    assert cfg.kafka == {"security.protocol": "SASL_SSL", "auto.offset.reset": "latest"}
    assert cfg.bootstrap == "h:1"
    with pytest.raises(ConfigError, match="ONCELY_MAX_BATCH='ten' is not a valid int"):
        AppConfig().load_env({"ONCELY_MAX_BATCH": "ten"})


def test_app_declaration_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="valid Kafka topic prefix"):
        oncely.App("bad name")
    app = oncely.App("decl", partitions=2)
    svc = app.keyed("counter")
    with pytest.raises(ConfigError, match="must be an `async def`"):
        svc.handler(lambda ctx: None)

    @svc.handler
    async def add(ctx: KeyedContext, n: int) -> None: ...

    assert svc.add is add and add.takes_input
    with pytest.raises(ConfigError, match="already has a handler"):
        svc.handler(name="add")(add.fn)
    with pytest.raises(ConfigError, match="already has a service"):
        app.service("counter")


def test_key_spaces_sort_for_range_scans() -> None:
    sk = keys.service_key("svc", b"k")
    assert keys.inbox(sk, 2) < keys.inbox(sk, 10) < keys.inbox(sk, 2**40)
    assert keys.timer(5, b"i" * 16, 0) < keys.timer(6, b"a" * 16, 0)
    assert keys.split_service_key(sk) == ("svc", b"k")
    assert keys.expiry(100, keys.DEDUP, b"i" * 16) < keys.expiry_upper(100)


def test_cluster_ids_never_look_like_options() -> None:
    from oncely.local_kafka import new_cluster_id

    ids = [new_cluster_id() for _ in range(2000)]
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


def test_a_topic_is_readable_right_after_it_is_created(kafka: str) -> None:
    """No leader yet is a transient error (librdkafka does not flag it
    retriable); the restore and read_to_end must wait it out, not crash."""
    from confluent_kafka.admin import AdminClient, NewTopic

    from oncely.kafka_io import read_to_end, unique_name

    admin = AdminClient({"bootstrap.servers": kafka})
    for _ in range(10):
        name = unique_name("fresh")
        admin.create_topics([NewTopic(name, 8, 1)])[name].result(30)
        assert read_to_end(kafka, name) == []


def test_scan_merges_overlay_and_rocksdb_in_order_up_to_a_limit(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "s", "app", 4, 1)
    store.open()
    for k in (b"t1", b"t3", b"t5", b"t7"):
        store.put(k, k)
    store.commit(1)
    store.delete(b"t3")          # hidden by the overlay
    store.put(b"t4", b"new")     # only in the overlay
    store.put(b"t5", b"changed")
    store.put(b"u0", b"other")   # outside the prefix
    assert store.scan(b"t") == [(b"t1", b"t1"), (b"t4", b"new"), (b"t5", b"changed"), (b"t7", b"t7")]
    assert store.scan(b"t", limit=2) == [(b"t1", b"t1"), (b"t4", b"new")]
    assert store.scan(b"t", limit=3)[-1] == (b"t5", b"changed")
    assert store.scan(b"t", b"t5") == [(b"t1", b"t1"), (b"t4", b"new")]
    store.delete(b"t1")
    assert store.scan(b"t", limit=1) == [(b"t4", b"new")]
    store.close()


def test_awakeable_ids_round_trip_and_reject_garbage() -> None:
    inv = random_id()
    text = format_awakeable("shop-app.v2", 7, inv, 12)
    assert text.startswith("awk_") and text == text.lower()
    assert parse_awakeable(text) == ("shop-app.v2", 7, inv, 12)
    for bad in ("inv_abc", "awk_", "awk_!!!", text[:-4]):
        with pytest.raises(ValueError):
            parse_awakeable(bad)


def test_gather_settles_every_future_then_raises_the_first_failure_in_order() -> None:
    settled: list[str] = []

    async def ok(name: str, delay: float) -> str:
        await asyncio.sleep(delay)
        settled.append(name)
        return name

    async def fail(name: str, delay: float) -> str:
        await asyncio.sleep(delay)
        settled.append(name)
        raise TerminalError(name)

    async def main() -> None:
        assert await oncely.gather(ok("a", 0.02), ok("b", 0.01)) == ["a", "b"]
        settled.clear()
        with pytest.raises(TerminalError, match="second"):
            # "third" fails first in time, "second" first in argument order.
            await oncely.gather(ok("first", 0.0), fail("second", 0.03), fail("third", 0.01), ok("last", 0.05))
        assert sorted(settled) == ["first", "last", "second", "third"]

    asyncio.run(main())


def test_a_refused_send_or_call_leaves_the_journal_aligned() -> None:
    class Refusing:
        def target(self, target: object, args: tuple, call: bool) -> object:
            if call:
                raise TerminalError("calls its own key")
            raise TypeError("bad target")

    def run(journal: list[Entry]) -> JournalContext:
        call = _call(journal)
        call.effects = Refusing()
        ctx = KeyedJournalContext(call)
        with pytest.raises(TypeError):
            ctx.send("svc", "k", "h", 1)
        with pytest.raises(TerminalError):
            ctx.call("svc", "k", "h", 1)
        ctx.set("after", 1)
        return ctx

    journal: list[Entry] = []
    run(journal)
    assert [e.kind for e in journal] == ["set"]
    assert run(journal).diverged is None, "the replay of a handler that caught the errors diverged"


def test_every_setting_is_an_app_keyword_with_the_environment_as_fallback(monkeypatch) -> None:
    from dataclasses import fields

    monkeypatch.setenv("ONCELY_MAX_BATCH", "7")
    monkeypatch.setenv("ONCELY_SUSPEND_AFTER", "5")
    app = oncely.App("kw", create_sink_topics=True, suspend_after=2, commit_interval=1, kafka={"a.b": "c"})
    cfg = app.config
    assert (cfg.create_sink_topics, cfg.suspend_after, cfg.commit_interval, cfg.max_batch) == (True, 2.0, 1.0, 7)
    assert cfg.kafka == {"a.b": "c"}
    every = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    assert oncely.App("kw2", **every).config == cfg, "some AppConfig field is not an App keyword"
    with pytest.raises(ConfigError, match=r"App\('kw3'\) got an unknown setting 'colour'; the settings are: "
                                          r"bootstrap, commit_drain_share"):
        oncely.App("kw3", colour="blue")
    with pytest.raises(ConfigError, match=r"setting max_batch=True must be an int"):
        oncely.App("kw4", max_batch=True)


def test_a_usage_error_names_the_deepest_frame_outside_oncely() -> None:
    from oncely.errors import user_location

    ctx = context_for(_call([]), keyed=False)
    try:
        ctx.set("n", 1)  # THIS LINE
    except UsageError as e:
        where = user_location(e.__traceback__)
        assert isinstance(e, TerminalError) and isinstance(e, TypeError)
    line = next(i for i, t in enumerate(Path(__file__).read_text().splitlines(), 1) if "# THIS LINE" in t)
    assert where == f"{__file__}:{line}"


def test_python_dash_m_oncely_is_the_command_and_the_version_is_declared_once() -> None:
    import subprocess
    import sys
    from importlib.metadata import version

    done = subprocess.run([sys.executable, "-m", "oncely", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: oncely ") and "run" in done.stdout
    shown = subprocess.run([sys.executable, "-m", "oncely", "--version"], capture_output=True, text=True, timeout=60)
    assert oncely.__version__ in shown.stdout, shown
    assert version("oncely") == oncely.__version__, "pyproject.toml reads the version from oncely.__version__"


def test_txn_producer_fast_path_counts_records_and_poisons_the_owner_of_one_that_cannot_be_produced() -> None:
    """The positional produce path (no broker needed: records wait in
    librdkafka's queue): every record added is counted, a record refused at
    once (too large for the client) is not, poisons the transaction and names
    its owner; owned records are tracked only while `careful` (after a failed
    transaction); unowned changelog records go in through produce_all."""
    import threading

    from confluent_kafka import Producer

    from oncely.processor.producer import TxnProducer

    txn = TxnProducer({}, 1.0, 1.0, threading.Event())
    txn._producer = Producer({"bootstrap.servers": "127.0.0.1:1", "log_level": 0})
    try:
        txn.produce("out", b"k", b"v")
        txn.produce("out", b"k", b"v", headers=[("h", b"x")], partition=1)
        txn.produce("out", b"k", b"v", owner=b"inv-1")
        txn.produce_all("changelog", 0, {b"a": b"1", b"b": None}.items(), lambda err, msg: None)
        assert txn.txn.produced == 5 and txn.txn.error is None
        assert not txn.txn.unacked, "owned records are attributed only after a failed transaction"
        txn.careful = 1
        txn.produce("out", b"k", b"v", owner=b"inv-1")
        assert txn.txn.produced == 6
        assert list(txn.txn.unacked.values()) == [(b"inv-1", "out")]
        txn.careful = 0  # refused at once: named also when not attributing
        txn.produce("out", b"k", b"x" * 2_000_000, owner=b"inv-2")
        assert txn.txn.produced == 6
        assert txn.txn.error is not None
        assert [owner for owner, _ in txn.txn.faults] == [b"inv-2"]
    finally:
        txn._producer.purge()
        txn._producer = None


def test_the_transactional_producer_retries_a_commit_behind_its_predecessor_quickly(tmp_path: Path) -> None:
    """A commit right after another finds it still completing: AddOffsetsToTxn
    is answered CONCURRENT_TRANSACTIONS and retried after retry.backoff.ms,
    doubling up to retry.backoff.max.ms (librdkafka's 100 ms / 1 s made the
    p99 tail; design.md "Where a record's latency goes"). A user's setting wins."""
    from oncely.processor.clients import KafkaClients

    app = oncely.App("units-backoff", partitions=1, bootstrap="127.0.0.1:1")
    conf = KafkaClients(app, app.config, tmp_path).producer_conf("tid")
    assert (conf["retry.backoff.ms"], conf["retry.backoff.max.ms"]) == (1, 100)
    # A user's backoff is not capped by ours (librdkafka would apply the max).
    mine = oncely.App("units-backoff", partitions=1, bootstrap="127.0.0.1:1", kafka={"retry.backoff.ms": 500})
    conf = KafkaClients(mine, mine.config, tmp_path).producer_conf("tid")
    assert conf["retry.backoff.ms"] == 500 and "retry.backoff.max.ms" not in conf


def test_a_users_producer_tuning_wins_but_not_what_exactly_once_rests_on(tmp_path: Path) -> None:
    """linger.ms, compression and queue sizes are defaults a user may change
    (compression.type=none on a local broker); the transactional settings
    are always oncely's."""
    from oncely.processor.clients import KafkaClients

    app = oncely.App("units-tuning", partitions=1, bootstrap="127.0.0.1:1")
    conf = KafkaClients(app, app.config, tmp_path).producer_conf("tid")
    assert (conf["compression.type"], conf["linger.ms"]) == ("lz4", 5)
    mine = oncely.App("units-tuning", partitions=1, bootstrap="127.0.0.1:1",
                      kafka={"compression.type": "zstd", "linger.ms": 20, "message.timeout.ms": 5})
    conf = KafkaClients(mine, mine.config, tmp_path).producer_conf("tid")
    assert (conf["compression.type"], conf["linger.ms"]) == ("zstd", 20)
    assert conf["transactional.id"] == "tid" and conf["enable.idempotence"] is True
    assert conf["message.timeout.ms"] == mine.config.transaction_timeout_ms


@pytest.mark.parametrize("name,value", [("message.timeout.ms", 5), ("delivery.timeout.ms", 5),
                                        ("partitioner", "consistent")])
def test_the_producers_delivery_bound_and_partitioner_are_refused_not_overridden(name: str, value: Any) -> None:
    """oncely sets them itself (the delivery bound is the transaction's; keyed
    records land where Java clients put them): a user's value would be
    silently ignored, so the start refuses it, before anything is created."""
    from oncely.errors import ConfigError
    from oncely.preflight import check_app_settings

    app = oncely.App("units-reserved", partitions=1, bootstrap="127.0.0.1:1", kafka={name: value})
    with pytest.raises(ConfigError, match=f"Kafka setting {name} .* is set by oncely itself: remove it"):
        check_app_settings(app)


def test_handler_call_fields_are_in_the_order_the_partition_builds_them() -> None:
    """PartitionProcessor.start builds HandlerCall positionally (the hot
    path): a field added anywhere but last would shift every argument after
    it into the wrong field, silently."""
    import dataclasses

    assert [f.name for f in dataclasses.fields(HandlerCall)] == [
        "invocation_id", "service", "handler", "key", "payload", "payload_format", "attempt", "journal", "state",
        "source", "subscription", "effects", "limits", "traceparent", "created_at_ms", "deployment", "input"]
    # sdk.runner builds a completed Outcome positionally too.
    from oncely.sdk.protocol import Outcome

    assert [f.name for f in dataclasses.fields(Outcome)] == [
        "status", "value", "error", "state", "cleared_all", "emits"]


def test_an_invocation_sets_every_field_it_declares() -> None:
    """Invocation's __init__ is written out (the hot path makes one per
    record): a field declared but not set there would be missing, not
    defaulted, until something reads it."""
    import dataclasses

    from oncely.processor.invocation import Invocation

    inv = Invocation(b"\x01" * 16, {}, None, 0)
    for f in dataclasses.fields(Invocation):
        value = getattr(inv, f.name)  # AttributeError: not set
        if f.default is not dataclasses.MISSING:
            assert value == f.default, f.name
        elif f.default_factory is not dataclasses.MISSING:
            assert value == f.default_factory() and value is not getattr(Invocation(b"", {}, None, 0), f.name), f.name
