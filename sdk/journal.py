"""The journal/replay engine: the implementation behind `Context`.

Every ctx operation takes the next journal index (`_step`). Below the
journal's length it is a replay: the operation must be the same kind and
name as the entry there (else the invocation has diverged, which pauses it)
and returns the recorded result; beyond it, the operation runs and appends
its entry. State writes stay in an overlay here until the invocation
completes; the runner hands them out with its Outcome.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random as _random
import uuid as _uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable, Generator, NoReturn, TypeVar

import orjson

from oncely.app import Handler
from oncely.context import Context, DurableFuture, KeyedContext
from oncely.errors import NonDeterminismError, TerminalError, UsageError
from oncely.ingest.subscription import SourceRecord
from oncely.sdk.protocol import EmitRecord, Effects, Entry, HandlerCall, decode_value, encode_value
from oncely.shuffle.ids import format_id
from oncely.shuffle.targets import Target

T = TypeVar("T")

# The entries of steps without a result (get, set, emit, ...) are complete
# when made and never change (only incomplete entries are completed), so
# one instance per kind and name serves every journal: no allocation per step.
_SHARED: dict[tuple[str, str], Entry] = {}
SHARED_ENTRIES = 4096  # (state names and topics are few; a handler that makes up names gets its own)


class JournalContext(Context):
    """What every invocation's context does: identity, durable steps,
    output and messaging, journaled. Stateless services get
    `StatelessContext`, keyed ones `KeyedJournalContext`."""

    __slots__ = ("_call", "_journal", "_replay_len", "_index", "_rng", "diverged", "emits", "span")

    def __init__(self, call: HandlerCall) -> None:
        self._call = call
        self._journal = call.journal
        self._replay_len = len(call.journal)
        self._index = 0
        self._rng: _random.Random | None = None
        # The first divergence from the journal; set even when the handler
        # catches the error, so the runner never lets it complete.
        self.diverged: NonDeterminismError | None = None
        self.emits: list[EmitRecord] = []
        # The attempt's OpenTelemetry span (observe.tracing); steps become its events.
        self.span: Any = None

    # -- identity ---------------------------------------------------------------

    @property
    def key(self) -> str | bytes | None:
        return None

    @property
    def raw_key(self) -> bytes | None:
        return None

    @property
    def invocation_id(self) -> str:
        return format_id(self._call.invocation_id)

    @property
    def attempt(self) -> int:
        return self._call.attempt

    @property
    def record(self) -> SourceRecord | None:
        src = self._call.source
        if src is None:
            return None
        return SourceRecord(src["topic"], src["partition"], src["offset"], src["timestamp_ms"], src["key"],
                            tuple((h["name"], h["value"]) for h in src["headers"]))

    @property
    def service(self) -> str:
        return self._call.service

    @property
    def handler(self) -> str:
        return self._call.handler

    # -- journal ----------------------------------------------------------------

    def _step(self, kind: str, name: str = "") -> Entry | None:
        """Take the next journal index; return the recorded entry on replay."""
        if self.diverged is not None:
            raise self.diverged
        i = self._index
        self._index = i + 1
        if self.span is not None:
            self.span.add_event(kind, {"oncely.step.name": name, "oncely.step.index": i,
                                       "oncely.step.replayed": i < self._replay_len})
        if i < self._replay_len:
            entry = self._journal[i]
            if entry.kind != kind or entry.name != name:
                self.diverged = NonDeterminismError(i, entry.describe(), Entry(kind, name).describe())
                raise self.diverged
            return entry
        return None

    def _record(self, entry: Entry) -> None:
        self._journal.append(entry)

    def _op(self, kind: str, name: str = "") -> None:
        """A step whose entry holds no result (get, set, emit, ...): checked
        against the journal on replay, else appended. (`_step` and `_record`
        in one call: the hot path makes three of these per record.)"""
        i = self._index
        if i < self._replay_len or self.diverged is not None or self.span is not None:
            if self._step(kind, name) is None:
                self._record(Entry(kind, name))
            return
        self._index = i + 1
        entry = _SHARED.get((kind, name))
        if entry is None:
            entry = Entry(kind, name)
            if len(_SHARED) < SHARED_ENTRIES:
                _SHARED[(kind, name)] = entry
        self._journal.append(entry)

    def _effects(self, op: str) -> Effects:
        effects = self._call.effects
        if effects is None:
            raise RuntimeError(f"ctx.{op}: this executor has no effects")
        return effects

    def state_changes(self) -> tuple[dict[str, bytes | None], bool]:
        """The invocation's state writes (None = cleared) and whether it
        cleared all state first; the runner's Outcome carries them."""
        return {}, False

    # -- durable steps ------------------------------------------------------------

    async def run(self, name: str, fn: Callable[..., T | Awaitable[T]], *args: Any) -> T:
        entry = self._step("run", name)
        if entry is not None:
            if entry.error is not None:
                raise TerminalError(entry.error)
            return decode_value(entry.value) if entry.value is not None else None  # type: ignore[return-value]
        try:
            if inspect.iscoroutinefunction(fn):
                result = await fn(*args)
            else:
                result = await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
                if inspect.isawaitable(result):
                    result = await result
        except TerminalError as e:
            self._record(Entry("run", name, error=e.message))
            raise
        try:
            encoded = encode_value(result)
        except TypeError as e:
            raise TerminalError(f"ctx.run({name!r}) returned a value that is neither JSON nor bytes: {e}") from None
        if len(encoded) > self._call.limits.state:
            self._call.limits.check_state(f"ctx.run({name!r}): the result", len(encoded))
        self._record(Entry("run", name, value=encoded))
        return decode_value(encoded)  # type: ignore[no-any-return]

    def now(self) -> datetime:
        entry = self._step("now")
        if entry is not None:
            ms = orjson.loads(entry.value)  # type: ignore[arg-type]
        else:
            ms = _now_ms()
            self._record(Entry("now", value=orjson.dumps(ms)))
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)

    def _random(self) -> _random.Random:
        if self._rng is None:
            self._rng = _random.Random(int.from_bytes(self._call.invocation_id, "big"))
        return self._rng

    def random(self) -> float:
        self._op("random")
        return self._random().random()

    def uuid(self) -> _uuid.UUID:
        self._op("uuid")
        return _uuid.UUID(bytes=self._random().randbytes(16), version=4)

    # -- output -------------------------------------------------------------------

    def emit(self, topic: str, value: Any, key: Any = None, headers: Any = None) -> None:
        if self._call.effects is None:
            raise RuntimeError("ctx.emit: this executor has no sinks")
        # A value that cannot be emitted raises before taking an index, so a
        # handler that catches the error replays in step with its journal.
        record = self._call.effects.record(topic, value, key, headers)
        self._op("emit", topic)
        self.emits.append(record)

    # -- messaging and time ---------------------------------------------------------

    def send(self, target: Any, *args: Any, delay: timedelta | float | None = None) -> str:
        delay_ms = _millis(delay) if delay is not None else None
        name = _target_name(target, args)
        # A target that cannot be sent to raises before taking an index, so
        # a handler that catches the error replays in step with its journal.
        resolved = self._resolve("send", target, args, call=False)
        if len(resolved.payload) > self._call.limits.message:
            self._call.limits.check_message(f"ctx.send({name}): the payload", len(resolved.payload))
        entry = self._step("send", name)
        if entry is not None:
            return format_id(entry.value) if entry.value else ""
        callee = self._effects("send").send(resolved, self._index - 1, delay_ms)
        self._record(Entry("send", name, value=callee))
        return format_id(callee)

    def _resolve(self, op: str, target: Any, args: tuple[Any, ...], call: bool) -> Target:
        try:
            return self._effects(op).target(target, args, call=call)
        except TypeError as e:  # a malformed target: a bug in the handler
            raise UsageError(str(e)) from None

    def call(self, target: Any, *args: Any) -> JournalFuture:
        name = _target_name(target, args)
        resolved = self._resolve("call", target, args, call=True)  # raises before taking an index
        if len(resolved.payload) > self._call.limits.message:
            self._call.limits.check_message(f"ctx.call({name}): the payload", len(resolved.payload))
        entry = self._step("call", name)
        index = self._index - 1
        effects = self._effects("call")
        if entry is None:
            entry = Entry("call", name, completed=False)
            entry.partition = effects.call(resolved, index)
            self._record(entry)
        return JournalFuture(effects, index, entry)

    def sleep(self, duration: timedelta | float) -> JournalFuture:
        entry = self._step("sleep")
        index = self._index - 1
        effects = self._effects("sleep")
        if entry is None:
            fire_ms = _now_ms() + _millis(duration)
            entry = Entry("sleep", value=orjson.dumps(fire_ms), completed=False)
            self._record(entry)
            effects.sleep_until(fire_ms, index)
        return JournalFuture(effects, index, entry, has_value=False)

    def awakeable(self) -> tuple[str, JournalFuture]:
        entry = self._step("awakeable")
        index = self._index - 1
        effects = self._effects("awakeable")
        if entry is None:
            entry = Entry("awakeable", completed=False)
            effects.early_completion(index, entry)
            self._record(entry)
        return effects.awakeable_id(index), JournalFuture(effects, index, entry)


