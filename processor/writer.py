"""The one writer of in-flight invocations: what of them the store holds.

Persistence follows "net effects": an invocation that starts and finishes
between two commits writes only its effects (state, dedup entry, outputs).
Status, journal and lock records are written at commit time only for
invocations still in flight (`prepare_commit`), or when one leaves memory
(suspension), and deleted when such an invocation finishes. With
`net_effects=False` every record is written as it goes (for measuring the
difference). What has been written is known here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from oncely import schemas
from oncely.processor import keys
from oncely.processor.invocation import Invocation
from oncely.processor.store import PartitionStore


@dataclass(slots=True)
class _Written:
    status: bool = False
    status_dirty: bool = True
    journal: int = 0                                   # entries written
    journal_dirty: set[int] = field(default_factory=set)  # written entries completed since
    lock: bool = False


def status_record(inv: Invocation) -> bytes:
    st = {"invoke": inv.invoke, "phase": inv.phase, "seq": inv.seq, "attempt": inv.attempt,
          "retry_at_ms": inv.retry_at_ms, "error": inv.error}
    if inv.held or inv.cancelled:  # operators' controls (controls.py)
        st["held"], st["cancelled"] = inv.held, inv.cancelled
    if inv.deployment is not None:  # the remote deployment it is pinned to
        st["deployment"] = inv.deployment
    return schemas.encode("invocation_status", st)


class InvocationWriter:
    def __init__(self, store: PartitionStore, net_effects: bool, holds_lock: Callable[[Invocation], bool]) -> None:
        self.store = store
        self.net_effects = net_effects
        self._holds_lock = holds_lock
        # None: in memory, nothing written yet (most invocations end so,
        # within one commit: no record made for them on the hot path).
        self._written: dict[Invocation, _Written | None] = {}
        self.dirty: set[Invocation] = set()
        # Without net effects a later delete leaves a tombstone instead of nothing.
        self._put_new = store.put_fresh if net_effects else store.put

    def _of(self, inv: Invocation) -> _Written:
        w = self._written.get(inv)
        if w is None:
            w = self._written[inv] = _Written()
        return w

    def loaded(self, inv: Invocation, holds_lock: bool) -> None:
        """`inv` came from the store (status and journal as committed)."""
        self._written[inv] = _Written(status=True, status_dirty=False, journal=len(inv.journal), lock=holds_lock)

    def changed(self, inv: Invocation) -> None:
        """Its status (phase, attempt, error) changed."""
        w = self._written.setdefault(inv, None)
        if w is not None:
            w.status_dirty = True
        self.dirty.add(inv)
        if not self.net_effects:
            self.persist(inv)

    def entry_completed(self, inv: Invocation, index: int) -> None:
        w = self._of(inv)
        if index < w.journal:
            w.journal_dirty.add(index)
            self.dirty.add(inv)

    def persist(self, inv: Invocation) -> None:
        """Write what the store lacks of `inv` (into the overlay)."""
        store = self.store
        w = self._of(inv)
        if w.status_dirty or not w.status:
            data = status_record(inv)
            if w.status:
                store.put(keys.status(inv.id), data)
            else:
                self._put_new(keys.status(inv.id), data)
                w.status = True
            w.status_dirty = False
        journal = inv.journal
        for i in range(w.journal, len(journal)):
            self._put_new(keys.journal(inv.id, i), journal[i].encode())
        w.journal = len(journal)
        for i in w.journal_dirty:
            store.put(keys.journal(inv.id, i), journal[i].encode())
        w.journal_dirty.clear()
        if inv.sk is not None and not w.lock and self._holds_lock(inv):
            self._put_new(keys.lock(inv.sk), inv.id)
            w.lock = True

    def persist_all(self, live: Iterable[Invocation]) -> None:
        """Before a commit: the dirty ones and `live` (running invocations
        whose journals grow) that are still in flight."""
        for inv in self.dirty.union(live):
            if inv in self._written:
                self.persist(inv)
        self.dirty.clear()

    def left_memory(self, inv: Invocation) -> None:
        """Suspended: it lives in the store only; a resume loads it afresh."""
        self._written.pop(inv, None)
        self.dirty.discard(inv)

    def forget(self, inv: Invocation) -> None:
        """It finished: delete what the store holds for it."""
        store = self.store
        w = self._written.pop(inv, None)
        self.dirty.discard(inv)
        if w is not None:
            if w.status:
                store.delete(keys.status(inv.id))
            for i in range(w.journal):
                store.delete(keys.journal(inv.id, i))
            if w.lock:
                store.delete(keys.lock(inv.sk))  # type: ignore[arg-type]
        if inv.has_early:
            for k, _ in store.scan(keys.early_prefix(inv.id)):
                store.delete(k)

    def clear(self) -> None:
        self._written.clear()
        self.dirty.clear()
