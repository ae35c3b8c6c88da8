"""The first step in place (processor/first_step.py): every way a local
start can end, on a real partition processor over a real RocksDB store
(no broker: nothing here is about Kafka; the local-start and kill tests run
the same lane on the broker).

A subscribed record is routed and started the way the commit loop does it
(`dispatch.source_record` with a caught-up `LocalStarts`); records produced
go to a list standing in for the open transaction."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

import oncely
from oncely import schemas
from oncely.driver import _Message
from oncely.egress.sinks import Sinks
from oncely.processor import dispatch, keys
from oncely.processor.executor import LocalExecutor
from oncely.processor.invocation import BACKING_OFF
from oncely.processor.local_start import LocalStarts
from oncely.processor.partition import PartitionProcessor
from oncely.processor.store import PartitionStore
from oncely.sdk.protocol import decode_value

SOURCE = "orders"
OUT = "enriched"


class _Record(_Message):
    __slots__ = ()

    def headers(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)

    def error(self) -> None:
        return None


class _Txn:
    """The open transaction, as partitions see it: a list of records."""

    metrics = None

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes | None, int | None]] = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Any = None,
                partition: int | None = None, owner: bytes | None = None) -> None:
        self.records.append((topic, key, value, partition))

    def fault(self, inv_id: bytes, why: str) -> None:
        raise AssertionError(f"fault: {why}")

    def to(self, topic: str) -> list[tuple[bytes | None, bytes | None]]:
        return [(k, v) for t, k, v, _ in self.records if t == topic]


def _app(gate: asyncio.Event | None = None) -> oncely.App:
    app = oncely.App("first-step", partitions=1)
    svc = app.keyed("customers")
    app.sink(OUT)

    @svc.handler
    async def total(ctx: oncely.KeyedContext, order: dict) -> Any:
        if order.get("fail") and ctx.attempt == 0:
            raise RuntimeError("the first attempt fails")
        if order.get("terminal"):
            raise oncely.TerminalError("refused")
        if order.get("clear"):
            ctx.clear_all()
        if "note" in order:
            ctx.set("note", order["note"])
        if order.get("leave_wait"):  # begins a wait and returns without ending it
            next(ctx.sleep(1).__await__())
        if "send_to" in order:  # effects during a first step that is not registered yet
            ctx.send("customers", order["send_to"], "total", {"amount": 10})
            ctx.sleep(60)  # (a durable timer, not awaited)
        if order.get("wait"):
            assert gate is not None
            await gate.wait()
        running = ctx.get("total", 0) + order["amount"]
        ctx.set("total", running)
        ctx.emit(OUT, {"total": running}, key=ctx.key)
        if order.get("bad_return"):
            return {1, 2}  # not JSON
        return order.get("returns")

    app.subscribe(SOURCE, total)
    return app


class _Engine:
    def __init__(self, tmp: Path, app: oncely.App) -> None:
        self.app = app
        self.sub = app.subscriptions[0]
        self.txn = _Txn()
        store = PartitionStore(tmp / "0", app.name, 1, 0)
        store.open()
        self.part = PartitionProcessor(app, 0, store, LocalExecutor(app), self.txn, True,
                                       sinks=Sinks(app.sinks, lambda topic: True))
        self.part.load()
        self.local = LocalStarts({0: self.part})
        self.offset = 0

    def catch_up(self) -> None:
        class _Routed:
            partition = 0

        self.local.start(_Routed(), self.txn)  # type: ignore[arg-type]  (produces the marker)
        self.local.on_mark(self.part, {"epoch": self.local.epoch, "token": self.local.token})
        assert self.local.caught_up(0)
        self.txn.records.clear()

    def feed(self, key: str, **order: Any) -> None:
        body = {"amount": 1, **order}
        m = _Record(SOURCE, 0, self.offset, key.encode(), orjson.dumps(body))
        self.offset += 1
        dispatch.source_record(self.app, self.sub, m, self.txn, self.local)

    def total(self, key: str) -> Any:
        raw = self.part.store.get(keys.state(keys.service_key("customers", key.encode()), "total"))
        return None if raw is None else decode_value(raw)

    def outputs(self) -> list[int]:
        return [orjson.loads(v)["total"] for _, v in self.txn.to(OUT)]


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    async def make() -> _Engine:
        e = _Engine(tmp_path, _app())
        e.catch_up()
        return e

    loop = asyncio.new_event_loop()
    e = loop.run_until_complete(make())
    yield e, loop
    loop.run_until_complete(e.part.executor.close())
    e.part.close()
    e.part.store.close()
    loop.close()


def _run(loop: asyncio.AbstractEventLoop, fn: Any) -> Any:
    async def body() -> Any:
        return fn()
    return loop.run_until_complete(body())


def test_a_handler_that_returns_owing_nothing_ends_within_its_start(engine: Any) -> None:
    e, loop = engine
    _run(loop, lambda: [e.feed("alice"), e.feed("bob"), e.feed("alice")])
    # Ended in place: nothing in memory, no key held, no task.
    assert e.part.stats.local_starts == 3 and e.part.stats.completed == 3
    assert not e.part.invocations and not e.part.keys.held and not e.part.active
    assert e.total("alice") == 2 and e.total("bob") == 1
    assert e.outputs() == [1, 1, 2]
    assert [k for k, _ in e.txn.to(OUT)] == [b"alice", b"bob", b"alice"]
    assert not e.part.writer.dirty


def test_a_first_step_that_ends_in_place_sends_and_sets_timers_before_it_is_registered(engine: Any) -> None:
    """A new invocation joins `invocations` and holds its key only when its
    first step does not end in place (PartitionProcessor.start); its effects
    during the step (a send, a timer) are still its own, not refused as a
    rewound invocation's."""
    e, loop = engine
    _run(loop, lambda: e.feed("alice", send_to="bob"))
    assert e.part.stats.completed == 1 and e.part.stats.failed == 0 and e.outputs() == [1]
    assert not e.part.invocations and not e.part.keys.held and not e.part.active
    (key, value), = e.txn.to(e.app.log_topic)  # the send's Invoke, in the open transaction
    kind, body = schemas.decode("log_record", value)["body"]
    assert kind == "oncely.Invoke" and body["key"] == b"bob" and body["caller"] is None
    assert e.part.timers.next_timer is not None  # (stored: `Timers.add`)
    assert len(e.part.store.scan(keys.TIMER)) == 1


