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


def test_a_batch_keeps_the_spare_current_and_gives_the_loop_its_task_back() -> None:
    """The commit loop handles a poll's records as a batch (enter_batch):
    the spare stays current across first steps, a handler that awaits
    still adopts the task it started in, the next one gets a new spare, and
    the loop's own task is current again when the batch ends."""
    from oncely.processor.executor import LocalExecutor

    async def plain(seen: list[asyncio.Task[Any] | None]) -> str:
        seen.append(asyncio.current_task())
        return "done"

    async def rude() -> None:
        asyncio.current_task().cancel()  # type: ignore[union-attr]  # its own (the spare), without awaiting

    async def timed() -> tuple[Any, Any]:
        first = asyncio.current_task()
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(5)
        except TimeoutError:
            pass
        return first, asyncio.current_task()

    def finish(ex: LocalExecutor, coro: Any) -> Any:
        try:
            ex.step(coro, contextvars.copy_context())
        except StopIteration as stop:
            return stop.value
        finally:
            ex.eager = False
        raise AssertionError("it awaited")

    async def main() -> None:
        ex = LocalExecutor(oncely.App("batch", partitions=1))
        mine = asyncio.current_task()
        seen: list[asyncio.Task[Any] | None] = []
        ex.enter_batch()
        try:
            assert finish(ex, plain(seen)) == "done" and finish(ex, plain(seen)) == "done"
            finish(ex, rude())  # the spare is cancelled: the next step takes a new one
            coro = timed()
            yielded = ex.step(coro, contextvars.copy_context())
            ex.eager = False
            adopted = ex.adopt(coro, yielded, contextvars.copy_context())
            assert finish(ex, plain(seen)) == "done"
        finally:
            ex.end_batch()
        current = asyncio.current_task()
        if current is not mine:  # put the loop right first, so the failure below is reported, not a hang
            from asyncio.tasks import _enter_task, _leave_task
            _leave_task(asyncio.get_running_loop(), current)
            _enter_task(asyncio.get_running_loop(), mine)
        assert current is mine, f"after the batch the current task is {current}, not the loop's"
        first, last = await adopted
        assert seen[0] is seen[1] and first is last is adopted and adopted is not seen[0]  # one spare, a new one after the cancel
        assert seen[2] is not adopted and seen[2] is not mine and seen[2] is not None
        assert await asyncio.sleep(0, "still the loop's") == "still the loop's" and asyncio.current_task() is mine
        ex.cancel_spare()

    asyncio.run(main())
