"""Loading a partition from its committed store: the in-flight invocations
(RUNNING resumed by replay, BACKING_OFF re-armed, PAUSED by an operator
left alone, SUSPENDED left in the store), the key locks, the timers and the
read-ahead record. Recovery after a crash, a rewind after an abort and an
assignment are this one path."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from oncely import schemas
from oncely.processor import handover, keys
from oncely.processor.invocation import BACKING_OFF, PAUSED, SUSPENDED, Invocation
from oncely.sdk.protocol import Entry
from oncely.shuffle.ids import format_id

if TYPE_CHECKING:
    from oncely.processor.partition import PartitionProcessor

log = logging.getLogger("oncely.partition")


def load(part: "PartitionProcessor") -> None:
    """Rebuild in-memory invocations from the committed store and resume
    the ones that were running: recovery after a crash and a rewind after
    an abort are this same path. Queued invocations stay in the store."""
    store = part.store
    part.ahead.load(store)
    part.doomed = {k[1:]: v.decode() for k, v in store.scan(keys.DOOMED)}
    part.timers.load()
    part.queued = store.count_committed(keys.INBOX) + store.count_committed(keys.READY)
    part.waiters = store.count_committed(keys.WAITER)
    suspended: set[bytes] = set()
    for k, v in store.scan(keys.STATUS):
        st = schemas.decode("invocation_status", v)
        if st["phase"] == SUSPENDED:
            suspended.add(k[1:])  # stays in the store until its completion arrives
        else:
            part.from_store(k[1:], st)
    part.suspended = len(suspended)
    orphans = []
    for k, v in store.scan(keys.LOCK):
        if v in suspended:
            continue
        inv = part.invocations.get(v)
        if inv is None or inv.sk != k[1:]:
            log.warning("partition %d: lock without its invocation (%s); dropping it", part.partition, format_id(v))
            store.delete(k)
            orphans.append(k[1:])
            continue
        part.keys.take(inv, maybe_queued=True)
        part.writer.loaded(inv, holds_lock=True)
    for inv in list(part.invocations.values()):
        if inv.sk is not None and not part.keys.holds(inv):
            log.warning("partition %d: %s has no lock of its key; taking it", part.partition, format_id(inv.id))
            part.keys.take(inv, maybe_queued=True)
            part.writer.changed(inv)
        if inv.phase == BACKING_OFF:
            part.timers.retry_at(inv.retry_at_ms, inv.id)
        elif inv.held:
            pass  # paused by an operator: until resumed (controls.py)
        else:
            # RUNNING resumes by replaying its journal; PAUSED invocations
            # are retried once per (re)start, so a fixed handler resumes them.
            part.stats.resumed += 1
            part.start(inv)
    for sk in orphans:
        handover.hand_over(part, part.keys.orphan(sk))
    if part.invocations or part.suspended:
        log.info("partition %d: loaded %d in-flight invocations (%d resumed by replay), %d suspended",
                 part.partition, len(part.invocations), part.stats.resumed, part.suspended)

def from_store(part: "PartitionProcessor", inv_id: bytes, st: dict[str, Any]) -> Invocation:
    """An in-flight invocation as the store holds it (status and journal)."""
    invoke = st["invoke"]
    inv = Invocation(id=inv_id, invoke=invoke, sk=part.sk_of(invoke), seq=st["seq"], phase=st["phase"],
                     attempt=st["attempt"], retry_at_ms=st["retry_at_ms"], error=st["error"],
                     held=st.get("held", False), cancelled=st.get("cancelled", False),
                     deployment=st.get("deployment"))
    store = part.store
    inv.journal.extend(Entry.decode(jv) for _, jv in store.scan(keys.journal_prefix(inv_id)))
    inv.has_early = bool(store.scan(keys.early_prefix(inv_id), limit=1))
    part.invocations[inv_id] = inv
    part.writer.loaded(inv, holds_lock=False)
    if inv.phase == PAUSED:
        part.n_paused += 1
    return inv
