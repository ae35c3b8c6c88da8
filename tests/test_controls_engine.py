"""Operators' controls (processor/controls.py) on `TestDriver`: cancel,
kill, pause, resume, purge and describe, including a crash after each, no
Kafka. The broker-level tests are in test_controls.py."""

from __future__ import annotations

from collections import Counter
from typing import Any

import oncely
from oncely.processor import keys
from oncely.processor.invocation import PAUSED, SUSPENDED
from oncely.shuffle.ids import format_id
from oncely.testing import TestDriver


def _app(seen: dict[str, Any]) -> oncely.App:
    app = oncely.App("controls", partitions=2)
    app.config.suspend_after = 0.5
    trips = app.keyed("trips", retry=oncely.RetryPolicy(max_attempts=5, initial_interval=60))
    pay = app.keyed("payments")

    @pay.handler
    async def charge(ctx: oncely.KeyedContext) -> str:
        awk, fut = ctx.awakeable()
        seen["awk"][ctx.key] = awk
        return await fut

    @trips.handler
    async def book(ctx: oncely.KeyedContext) -> str:
        seen["started"][ctx.key] += 1
        try:
            receipt = await ctx.call(charge, ctx.key)
        except oncely.TerminalError as e:
            ctx.set("compensated", e.message)  # the compensation, then fail on
            raise
        ctx.set("receipt", receipt)
        return receipt

    @trips.handler
    async def nap(ctx: oncely.KeyedContext) -> str:
        seen["naps"][ctx.key] += 1
        if ctx.attempt == 0 and ctx.key.startswith("flaky"):
            raise RuntimeError("not yet")  # backs off for a minute: cancelled meanwhile
        try:
            await ctx.sleep(3600)
        except oncely.TerminalError as e:
            return f"woke: {e.message}"
        return "slept"

    @trips.handler
    async def call_nap(ctx: oncely.KeyedContext) -> str:
        try:
            return await ctx.call(nap, ctx.key + "-callee")
        except oncely.TerminalError as e:
            return f"callee failed: {e.message}"

    return app


def _other_in_flight(d: TestDriver, inv: str) -> str:
    """The one suspended invocation other than `inv` (a callee)."""
    ids = [format_id(k[1:]) for p in d.partitions for k, _ in p.store.scan(keys.STATUS)]
    (other,) = [i for i in ids if i != inv]
    return other


def _seen() -> dict[str, Any]:
    return {"awk": {}, "started": Counter(), "naps": Counter()}


def test_cancel_of_a_suspended_call_fails_it_cooperatively_and_the_caller_sees_a_terminal_error() -> None:
    seen = _seen()
    with TestDriver(_app(seen)) as d:
        inv = d.send("trips", "alice", "book", None)
        d.advance(1)
        assert d.phase(inv) == SUSPENDED
        assert d.cancel(inv) == "applied"
        d.crash()  # the cancel is committed: the replay takes the same path
        d.run()
        assert d.phase(inv) == "FAILED"
        assert d.state("trips", "alice") == {}  # a failure's state changes are not kept
        assert seen["started"]["alice"] >= 2  # resumed by replay to see the cancellation
        dead = d.dead_letters()
        # The caller, and its callee (charge), which the cancel reached.
        assert [dict(r.headers)["oncely.reason"] for r in dead] == [b"terminal", b"terminal"]
        assert d.describe(inv)["phase"] == "FAILED"
        assert d.cancel(inv).startswith("conflict: cannot cancel it: it has finished")


def test_a_cancelled_callee_answers_its_caller_with_a_terminal_error_and_may_compensate() -> None:
    seen = _seen()
    with TestDriver(_app(seen), always_replay=True) as d:
        caller = d.send("trips", "bob", "call_nap", None)
        d.advance(1)
        callee = d.describe(caller)  # the caller waits on its call
        assert callee["phase"] == SUSPENDED and callee["journal_length"] == 1
        callee_id = _other_in_flight(d, caller)
        assert d.cancel(callee_id) == "applied"
        d.run()
        assert d.result(callee_id) == "woke: cancelled"  # it caught the cancellation and returned
        assert d.result(caller) == "woke: cancelled"


