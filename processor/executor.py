"""Runs Python handlers in this process, behind the executor protocol; its
end is reported through the `done` callback (sdk.runner does the running).

Handlers start eagerly, as Python 3.12's eager tasks do: the first step of
an invocation runs at once, in `start`, in a context of its own. A handler
that ends without awaiting anything pending (most stream enrichments)
needs no task of its own and no further loop iterations: its outcome
applies before `start` returns, and its key is free for the next record at
once. One that awaits goes on in a task.

Whatever the handler does in its first step sees one task as
`asyncio.current_task()` from start to end (an `asyncio.timeout`, a
`TaskGroup` or an HTTP client's cancel scope entered there must not see the
commit loop's task, nor a different task after the first await): a spare
task, made ahead and waiting idle, is current during the first step; a
handler that awaits adopts it (it drives the rest, in the handler's
context), and a new spare is made for the next one.

What an eager outcome starts in turn (the next invocation of the key) is
an ordinary task, so a long queue of one key does not recurse.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import types
from asyncio.tasks import _enter_task, _leave_task  # what 3.12's eager tasks swap
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any, Callable

from oncely.sdk.protocol import HandlerCall, Outcome
from oncely.sdk.runner import describe_error, run_handler

if TYPE_CHECKING:
    from oncely.app import App

try:
    from _asyncio import current_task as _current_task  # (3.12+; asyncio.current_task is Python in 3.11)
except ImportError:
    from asyncio.tasks import _current_tasks

    _current_task = _current_tasks.get

log = logging.getLogger("oncely.executor")

_Rest = tuple[Coroutine[Any, Any, Outcome], Any, contextvars.Context]


class LocalExecutor:
    """Executes invocations on the processor's loop."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.in_process = self  # first steps may run in place (first_step.py)
        # Inside an eager first step or its outcome: what starts now is an
        # ordinary task (so a long queue of one key does not recurse).
        self.eager = False
        self._spare: asyncio.Task[Outcome] | None = None
        self._slot: asyncio.Future[_Rest] | None = None  # what the spare waits for
        # The loop it runs on, kept: asyncio.get_running_loop() makes a
        # getpid() system call on every call (CPython 3.11), once per record.
        self._loop: asyncio.AbstractEventLoop | None = None
        # Inside a batch (`enter_batch`): the spare made current for the
        # rest of the batch, and the task current before it.
        self._in_batch = False
        self._batch_spare: asyncio.Task[Outcome] | None = None
        self._batch_outer: asyncio.Task[Any] | None = None

    def start(self, call: HandlerCall, done: Callable[[Outcome], None]) -> asyncio.Task[Outcome] | None:
        coro = run_handler(self.app, call)
        if self.eager:
            task = self._running_loop().create_task(coro)
        else:
            context = contextvars.copy_context()
            try:
                yielded = self.step(coro, context)
            except StopIteration as stop:
                done(stop.value)
                return None
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # not the handler's error: run_handler returns those as outcomes
                done(failed(call, e))
                return None
            finally:
                self.eager = False
            task = self.adopt(coro, yielded, context)

        def finished(t: asyncio.Task[Outcome]) -> None:
            if t.cancelled():
                return
            try:
                outcome = t.result()
            except BaseException as e:
                outcome = failed(call, e)
            done(outcome)

        task.add_done_callback(finished)
        return task

    def step(self, coro: Coroutine[Any, Any, Any], context: contextvars.Context) -> Any:
        """Run the coroutine's first step at once, in `context`, with the
        spare task current. Returns what it yielded (the caller then
        `adopt`s it), or raises StopIteration with its result, or what it
        raised. Sets `eager`; the caller clears it once it has applied the
        outcome (what that starts in turn is then an ordinary task)."""
        task = self._spare
        # Current already (`enter_batch`), unless a first step cancelled it.
        if task is not None and task is self._batch_spare and not task.cancelling():
            self.eager = True
            return context.run(coro.send, None)
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._running_loop()
            task = self._spare
        if task is None or self._slot is None or task.done() or task.cancelling():
            task = self._take_spare(loop)[0]
        self.eager = True
        # The spare task is the current task while the step runs (as 3.12's eager tasks swap theirs).
        outer = _current_task(loop)
        if outer is not None:
            _leave_task(loop, outer)
        _enter_task(loop, task)
        if self._in_batch:  # it stays current until the batch ends
            self._batch_spare = task
            return context.run(coro.send, None)
        try:
            return context.run(coro.send, None)
        finally:
            _leave_task(loop, task)
            if outer is not None:
                _enter_task(loop, outer)

    def enter_batch(self) -> None:
        """Records are about to be handled one after another, nothing else
        of the loop in between: the spare stays current across their first
        steps, not swapped in and out for each (two swaps, ~4,000 of a
        record's ~155,000 instructions: bench_hotpath); `end_batch` makes the
        task current before it current again."""
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._running_loop()
        self._batch_outer = _current_task(loop)
        self._in_batch = True

    def end_batch(self) -> None:
        self._in_batch = False
        self._batch_spare = None
        outer, self._batch_outer = self._batch_outer, None
        loop = self._loop
        assert loop is not None
        current = _current_task(loop)
        if current is not outer:
            if current is not None:
                _leave_task(loop, current)
            if outer is not None:
                _enter_task(loop, outer)

    def adopt(self, coro: Coroutine[Any, Any, Any], yielded: Any, context: contextvars.Context) -> asyncio.Task[Any]:
        """The spare task drives the rest of a coroutine that awaited in its first step."""
        task, slot = self._spare, self._slot
        assert task is not None and slot is not None
        self._spare = self._slot = None  # adopted: it drives the rest
        slot.set_result((coro, yielded, context))
        return task

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or not loop.is_running():  # (the executor outlived its loop: tests do)
            loop = self._loop = asyncio.get_running_loop()
            self._spare = self._slot = None  # (made on the old loop)
        return loop

    def _take_spare(self, loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Task[Outcome], asyncio.Future[_Rest]]:
        """A new spare task (the last one was adopted, or its loop ended)."""
        slot = loop.create_future()
        task = loop.create_task(_adoptable(slot))
        self._spare, self._slot = task, slot
        return task, slot

    def cancel_spare(self) -> None:
        """Before the loop closes: the idle spare task is not left pending."""
        if self._spare is not None:
            self._spare.cancel()
        self._spare = self._slot = None

    async def close(self) -> None:
        self.cancel_spare()


def failed(call: HandlerCall, e: BaseException) -> Outcome:
    """The outcome of an invocation whose execution (not its handler) failed."""
    log.error("%s: the executor failed", call.service, exc_info=e)
    return Outcome("retry", error=f"internal error: {describe_error(e)}")


async def _adoptable(slot: asyncio.Future[_Rest]) -> Outcome:
    """A spare task: idle until a handler that awaits adopts it."""
    coro, yielded, context = await slot
    return await _drive(coro, yielded, context)


@types.coroutine
def _drive(coro: Coroutine[Any, Any, Outcome], yielded: Any,
           context: contextvars.Context) -> Generator[Any, Any, Outcome]:
    # Passes what the coroutine yields (futures) to the task, and what the task
    # sends or throws in (results, cancellation) to the coroutine, in its own
    # context, as `await` would.
    while True:
        try:
            value = yield yielded
        except BaseException as exc:
            try:
                yielded = context.run(coro.throw, exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = context.run(coro.send, value)
            except StopIteration as stop:
                return stop.value
