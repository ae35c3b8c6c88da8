"""The first step of an in-process handler, run in place.

Most stream enrichments read and write their key's state, emit, and return
without awaiting anything. For them the executor's and the outcome's general
machinery (run_handler's wrapper coroutine, an Outcome, its dispatch, the
done callback) cost a third of the per-record time, so an attempt of a
Python handler in this process runs here instead:

- the handler's coroutine runs up to its first await as the executor runs
  any first step (`LocalExecutor.step`: the spare task current, a context of
  its own, nothing else of the loop in between);
- it **returned**, and nothing but its state writes and emits is owed (no
  caller to answer, nobody outside waiting, no dedup entry, no return value
  to check, no divergence, state not cleared): they join the open
  transaction here, exactly as `outcomes.complete` would write them, and the
  invocation finishes;
- it returned anything else, or **raised**: the runner maps the end to an
  Outcome (`returned`, `raised`: the policy is written once) and the
  partition applies it as it applies every outcome;
- it **awaits**: the spare task adopts the rest, and its end is mapped and
  applied the same way when it comes; from here on it is an invocation like
  any other.

Eligibility (`handler`, asked by `PartitionProcessor.start`): the executor
runs the service in this process (not the TestDriver's replay-checking one,
not a remote deployment), no tracer wraps attempts, the input decodes (a
local start's is decoded already; `handler` decodes the others, and one
that does not decode takes the general path, which says why), and no first
step is already running (what an eager outcome starts in turn is a task).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import TYPE_CHECKING, Any, Callable

from oncely.errors import NonDeterminismError
from oncely.processor import handover
from oncely.processor.executor import LocalExecutor, failed
from oncely.sdk import runner
from oncely.sdk.journal import KeyedJournalContext, StatelessContext
from oncely.sdk.protocol import NOT_DECODED, HandlerCall, Outcome
from oncely.shuffle.ids import format_id

if TYPE_CHECKING:
    from oncely.app import Handler
    from oncely.processor.invocation import Invocation
    from oncely.processor.partition import PartitionProcessor
    from oncely.processor.store import KeyState

log = logging.getLogger("oncely.partition")


def handler(part: PartitionProcessor, executor: LocalExecutor, invoke: dict[str, Any],
            call: HandlerCall) -> Handler | None:
    """The handler whose first step may run in place, or None: the general
    path (the executor) runs it. The caller checked that `executor` runs
    in-process handlers and is not inside a first step already."""
    if runner.tracer is not None:
        return None  # (it wraps each attempt's coroutine)
    svc = part.app.services.get(invoke["service"])  # (gone after a deploy: the runner fails it)
    if svc is None or svc.deployment is not None:
        return None
    h = svc.handlers.get(invoke["handler"])
    if h is None:
        return None
    if h.takes_input and call.input is NOT_DECODED:  # read from the log, a retry, a resume
        try:
            call.input = runner.input_of(part.app, call)
        except Exception:
            return None  # the general path decodes it again and says why
    return h


def run(part: PartitionProcessor, inv: Invocation, call: HandlerCall, handler: Handler, executor: LocalExecutor,
        attempt_run: int, fresh: bool = False) -> asyncio.Task[object] | None:
    """Run `inv`'s first step here; its task when it awaits, else None (its
    outcome is applied already). A `fresh` invocation (PartitionProcessor.start)
    is registered only when the step does not complete it in place."""
    ctx = KeyedJournalContext(call) if handler.service.keyed else StatelessContext(call)  # (context_for, inlined)
    context = contextvars.copy_context()
    try:
        try:
            coro = handler.fn(ctx, call.input) if handler.takes_input else handler.fn(ctx)
            yielded = executor.step(coro, context)
        except StopIteration as stop:
            value = stop.value
            invoke = inv.invoke
            if (value is None and ctx.diverged is None and invoke["caller"] is None and not part.waiters
                    and "reply" not in invoke and invoke["idempotency_key"] is None and part.writer.net_effects):
                writes, cleared = ctx.state_changes()
                if not cleared:
                    _complete(part, inv, call.state, writes, ctx.emits, fresh)  # type: ignore[arg-type]
                    return None
            if fresh:
                part.register(inv)
            part._apply_outcome(inv, runner.returned(call, ctx, value), attempt_run)
            return None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            if fresh:
                part.register(inv)
            part._apply_outcome(inv, _ended_by(call, ctx, e), attempt_run)
            return None
    finally:
        executor.eager = False
    if fresh:
        part.register(inv)
    task = executor.adopt(coro, yielded, context)
    task.add_done_callback(_when_adopted_ends(part, inv, call, ctx, attempt_run))
    return task


def _when_adopted_ends(part: PartitionProcessor, inv: Invocation, call: HandlerCall, ctx: object,
                       attempt_run: int) -> Callable[[asyncio.Task[object]], None]:
    """The adopted task's done callback: its end mapped and applied. (Made
    here, not in `run`: a closure there would make its variables cells on
    every first step, not only on those that await.)"""

    def finished(t: asyncio.Task[object]) -> None:
        if t.cancelled():
            return  # a rewind, a revocation or a control dropped it
        try:
            outcome = runner.returned(call, ctx, t.result())  # type: ignore[arg-type]
        except BaseException as e:
            outcome = _ended_by(call, ctx, e)
        part._apply_outcome(inv, outcome, attempt_run)

    return finished


def _ended_by(call: HandlerCall, ctx: object, e: BaseException) -> Outcome:
    """The outcome of a handler that raised: the runner's mapping; what
    only the executor can raise (cancellation) is an internal error."""
    if isinstance(e, (Exception, NonDeterminismError)):
        return runner.raised(call, ctx, e)  # type: ignore[arg-type]
    return failed(call, e)


def _complete(part: PartitionProcessor, inv: Invocation, state: KeyState | None, writes: dict[str, bytes | None],
              emits: list[tuple], fresh: bool) -> None:
    """`outcomes.complete` for an invocation that owes nothing but its state
    writes and emits; an error applying them aborts the open transaction,
    as `PartitionProcessor._apply_outcome` does. A `fresh` one was never
    registered: there is nothing to forget and no key to hand on."""
    inv.running = None
    metrics = part.metrics
    if metrics is not None:
        metrics.attempt_ended(inv)
    try:
        if state is not None and writes:
            store, prefix = part.store, state.prefix
            for name, value in writes.items():
                if value is None:
                    store.delete(prefix + name.encode())  # (keys.state)
                else:
                    store.put(prefix + name.encode(), value)
        out = part.out
        for topic, key, value, headers in emits:
            out.produce(topic, key, value, headers, owner=inv.id)
        part.stats.completed += 1
        if metrics is not None:
            metrics.outcome(inv, "completed")
        if not fresh:
            handover.finish(part, inv)
        elif part.local_waits.n or part.waits.futures or part.waits.idle:
            handover.finish_fresh(part, inv)
    except Exception as e:
        log.exception("%s %s: applying its outcome failed", format_id(inv.id), inv.target)
        part.out.fault(inv.id, f"internal error applying its outcome (completed): {type(e).__name__}: {e}")
