"""The durable inbox: invocations that wait, in log order.

An Invoke that cannot start when it is read waits behind a busy key (a key
inbox, `INBOX` keys) or for capacity (the ready queue, `READY` keys, when
`max_inflight_per_partition` invocations are in memory).

Read-ahead is not persisted. Up to `READ_AHEAD` waiting Invokes of a
partition are held only in memory (`ReadAhead`): the log still has them, so
a commit moves the partition's log offset only up to the first of them and
writes one small record (`AHEAD`) naming the offsets above it that were not
applied (the held ones), so a re-read after a crash or rebalance applies
exactly those and skips everything else (records already applied, which
exactly-once needs for Invokes that are not idempotent). Beyond that bound,
or when the held ones trail the read position by more than `SPAN` offsets,
waiting Invokes go to the store as before (the held ones first, and only an
Invoke newer than everything stored is held, so what is stored always
precedes what is held): the queue entry holds the Invoke;
one with an idempotency key (the only kind that can arrive twice) is also
marked under `QUEUED` by id, so a duplicate is recognised while it waits.
Only a short head of each stored queue is in memory, so neither a hot key
nor a backlog of callers grows memory, and the log itself is never paused:
Responses, awakeable results and timers always apply.

Sequence numbers are log offsets, so key order is log order.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from typing import Any, Callable

from oncely import schemas
from oncely.processor import keys
from oncely.processor.invocation import INBOXED
from oncely.processor.store import PartitionStore

# Stored queue entries kept in memory per queue (read from the store in batches of this).
WINDOW = 32
# Waiting Invokes per partition held only in memory (the log has them), and
# the payload bytes they may hold together.
READ_AHEAD = 4096
READ_AHEAD_BYTES = 16 * 1024 * 1024
# How far (log offsets) the first held Invoke may trail the read position at
# a commit before the held ones go to the store (bounds a re-read).
SPAN = 50_000
# How long (seconds) Invokes may stay held without a break before they go to
# the store: a key held by a PAUSED invocation may hold Invokes behind it for
# days, and the log's retention must never overtake the committed offset.
MAX_HOLD_S = 600.0

_U64 = struct.Struct(">Q")

# A window entry: (seq, Invoke, in the store?)
Entry = tuple[int, dict[str, Any], bool]


class StoreQueue:
    """A FIFO of waiting Invokes under one store key range, ordered by
    sequence number: a head in memory (held read-ahead and a window of
    stored entries), the rest in the store. Entries are pushed in increasing
    sequence order."""

    __slots__ = ("store", "_key", "_end", "_start", "window", "beyond", "tail", "ahead")

    def __init__(self, store: PartitionStore, key: Callable[[int], bytes], prefix: bytes,
                 maybe_stored: bool, ahead: "ReadAhead") -> None:
        self.store = store
        self._key = key
        self._start = prefix
        self._end = keys.prefix_end(prefix)
        self.ahead = ahead
        self.window: deque[Entry] = deque()
        # Entries may be in the store beyond the window (unknown after a load).
        self.beyond = maybe_stored
        self.tail = -1  # sequence number of the last entry the window took

    def push(self, seq: int, invoke: dict[str, Any]) -> None:
        if self.beyond and not self.window:
            self._refill()  # the store may hold nothing (a new queue after a load)
        ahead = self.ahead
        if not self.beyond and ahead.can_hold(seq):
            self.window.append((seq, invoke, False))
            self.tail = seq
            ahead.hold(seq, invoke, self)
            return
        ahead.stored(seq)
        store = self.store
        store.put_fresh(self._key(seq), queue_record(invoke, seq))
        mark_queued(store, invoke)
        if not self.beyond and len(self.window) < WINDOW:
            self.window.append((seq, invoke, True))
            self.tail = seq
        else:
            self.beyond = True

    def _refill(self) -> None:
        start = self._key(self.tail + 1) if self.tail >= 0 else self._start
        batch = self.store.scan(start, self._end, limit=WINDOW)
        for k, v in batch:
            self.window.append((keys.seq_of(k), invoke_of(v), True))
        if batch:
            self.tail = self.window[-1][0]
        self.beyond = len(batch) == WINDOW

    def peek(self) -> Entry | None:
        if not self.window and self.beyond:
            self._refill()
        return self.window[0] if self.window else None

    def pop(self) -> tuple[int, dict[str, Any]] | None:
        """The head, removed from the queue (and from the store or the held read-ahead)."""
        head = self.peek()
        if head is None:
            return None
        self.window.popleft()
        seq, invoke, stored = head
        if stored:
            self.store.delete(self._key(seq))
            unmark_queued(self.store, invoke)
            # It was stored, so it precedes every held one: if it queues again
            # (READY → a busy key's inbox) it must be stored again, never held
            # (its offset is below the committed one; a re-read would miss it).
            ahead = self.ahead
            if seq > ahead.stored_max:
                ahead.stored_max = seq
        else:
            self.ahead.release(seq, invoke)
        return seq, invoke

    def head_is_held(self) -> bool:
        """Whether the head is held read-ahead (then so is every entry: what
        is stored precedes what is held)."""
        w = self.window
        return bool(w) and not w[0][2]

    def spill(self) -> None:
        """Write the held entries to the store (they stop being read-ahead)."""
        w = self.window
        for i, (seq, invoke, stored) in enumerate(w):
            if not stored:
                self.store.put_fresh(self._key(seq), queue_record(invoke, seq))
                mark_queued(self.store, invoke)
                w[i] = (seq, invoke, True)

    def __bool__(self) -> bool:
        return self.peek() is not None


class ReadAhead:
    """Waiting Invokes held only in memory, and what a re-read must skip.

    The committed log offset is the first held (or yet to be re-read) offset;
    the `AHEAD` record says which offsets below `skip_until` still need
    applying (`redo`); every other one below it was applied and is skipped."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = READ_AHEAD if limit is None else limit
        self.bytes = 0  # payload bytes held
        self.held: dict[int, StoreQueue] = {}  # offset -> the queue holding it
        self.ids: set[bytes] = set()           # held ones with an idempotency key
        self.read_to = -1                      # next offset to read; -1 before the first since the load
        self.skip_until = 0
        self.redo: set[int] = set()            # offsets below skip_until still to apply
        # The highest offset stored since the load: only later ones may be held,
        # so every stored entry precedes every held one. (After a load every
        # stored entry precedes every offset read again.)
        self.stored_max = -1
        self.held_since = 0.0  # when `held` last became non-empty
        self._written: bytes | None = None

    def load(self, store: PartitionStore) -> None:
        v = store.get(keys.AHEAD)
        self._written = v
        if v:
            self.skip_until = _U64.unpack_from(v)[0]
            n = (len(v) - 8) // 4
            self.redo = {self.skip_until - d for d in struct.unpack_from(f">{n}I", v, 8)}

    def admit(self, offset: int) -> bool:
        """Whether the log record at `offset` is to be applied (False: it was, before a re-read)."""
        self.read_to = offset + 1
        if offset < self.skip_until:
            if offset in self.redo:
                self.redo.discard(offset)
                return True
            return False
        return True

    def can_hold(self, seq: int) -> bool:
        return seq > self.stored_max and len(self.held) < self.limit and self.bytes < READ_AHEAD_BYTES

    def stored(self, seq: int) -> None:
        """`seq` goes to the store: every held one first when one is older."""
        if self.held and seq > min(self.held):
            self.spill()
        if seq > self.stored_max:
            self.stored_max = seq

    def hold(self, seq: int, invoke: dict[str, Any], queue: StoreQueue) -> None:
        if not self.held:
            self.held_since = time.monotonic()
        self.held[seq] = queue
        self.bytes += len(invoke["payload"])
        if invoke["idempotency_key"] is not None:
            self.ids.add(invoke["invocation_id"])

    def release(self, seq: int, invoke: dict[str, Any]) -> None:
        del self.held[seq]
        self.bytes -= len(invoke["payload"])
        self.ids.discard(invoke["invocation_id"])

    def spill(self) -> None:
        """Every held Invoke to the store. Before anything else is stored, so
        that every stored entry precedes every held one: a re-read after a
        crash then queues the held ones behind what the store has, in log
        order, as if they arrived afresh."""
        if self.held:
            for q in set(self.held.values()):
                q.spill()
            self.stored_max = max(self.stored_max, max(self.held))
            self.held.clear()
            self.ids.clear()
            self.bytes = 0

    def commit_offset(self) -> int | None:
        """The log offset to commit; None when nothing was read since the load."""
        if self.read_to < 0:
            return None
        return min(min(self.held, default=self.read_to), min(self.redo, default=self.read_to))

    def spill_due(self) -> bool:
        """Whether this commit spills the held Invokes: they trail the read
        position too far, or have been held too long."""
        held = self.held
        return bool(held) and (self.read_to - min(held) > SPAN or time.monotonic() - self.held_since > MAX_HOLD_S)

    def prepare_commit(self, store: PartitionStore) -> None:
        """Before a commit: spill held Invokes that trail too far, and write
        the record that goes with `commit_offset` (one key, O(held) bytes)."""
        held = self.held
        if self.read_to < 0:  # nothing read since the load: the committed record stands
            if held:  # cannot happen (only Invokes read since the load are held); never lose one
                self.spill()
            return
        if self.spill_due():
            self.spill()
        skip_until = max(self.skip_until, self.read_to)
        redo = [*held, *self.redo]
        value = None
        if redo or skip_until > self.read_to:
            value = _U64.pack(skip_until) + struct.pack(f">{len(redo)}I", *(skip_until - o for o in redo))
        if value != self._written:
            if value is None:
                store.delete(keys.AHEAD)
            else:
                store.put(keys.AHEAD, value)
            self._written = value


def queue_record(invoke: dict[str, Any], seq: int) -> bytes:
    """What a stored queue entry holds: the waiting invocation's Invoke."""
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


def ready_queue(store: PartitionStore, ahead: ReadAhead) -> StoreQueue:
    """The partition's queue of invocations waiting for capacity."""
    return StoreQueue(store, keys.ready, keys.READY, True, ahead)


def key_inbox(store: PartitionStore, sk: bytes, maybe_stored: bool, ahead: ReadAhead) -> StoreQueue:
    """The queue of invocations waiting for key `sk`."""
    return StoreQueue(store, lambda seq: keys.inbox(sk, seq), keys.inbox_prefix(sk), maybe_stored, ahead)
