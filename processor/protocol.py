"""The boundary between the partition processor and handler execution.

In: an invocation (target, payload, attempt), its journal so far and read
access to its key's committed state. Out: new journal entries (appended to
the same journal as they happen), the invocation's state changes and its
outcome. The in-process executor and remote (HTTP/serverless) handlers
implement the same boundary, so the processor never knows which ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

from oncely import schemas

# Tags of encoded state values: JSON (orjson) or raw bytes. Never pickle.
TAG_JSON = b"j"
TAG_BYTES = b"b"


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

    def describe(self) -> str:
        return f"{self.kind}({self.name!r})" if self.name else f"{self.kind}()"

    def encode(self) -> bytes:
        """The store (and changelog) form: a JournalEntry record."""
        return schemas.encode("journal_entry", {"kind": self.kind, "name": self.name, "completed": self.completed,
                                                "value": self.value, "error": self.error})

    @classmethod
    def decode(cls, raw: bytes) -> "Entry":
        e = schemas.decode("journal_entry", raw)
        return cls(e["kind"], e["name"], e["value"], e["error"], e["completed"])


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
            from oncely.errors import RecordTooLarge

            raise RecordTooLarge(what, size, self.state, self.changelog_topic)

    def check_message(self, what: str, size: int) -> None:
        if size > self.message:
            from oncely.errors import RecordTooLarge

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


@dataclass(slots=True)
class HandlerCall:
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
    # The processor's hooks for effects: `effects.record(topic, value, key,
    # headers)` turns an emit into a complete record (egress.sinks.Sinks).
    effects: Any = None
    limits: Limits = Limits()


OutcomeStatus = Literal["completed", "terminal", "retry", "paused"]


@dataclass(slots=True)
class Outcome:
    status: OutcomeStatus
    value: bytes | None = None
    error: str | None = None
    # name -> encoded value, None = cleared; applied only when completed.
    state: dict[str, bytes | None] = field(default_factory=dict)
    cleared_all: bool = False
    # Records to produce (topic, key, value, headers), in emit order; like
    # state, produced only when the invocation completes.
    emits: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]] | None]] = field(default_factory=list)


class Running(Protocol):
    def cancel(self) -> Any: ...


class Executor(Protocol):
    def start(self, call: HandlerCall, done: Callable[[Outcome], None]) -> Running:
        """Start (or resume, replaying `call.journal`) an invocation; call
        `done` exactly once with its outcome unless cancelled first."""
        ...
