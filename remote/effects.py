"""What a handler running in an endpoint may do beyond its journal: every
effect is recorded as data for the processor to apply in its transaction.

`CollectingEffects` implements `oncely.sdk.protocol.Effects` without a
broker: send and call compute the callee's id exactly as the processor does
(`child_id(caller, journal index)`), a sleep records its duration, an emit
is serialized as egress does, and a wait parks (the item is then suspended
by `remote.items`). `EagerState` reads the state the request carried and
raises `NeedState` for a name it did not carry.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable

from oncely.egress.sinks import Sinks
from oncely.errors import TerminalError
from oncely.remote.wire import StateSnapshot, b64
from oncely.sdk.protocol import EmitRecord, Entry
from oncely.shuffle.ids import child_id, format_awakeable, format_id
from oncely.shuffle.targets import Target, resolve

if TYPE_CHECKING:
    from oncely.app import App


class NeedState(BaseException):
    """A state value (or the list of names) the request did not carry.

    A BaseException, like NonDeterminismError, so a handler's `except
    Exception` cannot swallow it: the item answers `need_state` and the
    processor sends it again with those values."""

    def __init__(self, names: list[str], keys: bool = False) -> None:
        super().__init__(f"state not sent: names {names}, keys {keys}")
        self.names = names
        self.keys = keys


class Frozen(BaseException):
    """An effect after the item's answer was decided (suspended, yielded or
    asked for state): the coroutine is being dropped, its effects with it."""


class CollectingEffects:
    """One item's effects, collected as wire data by journal index."""

    __slots__ = ("app", "sinks", "inv_id", "service", "key", "keyed", "log_app", "partition", "ops", "parked",
                 "journal", "upto", "need", "_wake")

    def __init__(self, app: App, sinks: Sinks, inv_id: bytes, service: str, key: bytes | None, keyed: bool,
                 log_app: str, partition: int, wake: Callable[[], None]) -> None:
        self.app = app
        self.sinks = sinks
        self.inv_id = inv_id
        self.service = service
        self.key = key
        self.keyed = keyed
        self.log_app = log_app
        self.partition = partition
        self.ops: dict[int, dict[str, Any]] = {}
        # journal index -> the future its waiter parks on (never completed
        # here: a completion arrives with the next request).
        self.parked: dict[int, asyncio.Future[None]] = {}
        # The invocation's journal (HandlerCall.journal) and its length when
        # the answer was decided: entries past it are not sent.
        self.journal: list[Entry] = []
        self.upto: int | None = None
        self.need: NeedState | None = None
        self._wake = wake

    def _check(self) -> None:
        if self.upto is not None:
            raise Frozen()

    def freeze(self) -> None:
        """No more effects or entries: the item's answer is being made."""
        if self.upto is None:
            self.upto = len(self.journal)

    def record(self, topic: str, value: Any, key: Any, headers: Any) -> EmitRecord:
        """An emitted record, serialized as egress does (JSON unless the app
        declares the topic's sink); the processor checks it against its own."""
        self._check()
        return self.sinks.record(topic, value, key, headers)

    def target(self, target: Any, args: tuple[Any, ...], call: bool) -> Target:
        """Resolve a send/call target; refuse a call to the caller's own
        key, which would wait forever on the key's lock (as in-process)."""
        self._check()
        t = resolve(target, args, self.app.services)
        if call and self.keyed and t.key is not None and (t.service, t.key) == (self.service, self.key):
            raise TerminalError(
                f"ctx.call: {t.service}/{t.key!r} calls its own key; the key stays locked until this "
                "invocation returns, so the call would wait forever. Use ctx.send, or call another key")
        return t

    def _invoke(self, op: str, t: Target, index: int, delay_ms: int | None) -> bytes:
        self._check()
        callee = child_id(self.inv_id, index)
        data: dict[str, Any] = {"op": op, "service": t.service, "handler": t.handler, "key": b64(t.key),
                                "input": {"format": t.payload_format, "data": b64(t.payload)},
                                "callee": format_id(callee)}
        if op == "send":
            data["delay_ms"] = delay_ms or None
        self.ops[index] = data
        return callee

    def send(self, t: Target, index: int, delay_ms: int | None) -> bytes:
        return self._invoke("send", t, index, delay_ms)

    def call(self, t: Target, index: int) -> None:
        """The processor makes the call (remote/apply.py) and knows the partition."""
        self._invoke("call", t, index, None)

    def sleep_until(self, fire_ms: int, index: int) -> None:
        """Timers fire on the processor's clock: it gets the duration."""
        self._check()
        self.ops[index] = {"op": "sleep", "duration_ms": max(0, fire_ms - int(time.time() * 1000)),
                           "fire_ms": fire_ms}

    def awakeable_id(self, index: int) -> str:
        return format_awakeable(self.log_app, self.partition, self.inv_id, index)

    def early_completion(self, index: int, entry: Entry) -> None:
        """Early results live in the processor's store; it applies them when
        it appends this entry."""
        self._check()

    async def wait(self, index: int) -> None:
        """Park: nothing completes an entry within a request."""
        self._check()
        fut = self.parked.get(index)
        if fut is None:
            fut = self.parked[index] = asyncio.get_running_loop().create_future()
        self._wake()
        await fut

    def needs(self, need: NeedState) -> NeedState:
        """Called by the state reader as it raises: the answer is decided."""
        if self.need is None:
            self.need = need
            self.freeze()
            self._wake()
        return self.need


class EagerState:
    """`StateReader` over the state a request carried."""

    __slots__ = ("snapshot", "effects")

    def __init__(self, snapshot: StateSnapshot, effects: CollectingEffects) -> None:
        self.snapshot = snapshot
        self.effects = effects

    def get(self, name: str) -> bytes | None:
        s = self.snapshot
        value = s.values.get(name)
        if value is not None or s.complete or (s.names is not None and name not in s.names):
            return value
        raise self.effects.needs(NeedState([name]))

    def names(self) -> list[str]:
        s = self.snapshot
        if s.complete:
            return sorted(s.values)
        if s.names is not None:
            return list(s.names)
        raise self.effects.needs(NeedState([], keys=True))
