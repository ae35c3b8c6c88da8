"""Runs Python handlers in this process, behind the executor protocol; its
end is reported through the `done` callback (sdk.runner does the running).

Handlers start eagerly: the first step of an invocation runs at once, in
`start`, in a context of its own (as Python 3.12's eager tasks do). A
handler that ends without awaiting anything pending (most stream
enrichments) needs no asyncio task and no further loop iterations: its
outcome applies before `start` returns, and the key it held is free for the
next record at once. One that awaits gets a task that drives the rest.

What an eager outcome starts in turn (the next invocation of the key) is
an ordinary task, so a long queue of one key does not recurse.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import types
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any, Callable

from oncely.sdk.protocol import HandlerCall, Outcome
from oncely.sdk.runner import describe_error, run_handler

if TYPE_CHECKING:
    from oncely.app import App

log = logging.getLogger("oncely.executor")


class LocalExecutor:
    """Executes invocations on the processor's loop."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._eager = False  # inside an eager first step or its outcome

    def start(self, call: HandlerCall, done: Callable[[Outcome], None]) -> asyncio.Task[Outcome] | None:
        coro = run_handler(self.app, call)
        loop = asyncio.get_running_loop()
        if self._eager:
            task = loop.create_task(coro)
        else:
            context = contextvars.copy_context()
            self._eager = True
            try:
                try:
                    yielded = context.run(coro.send, None)
                except StopIteration as stop:
                    done(stop.value)
                    return None
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as e:  # not the handler's error: run_handler returns those as outcomes
                    done(_failed(call, e))
                    return None
            finally:
                self._eager = False
            task = loop.create_task(_resume(coro, yielded), context=context)

        def finished(t: asyncio.Task[Outcome]) -> None:
            if t.cancelled():
                return
            try:
                outcome = t.result()
            except BaseException as e:
                outcome = _failed(call, e)
            done(outcome)

        task.add_done_callback(finished)
        return task


def _failed(call: HandlerCall, e: BaseException) -> Outcome:
    log.error("%s: the executor failed", call.service, exc_info=e)
    return Outcome("retry", error=f"internal error: {describe_error(e)}")


async def _resume(coro: Coroutine[Any, Any, Outcome], yielded: Any) -> Outcome:
    """The rest of a coroutine whose first step ran eagerly (it yielded `yielded`)."""
    return await _drive(coro, yielded)


@types.coroutine
def _drive(coro: Coroutine[Any, Any, Outcome], yielded: Any) -> Generator[Any, Any, Outcome]:
    # Passes what the coroutine yields (futures) to the task and what the task
    # sends or throws in (results, cancellation) to the coroutine, as `await` would.
    while True:
        try:
            value = yield yielded
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(value)
            except StopIteration as stop:
                return stop.value
