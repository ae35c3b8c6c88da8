"""`Context`: what a handler uses to touch the world durably.

Every ctx operation takes the next journal index. On a replay (after a crash,
a retry or a rewind) an operation at an index the journal already holds must
be the same kind and name, and returns the recorded result without running
anything again; a different operation pauses the invocation.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random as _random
import uuid as _uuid
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

import orjson

from oncely.errors import NonDeterminismError, TerminalError, UsageError
from oncely.processor.protocol import TAG_BYTES, TAG_JSON, Entry, HandlerCall
from oncely.shuffle.ids import format_id

if TYPE_CHECKING:
    from oncely.ingest.subscription import SourceRecord

T = TypeVar("T")


def encode_value(value: Any) -> bytes:
    """State values and step results: bytes stay bytes, the rest is JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return TAG_BYTES + bytes(value)
    return TAG_JSON + orjson.dumps(value)


def decode_value(data: bytes) -> Any:
    tag, body = data[:1], data[1:]
    if tag == TAG_JSON:
        return orjson.loads(body)
    if tag == TAG_BYTES:
        return body
    raise ValueError(f"unknown value tag {tag!r}")


class Context:
    """Handed to every handler invocation as its first argument."""

    __slots__ = ("_call", "_journal", "_replay_len", "_index", "_writes", "_cleared_all",
                 "_rng", "diverged", "_keyed", "_emits")

    def __init__(self, call: HandlerCall, keyed: bool) -> None:
        self._call = call
        self._journal = call.journal
        self._replay_len = len(call.journal)
        self._index = 0
        self._writes: dict[str, bytes | None] = {}
        self._cleared_all = False
        self._rng: _random.Random | None = None
        self.diverged: NonDeterminismError | None = None
        self._keyed = keyed
        self._emits: list = []

    # -- identity ---------------------------------------------------------------

    @property
    def key(self) -> str | bytes | None:
        """The object key: str when it is UTF-8, else the raw bytes; None for
        stateless services."""
        raw = self._call.key
        if raw is None or not self._keyed:
            return None
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return raw

    @property
    def raw_key(self) -> bytes | None:
        return self._call.key if self._keyed else None

    @property
    def invocation_id(self) -> str:
        return format_id(self._call.invocation_id)

    @property
    def attempt(self) -> int:
        """0 on the first attempt, then 1, 2, … on retries."""
        return self._call.attempt

    @property
    def record(self) -> "SourceRecord | None":
        """The source record this invocation came from (a subscription), with
        topic, partition, offset, timestamp, key (bytes) and headers; None for
        invocations that did not come from a topic."""
        src = self._call.source
        if src is None:
            return None
        from oncely.ingest.subscription import SourceRecord

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
        if i < self._replay_len:
            entry = self._journal[i]
            if entry.kind != kind or entry.name != name:
                self.diverged = NonDeterminismError(i, entry.describe(), Entry(kind, name).describe())
                raise self.diverged
            return entry
        return None

    def _record(self, entry: Entry) -> None:
        self._journal.append(entry)

    # -- state ------------------------------------------------------------------

    def _require_state(self, op: str) -> None:
        if not self._keyed:
            raise UsageError(
                f"ctx.{op}: service {self._call.service!r} is stateless; state belongs to keyed "
                "services (app.keyed)"
            )

    def get(self, name: str, default: Any = None) -> Any:
        """The key's state value `name`, or `default`."""
        self._require_state("get")
        if self._step("get", name) is None:
            self._record(Entry("get", name))
        if name in self._writes:
            raw = self._writes[name]
        elif self._cleared_all:
            raw = None
        else:
            raw = self._call.state.get(name)  # type: ignore[union-attr]
        return default if raw is None else decode_value(raw)

    def set(self, name: str, value: Any) -> None:
        """Set a state value (JSON-serialisable, or bytes). Visible to this
        invocation at once and to others when it completes."""
        self._require_state("set")
        if not isinstance(name, str) or not name:
            raise UsageError("ctx.set: the state name must be a non-empty str")
        try:
            encoded = encode_value(value)
        except TypeError as e:
            raise UsageError(f"ctx.set({name!r}): the value is neither JSON-serialisable nor bytes: {e}") from None
        self._call.limits.check_state(f"ctx.set({name!r}): the value", len(encoded))
        if self._step("set", name) is None:
            self._record(Entry("set", name))
        self._writes[name] = encoded

    def clear(self, name: str) -> None:
        self._require_state("clear")
        if self._step("clear", name) is None:
            self._record(Entry("clear", name))
        self._writes[name] = None

    def clear_all(self) -> None:
        self._require_state("clear_all")
        if self._step("clear_all") is None:
            self._record(Entry("clear_all"))
        self._writes = {}
        self._cleared_all = True

    def state_keys(self) -> list[str]:
        self._require_state("state_keys")
        if self._step("state_keys") is None:
            self._record(Entry("state_keys"))
        names = set() if self._cleared_all else set(self._call.state.names())  # type: ignore[union-attr]
        for n, v in self._writes.items():
            if v is None:
                names.discard(n)
            else:
                names.add(n)
        return sorted(names)

    # -- durable steps ------------------------------------------------------------

    async def run(self, name: str, fn: Callable[..., T | Awaitable[T]], *args: Any) -> T:
        """Run a side effect once: its result (JSON or bytes) is journaled and
        returned again on replay without calling `fn`. A TerminalError from
        `fn` is journaled too; any other exception fails the attempt, which is
        retried (and `fn` runs again).

        An `async def` fn runs on the event loop; a plain function runs in a
        worker thread, so a long blocking step (an HTTP call with requests, a
        file, a sleep) does not stop the other invocations or the commits."""
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
        self._call.limits.check_state(f"ctx.run({name!r}): the result", len(encoded))
        self._record(Entry("run", name, value=encoded))
        return decode_value(encoded)

    def now(self) -> datetime:
        """The current time, journaled: a replay sees the same instant."""
        entry = self._step("now")
        if entry is not None:
            ms = orjson.loads(entry.value)  # type: ignore[arg-type]
        else:
            ms = int(datetime.now(timezone.utc).timestamp() * 1000)
            self._record(Entry("now", value=orjson.dumps(ms)))
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)

    def _random(self) -> _random.Random:
        if self._rng is None:
            self._rng = _random.Random(int.from_bytes(self._call.invocation_id, "big"))
        return self._rng

    def random(self) -> float:
        """A float in [0, 1), deterministic per invocation (seeded from its id)."""
        if self._step("random") is None:
            self._record(Entry("random"))
        return self._random().random()

    def uuid(self) -> _uuid.UUID:
        """A UUID4, deterministic per invocation (seeded from its id)."""
        if self._step("uuid") is None:
            self._record(Entry("uuid"))
        return _uuid.UUID(bytes=self._random().randbytes(16), version=4)

    # -- output -------------------------------------------------------------------

    def emit(self, topic: str, value: Any, key: Any = None, headers: Any = None) -> None:
        """Produce a record to a user topic, serialized by the topic's sink
        format (JSON unless declared with app.sink). It is produced in the
        transaction that completes this invocation, once: a replay does not
        emit again, and an invocation that fails emits nothing. A value that
        does not fit the format raises ValueError here."""
        if self._call.effects is None:
            raise RuntimeError("ctx.emit: this executor has no sinks")
        # A value that cannot be emitted raises before taking an index, so a
        # handler that catches the error replays in step with its journal.
        record = self._call.effects.record(topic, value, key, headers)
        is_new = self._step("emit", topic) is None
        if is_new:
            self._record(Entry("emit", topic))
        self._emits.append(record)

    # -- messaging and time ---------------------------------------------------------

    def send(self, target: Any, *args: Any, delay: timedelta | float | None = None) -> str:
        """Invoke another handler one-way, exactly once: `send(handler, key,
        payload)`, `send(handler, payload)` for a stateless service, or
        `send("service", key, "handler", payload)`. The Invoke is produced in
        this invocation's transaction (or, with `delay`, by a durable timer of
        this partition); a replay does not send again. Returns the callee's
        invocation id."""
        delay_ms = _millis(delay) if delay is not None else None
        name = _target_name(target, args)
        # A target that cannot be sent to raises before taking an index, so
        # a handler that catches the error replays in step with its journal.
        resolved = self._resolve(target, args, call=False)
        self._call.limits.check_message(f"ctx.send({name}): the payload", len(resolved.payload))
        entry = self._step("send", name)
        if entry is not None:
            return format_id(entry.value) if entry.value else ""
        index = self._index - 1
        callee = self._call.effects.send(resolved, index, delay_ms)
        self._record(Entry("send", name, value=callee))
        return format_id(callee)

    def _resolve(self, target: Any, args: tuple, call: bool) -> Any:
        try:
            return self._call.effects.target(target, args, call=call)
        except TypeError as e:  # a malformed target: a bug in the handler
            raise UsageError(str(e)) from None

    def call(self, target: Any, *args: Any) -> "DurableFuture":
        """Invoke another handler and get its result: `await ctx.call(handler,
        key, payload)` (or by name, like `send`). The Invoke is produced in
        this invocation's transaction; the callee's result (or its
        TerminalError) comes back as a Response on this partition and is
        journaled, so a replay gets it without calling again. The call is
        issued at once; await the returned future when the result is needed
        (or pass several to `oncely.gather`)."""
        name = _target_name(target, args)
        resolved = self._resolve(target, args, call=True)  # raises before taking an index
        self._call.limits.check_message(f"ctx.call({name}): the payload", len(resolved.payload))
        entry = self._step("call", name)
        index = self._index - 1
        if entry is None:
            entry = Entry("call", name, completed=False)
            self._call.effects.call(resolved, index)
            self._record(entry)
        return DurableFuture(self, index, entry)

    def sleep(self, duration: timedelta | float) -> "DurableFuture":
        """A durable sleep: a timer of this partition wakes the invocation,
        also after a restart or on another process. Await the result."""
        entry = self._step("sleep")
        index = self._index - 1
        if entry is None:
            fire_ms = int(datetime.now(timezone.utc).timestamp() * 1000) + _millis(duration)
            entry = Entry("sleep", value=orjson.dumps(fire_ms), completed=False)
            self._record(entry)
            self._call.effects.sleep_until(fire_ms, index)
        return DurableFuture(self, index, entry, has_value=False)

    def awakeable(self) -> tuple[str, "DurableFuture"]:
        """An id that something outside completes, with
        `Client.resolve_awakeable(id, value)` or `.reject_awakeable(id,
        reason)`, and the future that yields the value (or raises the
        rejection as TerminalError). The id is stable across replays."""
        entry = self._step("awakeable")
        index = self._index - 1
        effects = self._call.effects
        if entry is None:
            entry = Entry("awakeable", completed=False)
            effects.early_completion(index, entry)
            self._record(entry)
        return effects.awakeable_id(index), DurableFuture(self, index, entry)

    # -- for the executor ---------------------------------------------------------

    def _state_changes(self) -> tuple[dict[str, bytes | None], bool]:
        return self._writes, self._cleared_all