def test_cancel_while_backing_off_fails_its_next_await_also_after_a_crash() -> None:
    seen = _seen()
    with TestDriver(_app(seen)) as d:
        inv = d.send("trips", "flaky-1", "nap", None)
        d.run()
        assert d.phase(inv) == "BACKING_OFF"
        assert d.cancel(inv) == "applied"
        assert d.describe(inv)["cancelled"] is True
        d.crash()  # the mark is in its status record
        d.advance(120)  # the retry runs: its first await is cancelled
        assert d.result(inv) == "woke: cancelled"
        assert seen["naps"]["flaky-1"] == 2


def test_kill_fails_at_once_answers_the_caller_and_drops_its_timer() -> None:
    seen = _seen()
    with TestDriver(_app(seen)) as d:
        caller = d.send("trips", "carol", "call_nap", None)
        d.advance(1)
        callee = _other_in_flight(d, caller)
        assert d.kill(callee) == "applied"
        d.run()
        assert d.phase(callee) == "FAILED"
        assert "killed" in d.describe(callee)["error"]
        assert d.result(caller).startswith("callee failed: trips/nap failed (killed)")
        assert [dict(r.headers)["oncely.reason"] for r in d.dead_letters()] == [b"killed"]
        assert not [k for p in d.partitions for k, _ in p.store.scan(b"t")]  # its sleep's timer is gone
        d.advance(7200)
        assert seen["naps"]["carol-callee"] == 1  # no more handler code
        assert d.kill(callee).startswith("conflict")


def test_pause_holds_across_a_crash_until_resumed_then_completes_once() -> None:
    seen = _seen()
    with TestDriver(_app(seen)) as d:
        inv = d.send("trips", "dave", "book", None)
        later = d.send("trips", "dave", "book", None)  # queued behind dave's key
        d.run()
        assert d.pause(inv) == "applied"
        assert d.phase(inv) == PAUSED
        assert d.describe(inv)["paused_by_operator"] is True
        d.resolve_awakeable(seen["awk"]["dave"], "r-1")  # its callee completes meanwhile
        d.run()
        d.crash()
        d.run()
        assert d.phase(inv) == PAUSED  # an operator's pause is not retried on restart
        assert d.phase(later) == "INBOXED"  # it still holds its key
        assert d.resume(inv) == "applied"
        d.run()
        assert d.result(inv) == "r-1"
        assert d.state("trips", "dave") == {"receipt": "r-1"}
        assert d.resume(inv).startswith("conflict: cannot resume it: it is COMPLETED")


def test_purge_is_refused_in_flight_and_frees_the_idempotency_key_after() -> None:
    seen = _seen()
    with TestDriver(_app(seen)) as d:
        inv = d.send("trips", "erin", "book", None, idempotency_key="once")
        d.run()
        assert d.purge(inv).startswith("conflict: cannot purge it: it is RUNNING")
        d.resolve_awakeable(seen["awk"]["erin"], "r-1")
        d.run()
        assert d.result(inv) == "r-1"
        assert d.send("trips", "erin", "book", None, idempotency_key="once") == inv
        d.run()
        assert seen["started"]["erin"] == 1  # a duplicate: not run again
        assert d.purge(inv) == "applied"
        assert d.describe(inv) is None
        assert d.purge(inv) == "unknown"
        d.crash()
        d.send("trips", "erin", "book", None, idempotency_key="once")
        d.run()
        assert seen["started"]["erin"] == 2  # the key is free: it runs again


def test_cancel_reaches_the_callee_the_caller_awaits_also_after_a_crash() -> None:
    seen = _seen()
    with TestDriver(_app(seen)) as d:
        caller = d.send("trips", "frank", "call_nap", None)
        d.advance(1)
        callee = _other_in_flight(d, caller)
        assert d.phase(callee) == SUSPENDED  # asleep for an hour
        assert d.cancel(caller) == "applied"
        d.crash()  # the cancel and the control it sent its callee are committed
        d.run()
        assert d.result(caller) == "callee failed: cancelled"
        assert d.result(callee) == "woke: cancelled"  # it did not sleep on for an hour


