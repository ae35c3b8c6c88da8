"""The boundary between the partition processor and handler execution.

In: an invocation (target, payload, attempt), its journal so far, read access
to its key's committed state and the `Effects` it may cause beyond its state.
Out: new journal entries (appended to the same journal as they happen), the
invocation's state changes and its outcome. The in-process executor and
remote (HTTP/serverless) handlers implement the same boundary, so the
processor never knows which ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

import orjson

from oncely import schemas
from oncely.errors import RecordTooLarge

if TYPE_CHECKING:
    from oncely.shuffle.targets import Target

# Tags of encoded state values: JSON (orjson) or raw bytes. Never pickle.
TAG_JSON = b"j"
TAG_BYTES = b"b"


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


@dataclass(slots=True)
class Entry:
    """One journaled ctx operation.

    `kind` and `name` identify the operation for the determinism check;
    `value`/`error` hold a recorded result (JSON bytes / terminal failure
    message) for operations whose result is not deterministic.
    """

    kind: str
    name: str = ""
    value: bytes | None = None
    error: str | None = None
    completed: bool = True
    partition: int | None = None  # a call: the callee's log partition (controls.py: cancel and kill reach it)

    def describe(self) -> str:
        return f"{self.kind}({self.name!r})" if self.name else f"{self.kind}()"

    def encode(self) -> bytes:
        """The store (and changelog) form: a JournalEntry record."""
        e = {"kind": self.kind, "name": self.name, "completed": self.completed, "value": self.value,
             "error": self.error}
        if self.partition is not None:
            e["partition"] = self.partition
        return schemas.encode("journal_entry", e)

    @classmethod
    def decode(cls, raw: bytes) -> "Entry":
        e = schemas.decode("journal_entry", raw)
        return cls(e["kind"], e["name"], e["value"], e["error"], e["completed"], e.get("partition"))


# Bytes of a record that are not its value: key, headers, batch overhead.
RECORD_OVERHEAD = 1024
CLIENT_MAX_BYTES = 1_000_000  # librdkafka's default message.max.bytes


@dataclass(frozen=True, slots=True)
class Limits:
    """The largest value a handler may make, per destination: state values,
    step results and a handler's result are changelog records; send and call
    payloads travel on the log and are kept in the callee's status record."""

    changelog_topic: str = "changelog"
    state: int = CLIENT_MAX_BYTES - RECORD_OVERHEAD
    log_topic: str = "log"
    message: int = CLIENT_MAX_BYTES - RECORD_OVERHEAD

    def check_state(self, what: str, size: int) -> None:
        if size > self.state:
            raise RecordTooLarge(what, size, self.state, self.changelog_topic)

    def check_message(self, what: str, size: int) -> None:
        if size > self.message:
            raise RecordTooLarge(what, size, self.message, self.log_topic)


def limits_for(changelog_topic: str, log_topic: str, topic_max: dict[str, int], client_max: int) -> Limits:
    """Limits from the topics' max.message.bytes and the client's own."""

    def room(topic: str) -> int:
        return min(client_max, topic_max.get(topic, client_max)) - RECORD_OVERHEAD

    return Limits(changelog_topic, room(changelog_topic), log_topic, min(room(log_topic), room(changelog_topic)))


class StateReader(Protocol):
    """Committed state of one key (before this invocation's own writes)."""

    def get(self, name: str) -> bytes | None: ...

    def names(self) -> list[str]: ...


Headers = list[tuple[str, bytes]]
# A record to produce to a user topic: (topic, key, value, headers).
EmitRecord = tuple[str, bytes | None, bytes, Headers | None]


class Effects(Protocol):
    """What a running invocation may do beyond its own state and journal:
    the processor implements it (processor.effects.InvocationEffects) by
    joining its open transaction, its timers and its waits."""

    def record(self, topic: str, value: Any, key: Any, headers: Any) -> EmitRecord:
        """`ctx.emit`'s complete record (egress.sinks), or ValueError."""
        ...

    def target(self, target: Any, args: tuple[Any, ...], call: bool) -> Target:
        """Resolve a send/call target (TypeError when malformed, or
        TerminalError for a call the processor refuses)."""
        ...

    def send(self, t: Target, index: int, delay_ms: int | None) -> bytes:
        """Send (or schedule) an Invoke for journal entry `index`; the
        callee's invocation id."""
        ...

    def call(self, t: Target, index: int) -> int | None:
        """Send an Invoke whose Response completes journal entry `index`;
        the callee's log partition (None where the executor does not know it)."""
        ...

    def sleep_until(self, fire_ms: int, index: int) -> None:
        """A timer that completes journal entry `index` at `fire_ms`."""
        ...

    def awakeable_id(self, index: int) -> str:
        """The public id of the awakeable at journal entry `index`."""
        ...

    def early_completion(self, index: int, entry: Entry) -> None:
        """Complete a new awakeable `entry` whose result arrived first."""
        ...

    async def wait(self, index: int) -> None:
        """Return when the journal entry at `index` has completed."""
        ...


# HandlerCall.input when the handler's input must be decoded from the payload.
NOT_DECODED: Any = object()


@dataclass(slots=True)
class HandlerCall:
    # PartitionProcessor.start builds it positionally (the hot path): a new
    # field goes last, or that call changes with it (a unit test checks the order).
    invocation_id: bytes
    service: str
    handler: str
    key: bytes | None
    payload: bytes
    payload_format: str
    attempt: int
    journal: list[Entry]
    state: StateReader | None
    source: dict[str, Any] | None = None
    # Set when the payload is a source record's raw value that the named
    # subscription's decoder turns into the handler's input.
    subscription: str | None = None
    # None where nothing beyond state is possible (ctx.emit, send, call,
    # sleep and awakeable then fail).
    effects: Effects | None = None
    limits: Limits = Limits()
    # The Invoke's W3C traceparent and creation time (observe.tracing).
    traceparent: str | None = None
    created_at_ms: int | None = None
    # The remote deployment the invocation is pinned to (remote handlers):
    # None until an answer of one was applied.
    deployment: str | None = None
    # The handler's input as the subscription's route already decoded it
    # (its first run only: a retry decodes `payload` again, since a handler
    # may have changed the object); NOT_DECODED otherwise.
    input: Any = NOT_DECODED


OutcomeStatus = Literal["completed", "terminal", "retry", "paused"]


@dataclass(slots=True)
class Outcome:
    status: OutcomeStatus
    value: bytes | None = None
    error: str | None = None
    # name -> encoded value, None = cleared; applied only when completed.
    state: dict[str, bytes | None] = field(default_factory=dict)
    cleared_all: bool = False
    # Records to produce, in emit order; like state, produced only when the
    # invocation completes.
    emits: list[EmitRecord] = field(default_factory=list)


class Running(Protocol):
    def cancel(self) -> Any: ...


class Executor(Protocol):
    def start(self, call: HandlerCall, done: Callable[[Outcome], None]) -> Running | None:
        """Start (or resume, replaying `call.journal`) an invocation; call
        `done` exactly once with its outcome unless cancelled first. None:
        it already ended, and `done` was called before `start` returned."""
        ...