class StatelessContext(JournalContext):
    """A stateless service's context. The state methods are not part of its
    type (a type checker flags them); called anyway, they say why not."""

    __slots__ = ()

    def _stateless(self, op: str) -> NoReturn:
        raise UsageError(f"ctx.{op}: service {self._call.service!r} is stateless; state belongs to keyed "
                         "services (app.keyed)")

    def get(self, name: str, default: Any = None) -> NoReturn:
        self._stateless("get")

    def set(self, name: str, value: Any) -> NoReturn:
        self._stateless("set")

    def clear(self, name: str) -> NoReturn:
        self._stateless("clear")

    def clear_all(self) -> NoReturn:
        self._stateless("clear_all")

    def state_keys(self) -> NoReturn:
        self._stateless("state_keys")


class KeyedJournalContext(JournalContext, KeyedContext):
    """A keyed service's context: the key's committed state (read through
    `HandlerCall.state`) overlaid with this invocation's own writes."""

    __slots__ = ("_writes", "_cleared_all")

    def __init__(self, call: HandlerCall) -> None:
        JournalContext.__init__(self, call)  # (not super(), whose lookup costs once per record)
        self._writes: dict[str, bytes | None] = {}
        self._cleared_all = False

    @property
    def key(self) -> str | bytes | None:
        raw = self._call.key
        if raw is None:
            return None
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return raw

    @property
    def raw_key(self) -> bytes | None:
        return self._call.key

    def state_changes(self) -> tuple[dict[str, bytes | None], bool]:
        return self._writes, self._cleared_all

    def get(self, name: str, default: Any = None) -> Any:
        self._op("get", name)
        writes = self._writes
        if name in writes:
            raw = writes[name]
        elif self._cleared_all or (state := self._call.state) is None:
            raw = None
        else:
            raw = state.get(name)  # committed, through the store's overlays
        return default if raw is None else decode_value(raw)

    def set(self, name: str, value: Any) -> None:
        if not isinstance(name, str) or not name:
            raise UsageError("ctx.set: the state name must be a non-empty str")
        try:
            encoded = encode_value(value)
        except TypeError as e:
            raise UsageError(f"ctx.set({name!r}): the value is neither JSON-serialisable nor bytes: {e}") from None
        limits = self._call.limits
        if len(encoded) > limits.state:  # (the message is made only when it is needed)
            limits.check_state(f"ctx.set({name!r}): the value", len(encoded))
        self._op("set", name)
        self._writes[name] = encoded

    def clear(self, name: str) -> None:
        self._op("clear", name)
        self._writes[name] = None

    def clear_all(self) -> None:
        self._op("clear_all")
        self._writes = {}
        self._cleared_all = True

    def state_keys(self) -> list[str]:
        self._op("state_keys")
        state = self._call.state
        names = set() if self._cleared_all or state is None else set(state.names())
        for n, v in self._writes.items():
            if v is None:
                names.discard(n)
            else:
                names.add(n)
        return sorted(names)


