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
