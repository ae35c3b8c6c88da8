"""Runs Python handlers in this process, behind the executor protocol: each
invocation is an asyncio task on the processor's loop (sdk.runner does the
running); its end is reported through the `done` callback."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

from oncely.sdk.protocol import HandlerCall, Outcome
from oncely.sdk.runner import describe_error, run_handler

if TYPE_CHECKING:
    from oncely.app import App

log = logging.getLogger("oncely.executor")


class LocalExecutor:
    """Executes invocations as asyncio tasks on the processor's loop."""

    def __init__(self, app: App) -> None:
        self.app = app

    def start(self, call: HandlerCall, done: Callable[[Outcome], None]) -> asyncio.Task[Outcome]:
        task = asyncio.get_running_loop().create_task(run_handler(self.app, call))

        def finished(t: asyncio.Task[Outcome]) -> None:
            if t.cancelled():
                return
            try:
                outcome = t.result()
            except BaseException as e:  # not the handler's error: run_handler returns those as outcomes
                log.exception("%s: the executor failed", call.service)
                outcome = Outcome("retry", error=f"internal error: {describe_error(e)}")
            done(outcome)

        task.add_done_callback(finished)
        return task