def context_for(call: HandlerCall, keyed: bool) -> JournalContext:
    """The context of an invocation of a keyed or a stateless service."""
    return KeyedJournalContext(call) if keyed else StatelessContext(call)


class JournalFuture(DurableFuture):
    """A DurableFuture on a journal entry: completed entries (replayed, or
    completed while the handler ran) resolve at once, others wait through
    the effects."""

    __slots__ = ("_effects", "_index", "_entry", "_has_value")

    def __init__(self, effects: Effects, index: int, entry: Entry, has_value: bool = True) -> None:
        self._effects = effects
        self._index = index
        self._entry = entry
        self._has_value = has_value

    @property
    def done(self) -> bool:
        return self._entry.completed

    def __await__(self) -> Generator[Any, None, Any]:
        entry = self._entry
        if not entry.completed:
            yield from self._effects.wait(self._index).__await__()
        if entry.error is not None:
            raise TerminalError(entry.error)
        if not self._has_value or entry.value is None:
            return None
        return decode_value(entry.value)


def _now_ms() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1000)


def _millis(d: timedelta | float) -> int:
    seconds = d.total_seconds() if isinstance(d, timedelta) else float(d)
    if seconds < 0:
        raise UsageError("a duration must not be negative")
    return int(seconds * 1000)


def _target_name(target: Any, args: tuple[Any, ...]) -> str:
    """service/handler of a send or call target, for the journal."""
    if isinstance(target, Handler):
        return f"{target.service.name}/{target.name}"
    if isinstance(target, str) and len(args) >= 2 and isinstance(args[1], str):
        return f"{target}/{args[1]}"
    raise UsageError('a target is a handler (e.g. cart.expire) or ("service", key, "handler", payload)')
