"""Completions of waiting journal entries, and suspension.

A call's Response, a sleep's timer and an awakeable's result complete one
journal entry of one invocation, once: a second completion finds the entry
completed and is dropped (with a log line; a resolver gets an answer). A
waiting invocation is woken through waits.py; a suspended one is loaded from
the store and resumed by journal replay. Suspension writes an invocation's
status, journal and lock and drops it from memory.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from oncely import schemas
from oncely.processor import keys
from oncely.processor.invocation import SUSPENDED, Invocation
from oncely.sdk.protocol import Entry
from oncely.shuffle.delivery import awakeable_reply
from oncely.shuffle.ids import format_id

if TYPE_CHECKING:
    from oncely.processor.partition import PartitionProcessor

log = logging.getLogger("oncely.partition")


def complete_entry(part: PartitionProcessor, inv_id: bytes, index: int, value: bytes | None, error: str | None,
                   kind: str | None = None) -> str | None:
    """A journal entry that waited (sleep, call, awakeable) completed:
    record it and wake the waiting coroutine, or resume a suspended
    invocation by replay. Returns why it could not be completed."""
    inv = part.invocations.get(inv_id)
    resumed = False
    if inv is None and part.suspended:
        inv = load_suspended(part, inv_id)
        resumed = inv is not None
    if inv is None:
        return "its invocation is not in flight on this partition (it already finished, or never existed)"
    reason = None
    if index >= len(inv.journal):
        reason = f"its journal has no entry {index}"
    else:
        entry = inv.journal[index]
        if kind is not None and entry.kind != kind:
            reason = f"journal entry {index} is a {entry.kind}, not a {kind}"
        elif entry.completed:
            reason = "it was already completed"
        else:
            entry.completed = True
            entry.value = value if value is not None else entry.value
            entry.error = error
            part.writer.entry_completed(inv, index)
    if resumed:
        if reason is not None:
            suspend(part, inv)  # nothing changed for it: back to the store
            return reason
        part.stats.resumed += 1
        part.start(inv)  # replay: it waits again if it still has to
    elif reason is None:
        part.waits.completed(inv, index)
    return reason


def load_suspended(part: PartitionProcessor, inv_id: bytes) -> Invocation | None:
    """Bring a suspended invocation back from the store (not yet started)."""
    raw = part.store.get(keys.status(inv_id))
    if raw is None:
        return None
    st = schemas.decode("invocation_status", raw)
    if st["phase"] != SUSPENDED:
        return None
    inv = part.from_store(inv_id, st)
    part.suspended -= 1
    if inv.sk is not None:
        part.keys.take(inv, maybe_queued=True)
        part.writer.loaded(inv, holds_lock=True)
    part.writer.changed(inv)  # its phase changes when it starts
    return inv


def suspend(part: PartitionProcessor, inv: Invocation) -> bool:
    """Drop a waiting invocation's coroutine and keep it only in the
    store; a completion for it resumes it by journal replay."""
    if part.invocations.get(inv.id) is not inv:
        return False
    if any(inv.journal[i].completed for i in inv.awaiting):
        return False  # woken already: its coroutine runs next, dropping it would lose the wake-up
    inv.phase = SUSPENDED
    part.writer.changed(inv)
    part.writer.persist(inv)  # status, journal and lock, before it leaves memory
    part.writer.left_memory(inv)
    part.keys.left_memory(inv)
    part.waits.drop(inv)
    if inv.running is not None:
        inv.running.cancel()
        inv.running = None
    del part.invocations[inv.id]
    part.active.discard(inv)
    part.suspended += 1
    part.stats.suspensions += 1
    return True


def on_response(part: PartitionProcessor, body: dict[str, Any]) -> None:
    part.stats.responses += 1
    why = complete_entry(part, body["invocation_id"], body["journal_index"], body["value"], body["failure"],
                         kind="call")
    if why is not None:
        log.info("response for %s[%d] dropped: %s", format_id(body["invocation_id"]), body["journal_index"], why)


def on_awakeable_result(part: PartitionProcessor, body: dict[str, Any]) -> None:
    """Resolve or reject an awakeable, once; the resolver gets a reply."""
    inv_id, index = body["invocation_id"], body["journal_index"]
    inv = part.invocations.get(inv_id)
    if inv is not None and index >= len(inv.journal):
        # Its id went out before the entry was journaled here (a replay
        # is on its way to it): keep the completion for the entry.
        key = keys.early(inv_id, index)
        if part.store.get(key) is not None:
            why: str | None = "it was already completed"
        else:
            part.store.put_fresh(key, Entry("awakeable", value=body["value"], error=body["failure"]).encode())
            inv.has_early = True
            why = None
    else:
        why = complete_entry(part, inv_id, index, body["value"], body["failure"], kind="awakeable")
    if why is not None:
        log.info("awakeable %s[%d] not completed: %s", format_id(inv_id), index, why)
    request = body.get("request_id")
    if request is not None:
        d = awakeable_reply(request, why, part.app.partitions)
        part.out.produce(part.app.replies_topic, d.key, d.value, partition=d.partition)
