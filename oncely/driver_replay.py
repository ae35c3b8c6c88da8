"""The `always_replay` mode of `TestDriver`: every outcome checked by replay.

Restate's test harness replays a handler from its journal before each step;
here each attempt runs, and before its outcome counts the handler runs again
purely from the journal it left, with effects that refuse any new step. A
handler that is not deterministic (it branches on a clock, a global, a
random number it did not take from ctx) takes another path on the replay,
which pauses the invocation and fails the test.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from oncely.app import App
from oncely.errors import NonDeterminismError
from oncely.processor.executor import LocalExecutor
from oncely.sdk.protocol import Entry, HandlerCall, Outcome
from oncely.sdk.runner import run_handler
from oncely.shuffle.ids import format_id


class _StrictEffects:
    """Effects for a verifying replay: a deterministic replay takes no new
    step, so every effect beyond pure lookups is a divergence."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def record(self, topic: str, value: Any, key: Any, headers: Any) -> Any:
        return self._real.record(topic, value, key, headers)

    def target(self, target: Any, args: tuple[Any, ...], call: bool) -> Any:
        return self._real.target(target, args, call)

    def awakeable_id(self, index: int) -> str:
        return self._real.awakeable_id(index)

    def _new_step(self, what: str) -> Any:
        raise NonDeterminismError(-1, "(end of journal)", what)

    def send(self, t: Any, index: int, delay_ms: int | None) -> bytes:
        return self._new_step(f"send({t.service}/{t.handler})")

    def call(self, t: Any, index: int) -> int | None:
        return self._new_step(f"call({t.service}/{t.handler})")

    def sleep_until(self, fire_ms: int, index: int) -> None:
        self._new_step("sleep()")

    def early_completion(self, index: int, entry: Entry) -> None:
        self._new_step("awakeable()")

    async def wait(self, index: int) -> None:
        self._new_step(f"a wait on entry {index}")


class ReplayChecking:
    """An executor that runs each attempt, then, before its outcome counts,
    runs the handler again purely from the journal and requires the same
    result: non-determinism becomes a paused invocation and a test failure."""

    def __init__(self, app: App, failures: list[str]) -> None:
        self.app = app
        self.local = LocalExecutor(app)
        self.failures = failures

    def start(self, call: HandlerCall, done: Any) -> Any:
        tasks: list[asyncio.Task] = []

        def finished(outcome: Outcome) -> None:
            if outcome.status not in ("completed", "terminal"):
                done(outcome)
                return
            verify = asyncio.get_running_loop().create_task(self._verify(call, outcome))
            tasks.append(verify)
            verify.add_done_callback(lambda t: None if t.cancelled() else done(t.result()))

        first = self.local.start(call, finished)
        if first is not None:
            tasks.append(first)

        class _Running:
            def cancel(self) -> None:
                for t in tasks:
                    t.cancel()

        return _Running()

    async def _verify(self, call: HandlerCall, outcome: Outcome) -> Outcome:
        journal = [dataclasses.replace(e) for e in call.journal]
        replay = dataclasses.replace(call, journal=journal, effects=_StrictEffects(call.effects))
        again = await run_handler(self.app, replay)
        same = (again.status, again.value, again.error, again.state, again.cleared_all, again.emits) == (
            outcome.status, outcome.value, outcome.error, outcome.state, outcome.cleared_all, outcome.emits)
        if same and len(journal) == len(call.journal):
            return outcome
        why = again.error if again.status == "paused" else f"the replay ended {again.status} with other effects"
        self.failures.append(f"{format_id(call.invocation_id)} {call.service}/{call.handler}: {why}")
        return Outcome("paused", error=f"non-deterministic on replay: {why}")