def test_a_return_value_or_cleared_state_goes_through_the_runner(engine: Any) -> None:
    e, loop = engine
    _run(loop, lambda: [e.feed("alice", note="x"), e.feed("alice", returns={"ok": 1}), e.feed("alice", clear=True)])
    assert e.part.stats.completed == 3 and not e.part.invocations and not e.part.keys.held
    assert e.outputs() == [1, 2, 1]  # cleared before the third added its amount
    assert e.total("alice") == 1
    note = keys.state(keys.service_key("customers", b"alice"), "note")
    assert e.part.store.get(note) is None  # cleared, not only overwritten

    _run(loop, lambda: e.feed("bob", bad_return=True))  # not JSON: a terminal failure, as anywhere
    assert e.part.stats.failed == 1
    dead = e.txn.to(e.app.dlq_topic)
    assert len(dead) == 1 and e.total("bob") is None and not e.part.keys.held


def test_a_first_step_that_raises_backs_off_holding_its_key(engine: Any) -> None:
    e, loop = engine
    _run(loop, lambda: [e.feed("alice", fail=True), e.feed("alice")])
    inv = next(iter(e.part.invocations.values()))
    assert inv.phase == BACKING_OFF and inv.attempt == 1
    assert e.part.keys.holds(inv)
    assert e.part.stats.completed == 0 and e.total("alice") is None and e.outputs() == []
    # The retry (a decoded input is used once: it decodes the payload again) and then the record behind it.
    _run(loop, lambda: e.part.fire_timers(inv.retry_at_ms))
    loop.run_until_complete(asyncio.sleep(0))
    assert e.part.stats.completed == 2 and e.part.stats.retries == 1
    assert e.outputs() == [1, 2] and e.total("alice") == 2
    assert not e.part.invocations and not e.part.keys.held


def test_a_terminal_error_dead_letters_and_frees_the_key(engine: Any) -> None:
    e, loop = engine
    _run(loop, lambda: [e.feed("alice", terminal=True), e.feed("alice")])
    assert e.part.stats.failed == 1 and e.part.stats.completed == 1
    (key, value), = e.txn.to(e.app.dlq_topic)
    assert e.outputs() == [1] and not e.part.keys.held
    status = e.part.store.get(keys.failed(e.part.poison_failed[0])) if e.part.poison_failed else None
    assert status is None  # (not a poisoned invocation)


def test_a_first_step_that_awaits_is_adopted_and_the_key_waits_for_it(tmp_path: Path) -> None:
    async def body() -> None:
        gate = asyncio.Event()
        e = _Engine(tmp_path, _app(gate))
        e.catch_up()
        e.feed("alice", wait=True)
        e.feed("alice")  # behind the holder, in memory
        e.feed("bob")
        (inv,) = e.part.invocations.values()
        assert e.part.keys.holds(inv) and inv in e.part.active and e.part.writer.dirty
        assert e.part.local_waits.n == 1 and e.outputs() == [1]  # bob ended in place
        gate.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert e.part.stats.completed == 3 and not e.part.invocations and not e.part.keys.held
        assert e.outputs() == [1, 1, 2] and e.total("alice") == 2
        await e.part.executor.close()
        e.part.close()
        e.part.store.close()

    asyncio.run(body())


