"""Calls between keys, gather, awakeables and suspension, in one process
(the crash tests are in test_shuffle_crashes.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import oncely
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