def test_kill_reaches_the_callee_the_caller_awaits() -> None:
    seen = _seen()
    with TestDriver(_app(seen)) as d:
        caller = d.send("trips", "gus", "book", None)
        d.advance(1)
        callee = _other_in_flight(d, caller)
        assert d.kill(caller) == "applied"
        d.run()
        assert (d.phase(caller), d.phase(callee)) == ("FAILED", "FAILED")
        assert "killed" in d.describe(callee)["error"]
        assert sorted(dict(r.headers)["oncely.reason"] for r in d.dead_letters()) == [b"killed", b"killed"]


def _queue_app(ran: list[int]) -> oncely.App:
    """queue/work(n) notes n in `ran`; n == 0 sleeps a minute first, holding its key."""
    app = oncely.App("controls-queue", partitions=2)
    app.config.suspend_after = 0.5
    queue = app.keyed("queue")

    @queue.handler
    async def work(ctx: oncely.KeyedContext, n: int) -> int:
        ran.append(n)
        if n == 0:
            await ctx.sleep(60)
        ctx.set("last", n)
        return n

    return app


def test_cancel_and_kill_of_inboxed_invocations_fail_them_at_their_turn_without_running() -> None:
    ran: list[int] = []
    with TestDriver(_queue_app(ran)) as d:
        first = d.send("queue", "k", "work", 0)
        d.run()
        waiting = [d.send("queue", "k", "work", n) for n in (1, 2, 3)]
        d.run()
        assert [d.phase(i) for i in waiting] == ["INBOXED"] * 3
        assert d.cancel(waiting[0]) == "applied"
        assert d.kill(waiting[1]) == "applied"
        assert d.describe(waiting[0])["cancelled"] is True
        d.crash()  # the marks are in the store
        d.advance(61)
        assert d.result(first) == 0 and d.result(waiting[2]) == 3
        assert [d.phase(i) for i in waiting[:2]] == ["FAILED", "FAILED"]
        assert "cancelled" in d.describe(waiting[0])["error"] and "killed" in d.describe(waiting[1])["error"]
        assert 1 not in ran and 2 not in ran  # never ran
        assert d.state("queue", "k") == {"last": 3}
        assert d.cancel(waiting[0]).startswith("conflict")
        assert not [k for p in d.partitions for k, _ in p.store.scan(keys.DOOMED)]  # marks gone with them


def test_an_invoke_held_without_an_idempotency_key_is_found_listed_and_cancelled() -> None:
    """A subscribed record routed through the log has no idempotency key: the
    duplicate check's lookup never finds it while it is held as read-ahead,
    but an operator does."""
    from oncely.processor import controls
    from oncely.shuffle.envelope import invoke_record
    from oncely.shuffle.ids import random_id
    from oncely.shuffle.routing import partition_for

    ran: list[int] = []
    app = _queue_app(ran)
    with TestDriver(app) as d:
        d.send("queue", "k", "work", 0)
        d.run()
        inv_id = random_id()
        p = partition_for(b"k", app.partitions)
        d._append(p, b"k", invoke_record(inv_id, "queue", "work", b"k", b"1", "JSON"))
        d.run()
        part = d.partitions[p]
        assert part.lookup(inv_id) is None and part.ahead.held  # held in memory, unknown to lookup
        assert [x["invocation_id"] for x in controls.listing(part, {"INBOXED"}, 10)] == [
            f"{format_id(inv_id)}_{p}"]
        assert d.cancel(format_id(inv_id)) == "applied"
        assert d.describe(format_id(inv_id))["cancelled"] is True
        d.crash()  # re-read from the log, held again: the mark still applies
        d.advance(61)
        assert ran.count(1) == 0
        assert b"cancelled" in [dict(r.headers)["oncely.reason"] for r in d.dead_letters()]
