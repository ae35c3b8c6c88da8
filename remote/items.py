"""Runs one item of an invoke request: the app's handler on the unchanged
journal engine (`oncely.sdk.runner.run_handler`) with `CollectingEffects`,
then the item's answer.

An item whose coroutine can only go on once a journal entry completes is
*suspended* (Restate's rule): every path of the task ends at a parked wait,
so nothing (no `ctx.run`, no I/O, no runnable callback) can move it. The
check walks what the task awaits: a parked future blocks; a gather blocks
when all its pending children block; anything else (a thread running a
`ctx.run` step, a socket, a timer) is work in progress, and its completion
wakes the driver to look again. The deadline answers `yield`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from oncely.egress.sinks import Sinks
from oncely.remote.effects import CollectingEffects, EagerState, Frozen, NeedState
from oncely.remote.wire import InvokeRequest, ItemRequest, StateSnapshot, b64, entry_json
from oncely.sdk.protocol import HandlerCall, Outcome
from oncely.sdk.runner import describe_error, run_handler
from oncely.shuffle.ids import format_id

if TYPE_CHECKING:
    from oncely.app import App

log = logging.getLogger("oncely.remote")


def _blocked(fut: asyncio.Future[Any], parked: set[int], leaves: list[asyncio.Future[Any]]) -> bool:
    """Whether `fut` can only finish after a parked entry completes; the
    pending futures that could still move it go to `leaves`."""
    if fut.done():
        return False  # its waiter's wake-up is scheduled: progress
    if id(fut) in parked:
        return True
    if isinstance(fut, asyncio.Task):
        if not hasattr(fut, "_fut_waiter"):  # not CPython's Task: cannot tell; wait for it (or the deadline)
            leaves.append(fut)
            return False
        waiter = fut._fut_waiter  # the future it awaits; None while it is runnable
        return waiter is not None and _blocked(waiter, parked, leaves)
    children = getattr(fut, "_children", None)  # asyncio.gather's future
    if isinstance(children, list):
        pending = [c for c in children if not c.done()]
        verdicts = [_blocked(c, parked, leaves) for c in pending]
        return bool(pending) and all(verdicts)
    leaves.append(fut)
    return False


class _Driver:
    """Wakes whenever the item may have changed; decides when it is stuck."""

    def __init__(self) -> None:
        self.wake_fut: asyncio.Future[None] | None = None
        self.watched: set[int] = set()

    def wake(self) -> None:
        fut = self.wake_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _watch(self, leaves: list[asyncio.Future[Any]]) -> None:
        for leaf in leaves:
            if id(leaf) not in self.watched:
                self.watched.add(id(leaf))
                leaf.add_done_callback(lambda _f: self.wake())

    async def run(self, task: asyncio.Task[Outcome], effects: CollectingEffects, deadline: float) -> str:
        """'done', 'suspended', 'need_state' or 'yield'."""
        loop = asyncio.get_running_loop()
        task.add_done_callback(lambda _t: self.wake())
        while True:
            if task.done():
                return "need_state" if effects.need is not None else "done"
            if effects.need is not None:
                return "need_state"
            if effects.parked:
                leaves: list[asyncio.Future[Any]] = []
                if _blocked(task, {id(f) for f in effects.parked.values()}, leaves):
                    return "suspended"
                self._watch(leaves)
                if not leaves:  # runnable: look again once it has run
                    await asyncio.sleep(0)
                    continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return "yield"
            self.wake_fut = loop.create_future()
            try:
                await asyncio.wait({self.wake_fut}, timeout=remaining)
            finally:
                self.wake_fut = None


def _answer(item: ItemRequest, call: HandlerCall, effects: CollectingEffects) -> dict[str, Any]:
    """The item's id, the journal length it was sent with and the entries
    it added up to the answer (later ones belong to a dropped coroutine)."""
    known = len(item.journal)
    upto = effects.upto if effects.upto is not None else len(call.journal)
    entries = []
    for i in range(known, upto):
        e = entry_json(call.journal[i])
        if i in effects.ops:
            e["op"] = effects.ops[i]
        entries.append(e)
    return {"id": format_id(item.invocation_id), "known": known, "entries": entries}


def _outcome_fields(outcome: Outcome, sinks: Sinks) -> dict[str, Any]:
    if outcome.status != "completed":
        return {"status": outcome.status, "error": outcome.error}
    state = {"set": {n: b64(v) for n, v in outcome.state.items() if v is not None},
             "clear": sorted(n for n, v in outcome.state.items() if v is None),
             "clear_all": outcome.cleared_all}
    emits = [{"topic": topic, "key": b64(key), "value": {"format": sink_format(sinks, topic), "data": b64(value)},
              "headers": None if headers is None else [{"name": n, "value": b64(v)} for n, v in headers]}
             for topic, key, value, headers in outcome.emits]
    return {"status": "completed", "output": b64(outcome.value), "state": state, "emits": emits}


def _refused(item: ItemRequest, status: str, error: str) -> dict[str, Any]:
    return {"id": format_id(item.invocation_id), "known": len(item.journal), "entries": [], "status": status,
            "error": error}


async def run_item(app: App, sinks: Sinks, req: InvokeRequest, item: ItemRequest, deadline: float) -> dict[str, Any]:
    """The answer to one item: its new journal entries (with the op data of
    sends, calls and sleeps) and how it ended."""
    handler = app.lookup(item.service, item.handler)
    if handler is None:
        return _refused(item, "unknown_handler", f"no handler {item.service}.{item.handler} in app {app.name!r}")
    keyed = handler.service.keyed
    if keyed and item.key is None:
        return _refused(item, "terminal", f"service {item.service!r} is keyed: the invocation has no key")
    if not keyed and item.key is not None:
        return _refused(item, "terminal", f"service {item.service!r} is stateless: the invocation has a key")
    driver = _Driver()
    effects = CollectingEffects(app, sinks, item.invocation_id, item.service, item.key, keyed, req.app,
                                req.partition, driver.wake)
    state = None
    if keyed:
        snapshot = item.state if item.state is not None else StateSnapshot(False, {}, None)
        state = EagerState(snapshot, effects)
    call = HandlerCall(item.invocation_id, item.service, item.handler, item.key, item.payload, item.payload_format,
                       item.attempt, list(item.journal), state, source=item.source, effects=effects,
                       limits=req.limits)
    effects.journal = call.journal
    task = asyncio.get_running_loop().create_task(run_handler(app, call))
    try:
        verdict = await driver.run(task, effects, deadline)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if verdict == "done":
        answer = _answer(item, call, effects)
        try:
            outcome = task.result()
        except (Frozen, asyncio.CancelledError) as e:
            outcome = Outcome("retry", error=f"the handler was cancelled: {describe_error(e)}")
        except BaseException as e:  # not the handler's own failure: run_handler returns those
            log.exception("%s: the endpoint failed", format_id(item.invocation_id))
            outcome = Outcome("retry", error=f"internal error: {describe_error(e)}")
        answer.update(_outcome_fields(outcome, sinks))
        return answer
    effects.freeze()
    answer = _answer(item, call, effects)
    if verdict == "suspended":
        answer.update(status="suspended", awaiting=sorted(effects.parked))
    elif verdict == "need_state":
        need = effects.need
        assert need is not None
        answer.update(status="need_state", names=need.names, keys=need.keys)
    else:
        answer.update(status="yield")
    await _drop(task)
    return answer


async def _drop(task: asyncio.Task[Outcome]) -> None:
    """Cancel the item's coroutine and let it unwind (its `finally` blocks
    run; their effects are refused, their entries are past the answer)."""
    if not task.done():
        task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Frozen, NeedState):
        pass
    except BaseException:
        log.debug("an item's coroutine failed while it was dropped", exc_info=True)


def sink_format(sinks: Sinks, topic: str) -> str:
    """How an emitted value was serialized: its declared sink's format, or
    json; the processor refuses a record whose format its sink does not share."""
    sink = sinks.declared.get(topic)
    return "json" if sink is None else sink.serializer.name