def test_records_waiting_behind_an_adopted_holder_all_go_on_when_it_ends(tmp_path: Path) -> None:
    """The next waiting record of a key starts when its holder ends (one at
    a time): one that ends in place, never registered, still hands the key
    on to the record behind it, instead of leaving it for the commit's flush
    to the log."""
    async def body() -> None:
        gate = asyncio.Event()
        e = _Engine(tmp_path, _app(gate))
        e.catch_up()
        e.feed("alice", wait=True)
        e.feed("alice")
        e.feed("alice")
        e.feed("alice")
        assert e.part.local_waits.n == 3
        gate.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert e.part.local_waits.n == 0 and e.part.stats.completed == 4
        assert e.outputs() == [1, 2, 3, 4] and not e.txn.to(e.app.log_topic)
        await e.part.executor.close()
        e.part.close()
        e.part.store.close()

    asyncio.run(body())


def test_waits_a_first_step_began_go_when_it_ends_in_place(engine: Any) -> None:
    e, loop = engine
    _run(loop, lambda: e.feed("alice", leave_wait=True))
    assert e.part.stats.completed == 1 and not e.part.invocations
    assert not e.part.waits.futures


def test_the_journal_of_an_adopted_first_step_is_what_it_did(tmp_path: Path) -> None:
    """What a first step journaled before its await is there when a commit
    persists the invocation (the same journal as the general path's)."""
    async def body() -> None:
        gate = asyncio.Event()
        e = _Engine(tmp_path, _app(gate))
        e.catch_up()
        e.feed("alice", clear=True, wait=True)
        (inv,) = e.part.invocations.values()
        assert [(x.kind, x.name) for x in inv.journal] == [("clear_all", "")]
        e.part.prepare_commit()
        status = e.part.store.get(keys.status(inv.id))
        assert status is not None and schemas.decode("invocation_status", status)["phase"] == "RUNNING"
        gate.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert e.part.stats.completed == 1 and [(x.kind, x.name) for x in inv.journal] == [
            ("clear_all", ""), ("get", "total"), ("set", "total"), ("emit", OUT)]
        # Result-less steps share one entry per kind and name (sdk/journal.py): complete, and unchanged.
        from oncely.sdk import journal

        assert inv.journal[1] is journal._SHARED[("get", "total")]
        assert all(x.completed and x.value is None and x.error is None and x.partition is None
                   for x in journal._SHARED.values())
        await e.part.executor.close()
        e.part.close()
        e.part.store.close()

    asyncio.run(body())


def test_a_retry_of_a_service_the_app_no_longer_has_fails_it(engine: Any) -> None:
    """(A deploy removed the service while an invocation backed off: the
    runner fails it terminally, and the partition goes on.)"""
    e, loop = engine
    _run(loop, lambda: e.feed("alice", fail=True))
    inv = next(iter(e.part.invocations.values()))
    del e.app.services["customers"]
    _run(loop, lambda: e.part.fire_timers(inv.retry_at_ms))
    assert e.part.stats.failed == 1 and not e.part.invocations and not e.part.keys.held
    (key, value), = e.txn.to(e.app.dlq_topic)
    assert key == b"alice"


def test_an_invoke_read_from_the_log_runs_in_place_too(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An Invoke read from the log (a send, a record routed on another
    process, a retry) carries its input encoded: the lane decodes it and
    runs the first step in place; one that does not decode takes the general
    path, which ends it with the reason."""
    from oncely.ingest.router import Routed, route
    from oncely.processor import executor
    from oncely.shuffle.envelope import DECODED, encode_invoke

    e, loop = engine

    def as_read(key: str, value: bytes, offset: int) -> dict[str, Any]:
        routed = route(e.app.name, 1, e.sub, _Record(SOURCE, 0, offset, key.encode(), value))
        assert isinstance(routed, Routed)
        kind, body = schemas.decode("log_record", encode_invoke(routed.invoke))["body"]
        assert kind == "oncely.Invoke" and DECODED not in body  # (the route's decoded value stays in memory)
        return body

    general = executor.run_handler
    monkeypatch.setattr(executor, "run_handler", lambda app, call: pytest.fail("took the general path"))
    _run(loop, lambda: [e.part.on_invoke(as_read("alice", b'{"amount": 2}', 0), 0),
                        e.part.on_invoke(as_read("alice", b'{"amount": 3}', 1), 1)])
    assert e.part.stats.completed == 2 and not e.part.invocations and e.total("alice") == 5
    assert e.outputs() == [2, 5]

    # The general path's own answer to an input that does not decode: terminal, dead-lettered.
    calls: list[str] = []
    monkeypatch.setattr(executor, "run_handler", lambda app, call: calls.append(call.handler) or general(app, call))
    bad = as_read("bob", b'{"amount": 1}', 2)
    bad["payload"] = b"not json"
    _run(loop, lambda: e.part.on_invoke(bad, 2))
    assert calls == ["total"] and e.part.stats.failed == 1 and e.total("bob") is None
