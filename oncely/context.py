"""The handler API: `Context`, `KeyedContext`, `DurableFuture`, `gather`.

Abstract, like Restate's SDK keeps its context apart from the engine: a
handler of a stateless service gets a `Context`, a handler of a keyed service
a `KeyedContext` (which adds the key's state), so `ctx.get` in a stateless
handler shows in a type checker. The journal/replay engine that implements
them is `oncely.sdk.journal`.

Every ctx operation takes the next journal index. On a replay (after a crash,
a retry or a rewind) an operation at an index the journal already holds must
be the same kind and name, and returns the recorded result without running
anything again; a different operation pauses the invocation.
"""

from __future__ import annotations

import abc
import asyncio
import uuid as _uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Generator, TypeVar

if TYPE_CHECKING:
    from oncely.ingest.subscription import SourceRecord

T = TypeVar("T")


class DurableFuture(abc.ABC):
    """The result of a journaled wait (call, sleep, awakeable). Its journal
    index is taken when it is created, so creating several and awaiting
    them in any order (or with `oncely.gather`) replays deterministically."""

    __slots__ = ()

    @property
    @abc.abstractmethod
    def done(self) -> bool:
        """Whether the result is there (awaiting it does not wait)."""

    @abc.abstractmethod
    def __await__(self) -> Generator[Any, None, Any]:
        """The result; a callee's TerminalError or a rejection is raised."""


class Context(abc.ABC):
    """Handed to every handler invocation as its first argument."""

    __slots__ = ()

    # -- identity ---------------------------------------------------------------

    @property
    @abc.abstractmethod
    def key(self) -> str | bytes | None:
        """The object key: str when it is UTF-8, else the raw bytes; None for
        stateless services."""

    @property
    @abc.abstractmethod
    def raw_key(self) -> bytes | None:
        """The object key as bytes; None for stateless services."""

    @property
    @abc.abstractmethod
    def invocation_id(self) -> str:
        """This invocation's id (stable across retries and replays)."""

    @property
    @abc.abstractmethod
    def attempt(self) -> int:
        """0 on the first attempt, then 1, 2, … on retries."""

    @property
    @abc.abstractmethod
    def record(self) -> SourceRecord | None:
        """The source record this invocation came from (a subscription), with
        topic, partition, offset, timestamp, key (bytes) and headers; None for
        invocations that did not come from a topic."""

    @property
    @abc.abstractmethod
    def service(self) -> str: ...

    @property
    @abc.abstractmethod
    def handler(self) -> str: ...

    # -- durable steps ------------------------------------------------------------

    @abc.abstractmethod
    async def run(self, name: str, fn: Callable[..., T | Awaitable[T]], *args: Any) -> T:
        """Run a side effect once: its result (JSON or bytes) is journaled and
        returned again on replay without calling `fn`. A TerminalError from
        `fn` is journaled too; any other exception fails the attempt, which is
        retried (and `fn` runs again).

        An `async def` fn runs on the event loop; a plain function runs in a
        worker thread, so a long blocking step (an HTTP call with requests, a
        file, a sleep) does not stop the other invocations or the commits."""

    @abc.abstractmethod
    def now(self) -> datetime:
        """The current time, journaled: a replay sees the same instant."""

    @abc.abstractmethod
    def random(self) -> float:
        """A float in [0, 1), deterministic per invocation (seeded from its id)."""

    @abc.abstractmethod
    def uuid(self) -> _uuid.UUID:
        """A UUID4, deterministic per invocation (seeded from its id)."""

    # -- output -------------------------------------------------------------------

    @abc.abstractmethod
    def emit(self, topic: str, value: Any, key: Any = None, headers: Any = None) -> None:
        """Produce a record to a user topic, serialized by the topic's sink
        format (JSON unless declared with app.sink). It is produced in the
        transaction that completes this invocation, once: a replay does not
        emit again, and an invocation that fails emits nothing. A value that
        does not fit the format raises ValueError here."""

    # -- messaging and time ---------------------------------------------------------

    @abc.abstractmethod
    def send(self, target: Any, *args: Any, delay: timedelta | float | None = None) -> str:
        """Invoke another handler one-way, exactly once: `send(handler, key,
        payload)`, `send(handler, payload)` for a stateless service, or
        `send("service", key, "handler", payload)`. The Invoke is produced in
        this invocation's transaction (or, with `delay`, by a durable timer of
        this partition); a replay does not send again. Returns the callee's
        invocation id."""

    @abc.abstractmethod
    def call(self, target: Any, *args: Any) -> DurableFuture:
        """Invoke another handler and get its result: `await ctx.call(handler,
        key, payload)` (or by name, like `send`). The Invoke is produced in
        this invocation's transaction; the callee's result (or its
        TerminalError) comes back as a Response on this partition and is
        journaled, so a replay gets it without calling again. The call is
        issued at once; await the returned future when the result is needed
        (or pass several to `oncely.gather`)."""

    @abc.abstractmethod
    def sleep(self, duration: timedelta | float) -> DurableFuture:
        """A durable sleep: a timer of this partition wakes the invocation,
        also after a restart or on another process. Await the result."""

    @abc.abstractmethod
    def awakeable(self) -> tuple[str, DurableFuture]:
        """An id that something outside completes, with
        `Client.resolve_awakeable(id, value)` or `.reject_awakeable(id,
        reason)`, and the future that yields the value (or raises the
        rejection as TerminalError). The id is stable across replays."""


class KeyedContext(Context):
    """The context of a keyed service's handler: a `Context` plus the key's
    state. Values are JSON-serialisable or bytes."""

    __slots__ = ()

    @abc.abstractmethod
    def get(self, name: str, default: Any = None) -> Any:
        """The key's state value `name`, or `default`."""

    @abc.abstractmethod
    def set(self, name: str, value: Any) -> None:
        """Set a state value (JSON-serialisable, or bytes). Visible to this
        invocation at once and to others when it completes."""

    @abc.abstractmethod
    def clear(self, name: str) -> None:
        """Remove the state value `name`."""

    @abc.abstractmethod
    def clear_all(self) -> None:
        """Remove every state value of the key."""

    @abc.abstractmethod
    def state_keys(self) -> list[str]:
        """The names of the key's state values, sorted."""


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
