"""Edge cases of the partition engine, on `oncely.testing.TestDriver` (real
RocksDB, no Kafka): each runs in well under a second. What Kafka does
(transactions, rebalances, restore) is tested against the broker elsewhere.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

import oncely
from oncely.processor import keys
from oncely.processor.invocation import SUSPENDED
from oncely.shuffle.ids import format_awakeable, parse_awakeable, parse_id
from oncely.shuffle.routing import partition_for
from oncely.testing import TestDriver


def _waiting_app(seen: dict[str, Any]) -> oncely.App:
    app = oncely.App("engine", partitions=4)
    app.config.suspend_after = 0.5
    keyed, free = app.keyed("keyed"), app.service("free")

    def started(name: str) -> str:
        seen["started"][name] += 1
        return name

    @keyed.handler
    async def wait(ctx: oncely.KeyedContext) -> None:
        await ctx.run("start", started, f"keyed/{ctx.key}")
        awk, fut = ctx.awakeable()
        seen["awk"][f"keyed/{ctx.key}"] = awk
        ctx.set("got", await fut)
        seen["done"][f"keyed/{ctx.key}"] += 1

    @free.handler
    async def wait_free(ctx: oncely.Context, name: str) -> None:
        await ctx.run("start", started, f"free/{name}")
        awk, fut = ctx.awakeable()
        seen["awk"][f"free/{name}"] = awk
        await fut
        seen["done"][f"free/{name}"] += 1

    return app


def test_a_duplicate_of_a_suspended_invocation_is_dropped_and_the_original_resumes() -> None:
    # A suspended invocation lives only in the store: a duplicate check that
    # looked at memory and finished ones missed it (a keyed duplicate queued
    # behind the original's lock for good; a stateless one ran again).
    seen: dict[str, Any] = {"started": Counter(), "awk": {}, "done": Counter()}
    app = _waiting_app(seen)
    with TestDriver(app) as d:
        k = d.send("keyed", "k1", "wait", None, idempotency_key="retry-me")
        f = d.send("free", None, "wait_free", "s1", idempotency_key="retry-me-too")
        d.advance(1)
        assert d.phase(k) == d.phase(f) == SUSPENDED
        d.send("keyed", "k1", "wait", None, idempotency_key="retry-me")
        d.send("free", None, "wait_free", "s1", idempotency_key="retry-me-too")
        d.run()
        assert sum(p.stats.duplicates for p in d.partitions) == 2
        for name in ("keyed/k1", "free/s1"):
            d.resolve_awakeable(seen["awk"][name], {"v": name})
        d.run()
        assert d.state("keyed", "k1") == {"got": {"v": "keyed/k1"}}
        d.send("keyed", "k1", "wait", None)  # the key is free again
        d.run()
    assert seen["started"] == Counter({"keyed/k1": 2, "free/s1": 1}), "a duplicate ran its handler again"
    assert seen["done"] == Counter({"keyed/k1": 1, "free/s1": 1})


def test_an_invocation_woken_but_not_yet_run_is_not_suspended() -> None:
    # Completion and suspension in one loop iteration: dropping the
    # coroutine then would lose the wake-up, and nothing would resume it.
    seen: dict[str, Any] = {"started": Counter(), "awk": {}, "done": Counter()}
    app = _waiting_app(seen)
    with TestDriver(app) as d:
        d.send("keyed", "w", "wait", None)
        d.run()
        _, p, inv_id, index = parse_awakeable(seen["awk"]["keyed/w"])
        part = d.partitions[p]
        assert part.invocations[inv_id].waiting

        async def complete_then_suspend() -> None:
            part.on_awakeable_result({"invocation_id": inv_id, "journal_index": index, "value": b"j42",
                                      "failure": None, "request_id": None})
            part.suspend_waiting()

        d.loop.run_until_complete(complete_then_suspend())
        assert part.suspended == 0
        d.run()
        assert d.state("keyed", "w") == {"got": 42}


def test_a_resolution_that_arrives_before_its_awakeable_is_kept_for_it() -> None:
    # Awakeable ids are deterministic (app, partition, invocation, index), so
    # one can be resolved before the invocation journals it.
    app = oncely.App("early", partitions=4)
    svc = app.keyed("svc")

    @svc.handler
    async def late(ctx: oncely.KeyedContext) -> None:
        await ctx.sleep(5)          # journal index 0
        _, fut = ctx.awakeable()    # journal index 1
        ctx.set("got", await fut)

    with TestDriver(app) as d:
        inv = d.send(late, "k", None)
        d.run()
        awk = format_awakeable("early", partition_for(b"k", 4), parse_id(inv), 1)
        d.resolve_awakeable(awk, "early")
        d.resolve_awakeable(awk, "twice")  # refused: already completed
        d.run()
        assert d.state("svc", "k") == {}
        d.advance(5)
        assert d.state("svc", "k") == {"got": "early"}
        assert d.phase(inv) == "COMPLETED"


def test_retries_back_off_then_dead_letter_when_exhausted() -> None:
    app = oncely.App("retries", partitions=2)
    svc = app.keyed("svc", retry=oncely.RetryPolicy(max_attempts=3, initial_interval=10, factor=2, max_interval=60))
    attempts: Counter = Counter()

    @svc.handler
    async def flaky(ctx: oncely.KeyedContext, fail_times: int) -> int:
        attempts[ctx.key] += 1
        if ctx.attempt < fail_times:
            raise RuntimeError(f"attempt {ctx.attempt}")
        ctx.set("ok", ctx.attempt)
        return ctx.attempt

    with TestDriver(app) as d:
        ok = d.send(flaky, "a", 2)
        doomed = d.send(flaky, "b", 9)
        d.run()
        assert d.phase(ok) == "BACKING_OFF" and attempts["a"] == 1
        d.advance(10)  # the first retry is due after 10 s
        assert attempts["a"] == 2 and d.phase(ok) == "BACKING_OFF"
        d.advance(20)  # the second after 20 s more
        assert d.result(ok) == 2 and d.state("svc", "a") == {"ok": 2}
        assert d.phase(doomed) == "FAILED" and attempts["b"] == 3
        [letter] = d.dead_letters()
        assert letter.header("oncely.reason") == b"retries-exhausted"


def test_a_dedup_entry_expires_after_its_retention() -> None:
    app = oncely.App("expiry", partitions=1)
    svc = app.keyed("svc")

    @svc.handler
    async def bump(ctx: oncely.KeyedContext) -> None:
        ctx.set("n", ctx.get("n", 0) + 1)

    with TestDriver(app) as d:
        inv = d.send(bump, "k", None, idempotency_key="once", idempotency_retention=60)
        d.run()
        d.send(bump, "k", None, idempotency_key="once", idempotency_retention=60)
        d.advance(30)
        assert d.state("svc", "k") == {"n": 1}, "a duplicate within the retention ran"
        d.advance(31)  # the sweep removes the entry past its retention
        assert d.partitions[0].lookup(parse_id(inv)) is None
        d.send(bump, "k", None, idempotency_key="once", idempotency_retention=60)
        d.run()
        assert d.state("svc", "k") == {"n": 2}


def test_the_inbox_keeps_log_order_per_key_across_a_crash() -> None:
    # More invocations than max_inflight and a busy key: they wait in the
    # store, start in log order, and a crash (uncommitted work lost) changes
    # neither the order nor how often each ran.
    app = oncely.App("inbox", partitions=2)
    app.config.max_inflight_per_partition = 3
    seq = app.keyed("seq")

    @seq.handler
    async def append(ctx: oncely.KeyedContext, item: int) -> None:
        await ctx.sleep(0.001 * (item % 3))
        ctx.set("items", ctx.get("items", []) + [item])

    with TestDriver(app) as d:
        for item in range(60):
            d.send(append, f"k{item % 4}", item)
        d.commit()
        d.loop.run_until_complete(d._astep())  # one step: some ran, the rest queued
        assert sum(p.stats.inboxed for p in d.partitions) > 0
        d.crash()
        d.advance(1)
        for k in range(4):
            assert d.state("seq", f"k{k}") == {"items": list(range(k, 60, 4))}
        assert all(not p.store.scan(keys.INBOX) and not p.store.scan(keys.READY) for p in d.partitions)


def test_a_backlog_of_callers_finishes_at_a_small_in_flight_limit() -> None:
    # Callers waiting on calls fill max_inflight; their callees queue behind
    # them: waiting callers are suspended to make room.
    app = oncely.App("backlog", partitions=2)
    app.config.max_inflight_per_partition = 4
    callee, caller = app.keyed("callee"), app.keyed("caller")

    @callee.handler
    async def echo(ctx: oncely.KeyedContext, n: int) -> int:
        return n

    @caller.handler
    async def ask(ctx: oncely.KeyedContext, n: int) -> None:
        ctx.set("got", await ctx.call(echo, f"e{n}", n))

    with TestDriver(app) as d:
        for n in range(200):
            d.send(ask, f"c{n}", n)
        d.run()
        assert all(d.state("caller", f"c{n}") == {"got": n} for n in range(200))
        assert sum(p.stats.pressure_suspensions for p in d.partitions) > 0


def test_a_crash_between_steps_resumes_by_replay_and_runs_each_step_once() -> None:
    app = oncely.App("replay", partitions=1)
    svc = app.keyed("svc")
    ran: Counter = Counter()

    def effect(name: str) -> str:
        ran[name] += 1
        return name

    @svc.handler
    async def steps(ctx: oncely.KeyedContext) -> str:
        a = await ctx.run("a", effect, "a")
        await ctx.sleep(10)
        b = await ctx.run("b", effect, "b")
        ctx.set("done", a + b)
        return a + b

    with TestDriver(app) as d:
        inv = d.send(steps, "k", None)
        d.run()
        assert [e.kind for e in d.journal(inv)] == ["run", "sleep"]
        d.crash()
        d.advance(10)
        assert d.result(inv) == "ab" and d.state("svc", "k") == {"done": "ab"}
    assert ran == Counter({"a": 1, "b": 1})


def test_a_changed_handler_is_paused_not_continued() -> None:
    app = oncely.App("changed", partitions=1)
    svc = app.keyed("svc")
    version = {"v": 1}

    @svc.handler
    async def flow(ctx: oncely.KeyedContext) -> None:
        await ctx.run("one" if version["v"] == 1 else "renamed", lambda: 1)
        await ctx.sleep(10)
        ctx.set("done", True)

    with TestDriver(app) as d:
        inv = d.send(flow, "k", None)
        d.run()
        version["v"] = 2
        d.crash()
        d.advance(10)
        assert d.phase(inv) == "PAUSED" and d.state("svc", "k") == {}


def test_always_replay_turns_non_determinism_into_a_failure() -> None:
    app = oncely.App("nondet", partitions=1)
    svc = app.keyed("svc")

    @svc.handler
    async def fine(ctx: oncely.KeyedContext) -> None:
        if ctx.random() < 2:  # journaled randomness replays the same
            ctx.set("n", await ctx.run("pick", lambda: random.randint(0, 9)))

    runs = Counter()

    @svc.handler
    async def flaky(ctx: oncely.KeyedContext) -> None:
        runs["flaky"] += 1  # process state, not journaled: a replay takes another path
        await ctx.run(f"step-{runs['flaky']}", lambda: 1)

    with TestDriver(app, always_replay=True) as d:
        d.send(fine, "a", None)
        d.run()
        assert "n" in d.state("svc", "a")
        d.send(flaky, "b", None)
        with pytest.raises(AssertionError, match="non-deterministic"):
            d.run()


def test_a_duplicate_of_a_queued_invocation_is_dropped() -> None:
    seen: dict[str, Any] = {"started": Counter(), "awk": {}, "done": Counter()}
    app = _waiting_app(seen)
    with TestDriver(app) as d:
        d.send("keyed", "k", "wait", None)  # holds the key until resolved
        d.run()
        queued = d.send("keyed", "k", "wait", None, idempotency_key="again")
        d.run()
        assert d.phase(queued) == "INBOXED"
        d.send("keyed", "k", "wait", None, idempotency_key="again")
        d.run()
        assert sum(p.stats.duplicates for p in d.partitions) == 1
        d.resolve_awakeable(seen["awk"]["keyed/k"], 1)
        d.run()
        assert d.phase(queued) == "RUNNING"
        d.resolve_awakeable(seen["awk"]["keyed/k"], 2)
        d.run()
        assert d.phase(queued) == "COMPLETED"
    assert seen["started"] == Counter({"keyed/k": 2}) and seen["done"] == Counter({"keyed/k": 2})
