"""Key locks: one invocation at a time per (service, key), in log order.

The holder of a key is an invocation in memory (`held`) or a suspended one
(only its LOCK record says so). Invocations that arrive for a held key wait
in the key's inbox (inbox.py: held in memory as read-ahead, or in the
store); when the holder finishes, the
head of the inbox takes the key. A key with an inbox always has a holder,
except while a commit is being prepared: a holder that finishes then, whose
inbox holds only read-ahead, leaves its key vacant (held, no holder) until
the commit is over, so its successor does not start just to be persisted
(status, journal, lock) in the commit and deleted in the next. A vacant key
needs no LOCK: a re-read of the log applies its waiting Invokes again, in
order.
"""

from __future__ import annotations

from typing import Any, Callable

from oncely.processor import keys
from oncely.processor.inbox import ReadAhead, StoreQueue, key_inbox, mark_queued, queue_record
from oncely.processor.invocation import Invocation
from oncely.processor.store import PartitionStore


class KeyQueue:
    """A held key: its holder and its inbox. The inbox is made when the
    first invocation waits (most keys never queue anything), or at once when
    the store may hold entries for it (after a load)."""

    __slots__ = ("holder", "inbox")

    def __init__(self, holder: Invocation | None, inbox: StoreQueue | None) -> None:
        self.holder = holder
        self.inbox = inbox


class KeyQueues:
    def __init__(self, store: PartitionStore, any_suspended: Callable[[], bool], ahead: ReadAhead) -> None:
        self.store = store
        self.ahead = ahead
        self._any_suspended = any_suspended
        self.held: dict[bytes, KeyQueue] = {}  # keys held by an invocation in memory (or vacant)
        self.vacant: list[bytes] = []  # keys left vacant while a commit is prepared

    def is_held(self, sk: bytes) -> bool:
        if sk in self.held:
            return True
        # A suspended invocation may hold it; only the store knows.
        return self._any_suspended() and self.store.get(keys.lock(sk)) is not None

    def holds(self, inv: Invocation) -> bool:
        q = self.held.get(inv.sk) if inv.sk is not None else None
        return q is not None and q.holder is inv

    def take(self, inv: Invocation, inbox: StoreQueue | None = None, maybe_queued: bool = False) -> None:
        """`inv` holds its key from now on (with the key's inbox, if known)."""
        sk = inv.sk
        assert sk is not None
        if inbox is None and maybe_queued:
            inbox = key_inbox(self.store, sk, True, self.ahead)
        self.held[sk] = KeyQueue(inv, inbox)

    def wait(self, sk: bytes, seq: int, invoke: dict[str, Any]) -> None:
        """Queue an invocation behind the key's holder."""
        q = self.held.get(sk)
        if q is not None:
            if q.inbox is None:
                q.inbox = key_inbox(self.store, sk, False, self.ahead)
            q.inbox.push(seq, invoke)
        else:  # held by a suspended invocation: its inbox is read from the store when it resumes
            self.ahead.stored(seq)  # (what is stored precedes what is held)
            self.store.put_fresh(keys.inbox(sk, seq), queue_record(invoke, seq))
            mark_queued(self.store, invoke)

    def release(self, inv: Invocation, vacate: bool = False) -> tuple[int, dict[str, Any], StoreQueue] | None:
        """`inv` finished: the next waiting invocation (seq, record, inbox), which
        the caller starts as the key's holder; None when the key is free, or
        left vacant (`vacate`, and all that waits is held read-ahead)."""
        q = self.held.get(inv.sk) if inv.sk is not None else None
        if q is None or q.holder is not inv:
            return None
        if q.inbox is None:
            del self.held[inv.sk]  # type: ignore[arg-type]
            return None
        if vacate and q.inbox.head_is_held():
            q.holder = None
            self.vacant.append(inv.sk)  # type: ignore[arg-type]
            return None
        del self.held[inv.sk]  # type: ignore[arg-type]
        head = q.inbox.pop()
        return None if head is None else (head[0], head[1], q.inbox)

    def vacant_only_held(self) -> bool:
        """Whether every vacant key's inbox still holds only read-ahead (a
        spill may have stored it since)."""
        held = self.held
        return all((q := held.get(sk)) is None or q.holder is not None or q.inbox is None or q.inbox.head_is_held()
                   for sk in self.vacant)

    def fill_vacant(self) -> list[tuple[int, dict[str, Any], StoreQueue]]:
        """The head of every vacant key's inbox, each to start as its key's holder."""
        out = []
        for sk in self.vacant:
            q = self.held.get(sk)
            if q is None or q.holder is not None:
                continue
            del self.held[sk]
            head = q.inbox.pop() if q.inbox is not None else None
            if head is not None:
                out.append((head[0], head[1], q.inbox))
        self.vacant.clear()
        return out  # type: ignore[return-value]

    def orphan(self, sk: bytes) -> tuple[int, dict[str, Any], StoreQueue] | None:
        """A key whose holder is gone (a lock without its invocation): the
        head of its inbox, if any."""
        inbox = key_inbox(self.store, sk, True, self.ahead)
        head = inbox.pop()
        return None if head is None else (head[0], head[1], inbox)

    def left_memory(self, inv: Invocation) -> None:
        """`inv` was suspended: it keeps the key through its LOCK record, and
        its inbox is read from the store when it resumes (held entries go there)."""
        if self.holds(inv):
            self.ahead.spill()
            del self.held[inv.sk]  # type: ignore[arg-type]

    def clear(self) -> None:
        self.held.clear()
        self.vacant.clear()
