"""The durable inbox: invocations that wait, in the store, in log order.

An Invoke that cannot start when it is read waits in the partition's store
instead of in memory: behind a busy key (a key inbox, `INBOX` keys) or for
capacity (the ready queue, `READY` keys, when `max_inflight_per_partition`
invocations are in memory). The queue entry holds the Invoke; one with an
idempotency key (the only kind that can arrive twice) is also marked under
`QUEUED` by id, so a duplicate is recognised while it waits. Only a short head of each queue is
in memory, so neither a hot key nor a backlog of callers grows memory, and
the log itself is never paused: Responses, awakeable results and timers
always apply.

Sequence numbers are log offsets, so key order is log order.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from oncely import schemas
from oncely.processor import keys
from oncely.processor.invocation import INBOXED
from oncely.processor.store import PartitionStore

# Queue entries kept in memory per queue (read from the store in batches of this).
WINDOW = 32


class StoreQueue:
    """A FIFO of queue records (see `queue_record`) under one store key
    range, ordered by sequence number. Entries are pushed in increasing
    sequence order."""

    __slots__ = ("store", "_key", "_end", "_start", "window", "beyond", "tail")

    def __init__(self, store: PartitionStore, key: Callable[[int], bytes], prefix: bytes,
                 maybe_stored: bool) -> None:
        self.store = store
        self._key = key
        self._start = prefix
        self._end = keys.prefix_end(prefix)
        self.window: deque[tuple[int, bytes]] = deque()
        # Entries may be in the store beyond the window (unknown after a load).
        self.beyond = maybe_stored
        self.tail = -1  # sequence number of the last entry the window took

    def push(self, seq: int, record: bytes) -> None:
        self.store.put_fresh(self._key(seq), record)
        if not self.beyond and len(self.window) < WINDOW:
            self.window.append((seq, record))
            self.tail = seq
        else:
            self.beyond = True

    def _refill(self) -> None:
        start = self._key(self.tail + 1) if self.tail >= 0 else self._start
        batch = self.store.scan(start, self._end, limit=WINDOW)
        for k, v in batch:
            self.window.append((keys.seq_of(k), v))
        if batch:
            self.tail = self.window[-1][0]
        self.beyond = len(batch) == WINDOW

    def peek(self) -> tuple[int, bytes] | None:
        if not self.window and self.beyond:
            self._refill()
        return self.window[0] if self.window else None

    def pop(self) -> tuple[int, bytes] | None:
        """The head, removed from the queue (and its key from the store)."""
        head = self.peek()
        if head is not None:
            self.window.popleft()
            self.store.delete(self._key(head[0]))
        return head

    def __bool__(self) -> bool:
        return self.peek() is not None


def queue_record(invoke: dict[str, Any], seq: int) -> bytes:
    """What a queue entry holds: the waiting invocation's Invoke."""
    return schemas.encode("invocation_status", {
        "invoke": invoke, "phase": INBOXED, "seq": seq, "attempt": 0, "retry_at_ms": 0, "error": None})


def invoke_of(record: bytes) -> dict[str, Any]:
    return schemas.decode("invocation_status", record)["invoke"]


def mark_queued(store: PartitionStore, invoke: dict[str, Any]) -> None:
    """Only an Invoke with an idempotency key can arrive twice, so only those
    are findable by id while they wait (one more record each)."""
    if invoke["idempotency_key"] is not None:
        store.put_fresh(keys.queued(invoke["invocation_id"]), b"")


def unmark_queued(store: PartitionStore, invoke: dict[str, Any]) -> None:
    if invoke["idempotency_key"] is not None:
        store.delete(keys.queued(invoke["invocation_id"]))


def ready_queue(store: PartitionStore) -> StoreQueue:
    """The partition's queue of invocations waiting for capacity."""
    return StoreQueue(store, keys.ready, keys.READY, maybe_stored=True)


def key_inbox(store: PartitionStore, sk: bytes, maybe_stored: bool) -> StoreQueue:
    """The queue of invocations waiting for key `sk`."""
    return StoreQueue(store, lambda seq: keys.inbox(sk, seq), keys.inbox_prefix(sk), maybe_stored)
