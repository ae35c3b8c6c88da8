"""Calls between keys, gather, awakeables and suspension, in one process
(the crash tests are in test_shuffle_crashes.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

import oncely
from oncely.shuffle.ids import format_awakeable, parse_awakeable, parse_id
from oncely.shuffle.routing import partition_for
from oncely import schemas
from oncely.testing import produce, read_to_end, unique_name
from support import InProcessProcessor, changelog_state, wait_until


def _calls_app(kafka: str, tmp_path: Path, **config: str) -> tuple[oncely.App, dict]:
    name = unique_name("calls")
    app = oncely.App(name, partitions=4, bootstrap=kafka, state_dir=str(tmp_path))
    for k, v in config.items():
        setattr(app.config, k, v)
    counter = app.keyed("counter")
    front = app.keyed("front")
    seen: dict = {"awk": {}, "errors": []}

    @counter.handler
    async def add(ctx: oncely.Context, amount: int) -> int:
        if amount < 0:
            raise oncely.TerminalError(f"negative amount {amount}")
        total = ctx.get("n", 0) + amount
        ctx.set("n", total)
        return total

    @front.handler
    async def fan(ctx: oncely.Context, keys: list) -> int:
        results = await oncely.gather(*(ctx.call(add, k, 1) for k in keys))
        ctx.set("sum", sum(results))
        return sum(results)

    @front.handler
    async def fan_with_failure(ctx: oncely.Context, amounts: list) -> None:
        futures = [ctx.call(add, f"f{i}", a) for i, a in enumerate(amounts)]
        try:
            await oncely.gather(*futures)
        except oncely.TerminalError as e:
            ctx.set("error", e.message)
            ctx.set("settled", [f.done for f in futures])

    @front.handler
    async def self_call(ctx: oncely.Context) -> None:
        await ctx.call(fan, ctx.key, [])

    @front.handler
    async def wait_for(ctx: oncely.Context) -> None:
        awk_id, fut = ctx.awakeable()
        seen["awk"][ctx.key] = awk_id
        try:
            ctx.set("got", await fut)
        except oncely.TerminalError as e:
            ctx.set("rejected", e.message)

    return app, seen


def _state(kafka: str, app: oncely.App) -> dict:
    return changelog_state(kafka, app.name)


def test_call_returns_callee_result_and_gather_sums_across_partitions(kafka: str, tmp_path: Path) -> None:
    app, _ = _calls_app(kafka, tmp_path)
    keys = [f"k{i}" for i in range(40)]  # spread over all 4 partitions
    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=app.name)
        client.send("front", "a", "fan", keys)
        client.flush()
        wait_until(lambda: _state(kafka, app).get(("front", b"a", "sum")) == 40, 60, 0.3, "first gather")
        client.send("front", "a", "fan", keys)
        client.flush()
        wait_until(lambda: _state(kafka, app).get(("front", b"a", "sum")) == 80, 60, 0.3, "second gather")
    finally:
        runner.stop()
    state = _state(kafka, app)
    assert {k for (s, k, n) in state if s == "counter"} == {k.encode() for k in keys}
    assert all(v == 2 for (s, k, n), v in state.items() if s == "counter")
    assert read_to_end(kafka, f"{app.name}.dlq") == []


def test_gather_raises_the_first_failure_after_all_settle(kafka: str, tmp_path: Path) -> None:
    app, _ = _calls_app(kafka, tmp_path)
    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=app.name)
        client.send("front", "x", "fan_with_failure", [1, -2, 3, -4])
        client.flush()
        wait_until(lambda: ("front", b"x", "error") in _state(kafka, app), 60, 0.3, "the failure")
    finally:
        runner.stop()
    state = _state(kafka, app)
    assert state[("front", b"x", "error")] == "negative amount -2"
    assert state[("front", b"x", "settled")] == [True, True, True, True]
    # The successful callees ran exactly once; the failed ones left no state.
    assert state[("counter", b"f0", "n")] == 1 and state[("counter", b"f2", "n")] == 3
    assert ("counter", b"f1", "n") not in state and ("counter", b"f3", "n") not in state
    dead = read_to_end(kafka, f"{app.name}.dlq")
    assert sorted(d.header("oncely.reason") for d in dead) == [b"terminal", b"terminal"]


def test_a_keyed_handler_calling_its_own_key_fails_with_a_clear_error(kafka: str, tmp_path: Path) -> None:
    app, _ = _calls_app(kafka, tmp_path)
    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=app.name)
        client.send("front", "me", "self_call", None)
        client.flush()
        dead = wait_until(lambda: read_to_end(kafka, f"{app.name}.dlq"), 30, 0.3, "the dead letter")
    finally:
        runner.stop()
    assert dead[0].header("oncely.reason") == b"terminal"
    assert b"calls its own key" in dead[0].header("oncely.error")


def test_awakeables_resolve_reject_and_refuse_a_second_completion(kafka: str, tmp_path: Path) -> None:
    # Suspend after 0.5 s idle: the resolutions below reach suspended invocations.
    app, seen = _calls_app(kafka, tmp_path, suspend_after=0.5)
    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=app.name)
        for k in ("r1", "r2", "r3"):
            client.send("front", k, "wait_for", None)
        client.flush()
        wait_until(lambda: len(seen["awk"]) == 3, 30, 0.1, "three awakeables")
        cl = runner.processor
        wait_until(lambda: runner.on_loop(lambda: sum(p.suspended for p in cl.partitions.values())) == 3, 30, 0.1,
                   "suspension")
        assert runner.on_loop(lambda: sum(len(p.invocations) for p in cl.partitions.values())) == 0
        resolver = oncely.Client(kafka)
        resolver.resolve_awakeable(seen["awk"]["r1"], {"v": 1})
        resolver.reject_awakeable(seen["awk"]["r2"], "no stock")
        with pytest.raises(oncely.AwakeableError, match="already completed|not in flight"):
            resolver.resolve_awakeable(seen["awk"]["r1"], {"v": 2})
        with pytest.raises(oncely.AwakeableError, match="malformed|does not start"):
            resolver.resolve_awakeable("awk_nonsense", 1)
        wait_until(lambda: ("front", b"r2", "rejected") in _state(kafka, app), 30, 0.3, "the rejection")
        resolver.resolve_awakeable(seen["awk"]["r3"], b"raw")
        wait_until(lambda: ("front", b"r3", "got") in _state(kafka, app), 30, 0.3, "r3")
        with pytest.raises(oncely.AwakeableError, match="not in flight"):
            resolver.resolve_awakeable(seen["awk"]["r3"], 3)
        resolver.close()
    finally:
        runner.stop()
    state = _state(kafka, app)
    assert state[("front", b"r1", "got")] == {"v": 1}
    assert state[("front", b"r2", "rejected")] == "no stock"
    assert state[("front", b"r3", "got")] == b"raw"
    assert read_to_end(kafka, f"{app.name}.dlq") == []


def test_a_backlog_of_callers_does_not_deadlock_on_backpressure(kafka: str, tmp_path: Path) -> None:
    # Callers waiting on calls fill the in-flight limit; their Responses and
    # their callees' Invokes arrive on partitions paused by it.
    name = unique_name("backlog")
    app = oncely.App(name, partitions=4, bootstrap=kafka, state_dir=str(tmp_path))
    app.config.max_inflight_per_partition = 20
    callee, caller = app.keyed("callee"), app.keyed("caller")

    @callee.handler
    async def echo(ctx: oncely.Context, n: int) -> int:
        return n

    @caller.handler
    async def ask(ctx: oncely.Context, n: int) -> None:
        ctx.set("got", await ctx.call(echo, f"e{n}", n))

    InProcessProcessor(app).start().stop()  # creates the topics
    client = oncely.Client(kafka, app=name)
    for n in range(1000):
        client.send(ask, f"c{n}", n)
    client.flush()
    runner = InProcessProcessor(app).start()
    try:
        wait_until(lambda: sum(1 for (s, _, n) in _state(kafka, app) if s == "caller") == 1000, 120, 1.0,
                   "every caller to get its answer")
    finally:
        runner.stop()
    state = _state(kafka, app)
    assert all(state[("caller", f"c{n}".encode(), "got")] == n for n in range(1000))


def test_a_resolution_that_arrives_before_its_awakeable_is_kept_for_it(kafka: str, tmp_path: Path) -> None:
    # The id is deterministic (app, partition, invocation, journal index), so
    # it can go out (say, through a ctx.run effect replayed after a crash)
    # before the invocation journals the awakeable.
    name = unique_name("early")
    app = oncely.App(name, partitions=4, bootstrap=kafka, state_dir=str(tmp_path))
    svc = app.keyed("svc")
    gate = threading.Event()

    async def until_gate() -> None:
        while not gate.is_set():
            await asyncio.sleep(0.02)

    @svc.handler
    async def late(ctx: oncely.Context) -> None:
        await ctx.run("gate", until_gate)   # journal index 0
        _, fut = ctx.awakeable()            # journal index 1
        ctx.set("got", await fut)

    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=name)
        inv = client.send(late, "k", None)
        client.flush()
        awk = format_awakeable(name, partition_for(b"k", 4), parse_id(inv), 1)
        wait_until(lambda: runner.on_loop(lambda: any(p.invocations for p in runner.processor.partitions.values())),
                   30, 0.05, "the start")
        client.resolve_awakeable(awk, "early")
        with pytest.raises(oncely.AwakeableError, match="already completed"):
            client.resolve_awakeable(awk, "twice")
        gate.set()
        wait_until(lambda: _state(kafka, app).get(("svc", b"k", "got")) == "early", 30, 0.3, "the early value")
        client.close()
    finally:
        gate.set()
        runner.stop()


def test_a_duplicate_delivery_of_a_call_is_recognised_and_answered_again(kafka: str, tmp_path: Path) -> None:
    # Duplicates cannot arise from the processor (an Invoke and its journal
    # entry share a transaction); a copy produced by hand stands in for one.
    app, _ = _calls_app(kafka, tmp_path)
    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=app.name)
        client.send("front", "d", "fan", ["dup"])
        client.flush()
        wait_until(lambda: _state(kafka, app).get(("front", b"d", "sum")) == 1, 60, 0.3, "the call")
        calls = [r for r in read_to_end(kafka, f"{app.name}.log")
                 if (b := schemas.decode("log_record", r.value)["body"])[0] == "oncely.Invoke" and b[1]["caller"]]
        assert len(calls) == 1
        copy = calls[0]
        produce(kafka, f"{app.name}.log", [(copy.key, copy.value)], partition=copy.partition)

        def responses() -> int:
            return sum(1 for r in read_to_end(kafka, f"{app.name}.log")
                       if schemas.decode("log_record", r.value)["body"][0] == "oncely.Response")

        wait_until(lambda: responses() == 2, 30, 0.3, "the callee to answer the copy again")
        time.sleep(0.5)
        dups = runner.on_loop(lambda: sum(p.stats.duplicates for p in runner.processor.partitions.values()))
    finally:
        runner.stop()
    assert dups == 1
    state = _state(kafka, app)
    assert state[("counter", b"dup", "n")] == 1, "the duplicate ran the callee again"
    assert state[("front", b"d", "sum")] == 1


def test_an_invocation_woken_but_not_yet_run_is_not_suspended(kafka: str, tmp_path: Path) -> None:
    # Completion and suspension in one loop iteration: dropping the
    # coroutine then would lose the wake-up, and nothing would resume it.
    app, seen = _calls_app(kafka, tmp_path)
    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=app.name)
        client.send("front", "w", "wait_for", None)
        client.flush()
        wait_until(lambda: "w" in seen["awk"], 30, 0.05, "the awakeable")
        _, p, inv_id, index = parse_awakeable(seen["awk"]["w"])
        part = runner.processor.partitions[p]
        wait_until(lambda: runner.on_loop(lambda: inv_id in part.invocations and part.invocations[inv_id].waiting),
                   30, 0.05,
                   "the wait")
        done = threading.Event()

        def complete_then_suspend() -> None:
            part.on_awakeable_result({"invocation_id": inv_id, "journal_index": index, "value": b"j42",
                                      "failure": None, "request_id": None})
            part.suspend_waiting()
            done.set()

        runner.loop.call_soon_threadsafe(complete_then_suspend)
        assert done.wait(10)
        wait_until(lambda: _state(kafka, app).get(("front", b"w", "got")) == 42, 30, 0.3, "the woken invocation")
        assert part.suspended == 0
    finally:
        runner.stop()
