"""The local executor's eager start (processor/executor.py), on the
TestDriver (no Kafka): a handler's first step runs inside `start`, yet what
it sees of asyncio is what a task of its own would show it."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import oncely
from oncely.testing import TestDriver

where: contextvars.ContextVar[str] = contextvars.ContextVar("where", default="unset")


def _app(seen: dict[str, Any]) -> oncely.App:
    app = oncely.App("eager", partitions=1)
    svc = app.keyed("svc")

    @svc.handler
    async def plain(ctx: oncely.KeyedContext) -> str:
        seen.setdefault("plain", []).append(asyncio.current_task())
        return "done"

    @svc.handler
    async def timed(ctx: oncely.KeyedContext) -> str:
        first = asyncio.current_task()
        where.set(ctx.key)
        try:
            async with asyncio.timeout(0.05):  # entered in the eager first step
                await asyncio.sleep(5)
        except TimeoutError:
            woken = where.get()  # the timeout came in as a cancellation
        await asyncio.sleep(0)  # and a plain await
        seen.setdefault("timed", []).append((first, asyncio.current_task(), woken + where.get()))
        return "timed out"

    return app


def test_a_timeout_entered_in_the_first_step_cancels_the_handler_not_the_loop() -> None:
    seen: dict[str, Any] = {}
    with TestDriver(_app(seen)) as d:
        a = d.send("svc", "a", "timed", None)
        b = d.send("svc", "b", "timed", None)
        d.run()
        assert d.result(a) == "timed out" and d.result(b) == "timed out"
    (first_a, after_a, key_a), (first_b, after_b, key_b) = seen["timed"]
    # One task from start to end, its own (the spare it adopted), and the
    # context the first step set is the one the rest runs in.
    assert first_a is after_a and first_b is after_b and first_a is not first_b
    assert {key_a, key_b} == {"aa", "bb"}
    assert where.get() == "unset"  # nothing leaked into the caller's context


def test_handlers_that_await_nothing_share_the_idle_spare_task() -> None:
    seen: dict[str, Any] = {}
    with TestDriver(_app(seen)) as d:
        ids = [d.send("svc", f"k{i}", "plain", None) for i in range(5)]
        d.run()
        assert [d.result(i) for i in ids] == ["done"] * 5
    tasks = seen["plain"]
    assert all(t is not None for t in tasks) and len({id(t) for t in tasks}) == 1