class DurableFuture:
    """The result of a journaled wait (call, sleep, awakeable). Its journal
    index is taken when it is created, so creating several and awaiting
    them in any order (or with `oncely.gather`) replays deterministically."""

    __slots__ = ("_ctx", "_index", "_entry", "_has_value")

    def __init__(self, ctx: Context, index: int, entry: Entry, has_value: bool = True) -> None:
        self._ctx = ctx
        self._index = index
        self._entry = entry
        self._has_value = has_value

    @property
    def done(self) -> bool:
        return self._entry.completed

    def __await__(self) -> Any:
        entry = self._entry
        if not entry.completed:
            yield from self._ctx._call.effects.wait(self._index).__await__()
        if entry.error is not None:
            raise TerminalError(entry.error)
        if not self._has_value or entry.value is None:
            return None
        return decode_value(entry.value)


async def gather(*futures: Awaitable[Any]) -> list[Any]:
    """Await several calls, sleeps and awakeables concurrently and return
    their results in argument order. Every one of them settles first; then
    the first failure in argument order (a TerminalError of a callee or a
    rejected awakeable) is raised. Pass ctx futures: coroutines that issue
    ctx operations themselves would journal in scheduling order."""
    results = await asyncio.gather(*futures, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, Exception):
            raise r  # non-determinism or cancellation wins over failures
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)


def _millis(d: "timedelta | float") -> int:
    seconds = d.total_seconds() if isinstance(d, timedelta) else float(d)
    if seconds < 0:
        raise UsageError("a duration must not be negative")
    return int(seconds * 1000)


def _target_name(target: Any, args: tuple) -> str:
    """service/handler of a send or call target, for the journal."""
    from oncely.app import Handler

    if isinstance(target, Handler):
        return f"{target.service.name}/{target.name}"
    if isinstance(target, str) and len(args) >= 2 and isinstance(args[1], str):
        return f"{target}/{args[1]}"
    raise UsageError('a target is a handler (e.g. cart.expire) or ("service", key, "handler", payload)')
