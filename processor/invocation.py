"""An invocation in memory, its phases, and the seam partitions write through.

Only invocations that run (or wait, back off, or are paused) live in memory;
queued ones live in the store's inbox (inbox.py) and suspended ones in its
status records, until a key, capacity or a completion brings them back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from oncely.sdk.protocol import Entry, Running

# Phases, as the store and `lookup` report them.
INBOXED = "INBOXED"          # queued in the store (for its key or for capacity)
RUNNING = "RUNNING"
BACKING_OFF = "BACKING_OFF"  # failed an attempt; a retry timer starts it again
PAUSED = "PAUSED"            # non-deterministic or not runnable: retried on restart; paused by an operator (held): until resumed
SUSPENDED = "SUSPENDED"      # waiting, only in the store
COMPLETED = "COMPLETED"
FAILED = "FAILED"


def now_ms() -> int:
    return int(time.time() * 1000)


class TxnOutput(Protocol):
    """Adds records to the open Kafka transaction."""

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]] | None = None, partition: int | None = None,
                owner: bytes | None = None) -> None:
        """`owner`: the invocation the record belongs to (it fails, and
        nothing else, when the record can never be produced)."""

    def fault(self, inv_id: bytes, why: str) -> None:
        """An invocation's outcome could not be applied: abort the open
        transaction; the invocation fails with `why` when it next starts."""


class _Starting:
    """`Invocation.running` while the executor runs its first step: an
    invocation that ends in it never joins the writer or the active set."""

    def cancel(self) -> None:
        pass


STARTING = _Starting()


@dataclass(eq=False, slots=True, init=False)
class Invocation:
    id: bytes
    invoke: dict[str, Any]
    sk: bytes | None               # (service, key) for keyed targets
    seq: int                       # log offset of the Invoke (a local start: the read position)
    phase: str = RUNNING
    attempt: int = 0
    retry_at_ms: int = 0
    error: str | None = None
    journal: list[Entry] = field(default_factory=list)
    running: Running | None = None
    run: int = 0  # which start its outcome belongs to; a control that stops a run moves it on
    awaiting: list[int] = field(default_factory=list)  # journal indexes its coroutine awaits right now
    progress_mark: int = 0  # journal length when it was last seen to progress
    has_early: bool = False  # completions that arrived before their entry
    started: float = 0.0  # monotonic start of its current attempt (metrics)
    held: bool = False       # paused by an operator (controls.py): not restarted on load
    cancelled: bool = False  # cancelled while awaiting nothing: its next await fails (controls.py)
    deployment: str | None = None  # remote deployment it is pinned to (persisted in its status)

    def __init__(self, id: bytes, invoke: dict[str, Any], sk: bytes | None, seq: int, phase: str = RUNNING,
                 attempt: int = 0, retry_at_ms: int = 0, error: str | None = None, held: bool = False,
                 cancelled: bool = False, deployment: str | None = None) -> None:
        # (Written out: the generated one calls a factory for each list, once per record.)
        # A new field is set here too (test_units checks that every field is).
        self.id = id
        self.invoke = invoke
        self.sk = sk
        self.seq = seq
        self.phase = phase
        self.attempt = attempt
        self.retry_at_ms = retry_at_ms
        self.error = error
        self.journal = []
        self.running = None
        self.run = 0
        self.awaiting = []
        self.progress_mark = 0
        self.has_early = False
        self.started = 0.0
        self.held = held
        self.cancelled = cancelled
        self.deployment = deployment

    @property
    def waiting(self) -> bool:
        return bool(self.awaiting)

    @property
    def target(self) -> str:
        return f"{self.invoke['service']}/{self.invoke['handler']}"


@dataclass
class PartitionStats:
    accepted: int = 0
    duplicates: int = 0
    completed: int = 0
    failed: int = 0
    retries: int = 0
    paused: int = 0
    resumed: int = 0
    timers_fired: int = 0
    suspensions: int = 0
    responses: int = 0
    inboxed: int = 0          # Invokes that waited in the store's inbox
    local_starts: int = 0     # subscribed records started without the log (local_start.py)
    pressure_suspensions: int = 0  # waiting invocations suspended to make room
