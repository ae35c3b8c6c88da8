"""The processor's side of an endpoint's answer: what it sends for an item
and how an answer's new journal entries and outcome take effect.

Every new entry is appended to the invocation's journal and its effect goes
through the same `Effects` hooks the in-process `Context` uses (`target`,
`send`, `call`, `sleep_until`, `early_completion`, `record`), synchronously,
so a whole answer joins one open transaction: the exactly-once argument is
the in-process one. Nothing the endpoint says is trusted beyond what the
hooks check themselves: targets are resolved again here, sizes checked
against the processor's limits, sleeps fire on the processor's clock.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson

from oncely.errors import TerminalError
from oncely.remote.answers import Answer, BadAnswer, Op
from oncely.remote.wire import StateSnapshot, item_request
from oncely.sdk.protocol import Effects, Entry, HandlerCall, Outcome
from oncely.shuffle.targets import Target, encode_payload

if TYPE_CHECKING:
    from oncely.app import App

WAITING = frozenset(("call", "sleep", "awakeable"))
MAX_NAMES = 1000


def item_input(app: App, call: HandlerCall) -> tuple[bytes, str]:
    """The input as the endpoint takes it: a subscription's source value is
    decoded here (the endpoint has no schema files) and sent as JSON or
    bytes; TerminalError when it cannot be decoded."""
    if call.subscription is None:
        return call.payload, call.payload_format
    sub = app.subscription(call.subscription)
    if sub is None:
        raise TerminalError(f"the invocation came from subscription {call.subscription!r}, "
                            f"which app {app.name!r} no longer has")
    try:
        return encode_payload(sub.decoder.decode(call.payload))
    except Exception as e:
        raise TerminalError(f"cannot decode the input: {type(e).__name__}: {e}") from None


def snapshot(call: HandlerCall, budget: int, wanted: set[str], names_wanted: bool) -> StateSnapshot | None:
    """The key's committed state to send: the `wanted` names always, the
    rest while it fits `budget` bytes; `complete` when all of it went."""
    state = call.state
    if state is None:
        return None
    names = sorted(state.names())
    values: dict[str, bytes] = {}
    size = 0
    complete = True
    for name in sorted(wanted) + [n for n in names if n not in wanted]:
        value = state.get(name)
        if value is None:
            continue
        if name not in wanted and size + len(value) > budget:
            complete = False
            continue
        values[name] = value
        size += len(value)
    listed = names if complete or names_wanted or len(names) <= MAX_NAMES else None
    return StateSnapshot(complete, values, listed)


def build_item(call: HandlerCall, payload: tuple[bytes, str], state: StateSnapshot | None) -> dict[str, Any]:
    return item_request(call.invocation_id, call.service, call.handler, call.key, payload[0], payload[1],
                        call.attempt, call.journal, state=state, source=call.source)


def _target(effects: Effects, call: HandlerCall, op: Op, is_call: bool, name: str) -> Target:
    """The target as the processor resolves it (a keyed service without a
    key, or a call to the caller's own key, is refused here too)."""
    if name != f"{op.service}/{op.handler}":
        raise BadAnswer(f"a {op.op} entry named {name!r} targets {op.service}/{op.handler}")
    try:
        effects.target(op.service, (op.key, op.handler, None), is_call)
    except TypeError as e:
        raise TerminalError(f"ctx.{op.op}: {e}") from None
    call.limits.check_message(f"ctx.{op.op}({name}): the payload", len(op.payload))
    return Target(op.service, op.handler, op.key, op.payload, op.payload_format)


def apply_entries(call: HandlerCall, answer: Answer) -> None:
    """Append the answer's new entries to the journal, each with its effect.
    TerminalError: the processor refuses an effect (the invocation fails)."""
    effects = call.effects
    journal = call.journal
    if effects is None:
        raise RuntimeError("a remote invocation needs its effects")
    if len(journal) != answer.known:
        raise BadAnswer(f"the answer continues a journal of {answer.known} entries; it has {len(journal)}")
    for offset, e in enumerate(answer.entries):
        index = answer.known + offset
        op = answer.ops.get(index)
        if e.kind not in WAITING and e.kind != "send" and not e.completed:
            raise BadAnswer(f"entry {index} ({e.kind}) is not completed")
        if e.kind == "run" and e.value is not None:
            call.limits.check_state(f"ctx.run({e.name!r}): the result", len(e.value))
        if e.kind == "send":
            assert op is not None
            t = _target(effects, call, op, False, e.name)
            e = Entry("send", e.name, effects.send(t, index, op.delay_ms))
        elif e.kind == "call":
            assert op is not None
            t = _target(effects, call, op, True, e.name)
            e = Entry("call", e.name, completed=False, partition=effects.call(t, index))
        elif e.kind == "sleep":
            assert op is not None
            fire_ms = int(time.time() * 1000) + op.duration_ms  # the processor's clock: its timers fire
            e = Entry("sleep", value=orjson.dumps(fire_ms), completed=False)
            journal.append(e)
            effects.sleep_until(fire_ms, index)
            continue
        elif e.kind == "awakeable":
            e = Entry("awakeable", completed=False)
            effects.early_completion(index, e)
        journal.append(e)


def completed(call: HandlerCall, answer: Answer) -> Outcome:
    """A completed answer's outcome, checked: emits through the sinks (a
    record the processor's sink refuses is terminal), sizes by the limits."""
    effects = call.effects
    assert effects is not None and answer.output is not None
    try:
        call.limits.check_message("the handler's return value", len(answer.output))
        state: dict[str, bytes | None] = {}
        for name, value in answer.state_set.items():
            call.limits.check_state(f"ctx.set({name!r}): the value", len(value))
            state[name] = value
        for name in answer.state_clear:
            state[name] = None
        emits = []
        for em in answer.emits:
            if em.format == "json":
                value: Any = orjson.Fragment(em.value)
            elif em.format == "bytes":
                value = em.value
            else:
                raise ValueError(f"format {em.format!r} is not supported from remote handlers yet")
            emits.append(effects.record(em.topic, value, em.key, em.headers))
    except TerminalError as e:
        return Outcome("terminal", error=e.message)
    except ValueError as e:
        return Outcome("terminal", error=f"ctx.emit: {e}")
    if state and call.state is None:
        return Outcome("terminal", error=f"service {call.service!r} is stateless: the answer writes state")
    return Outcome("completed", value=answer.output, state=state, cleared_all=answer.clear_all, emits=emits)
