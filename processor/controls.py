"""Operators' controls of one invocation (cancel, kill, pause, resume,
purge) and status queries (describe, list), applied by its partition in the
transaction that reads the `Control` or `Query` record, and answered on
`<app>.replies` in that same transaction (like requests.py): an answer is
visible exactly when what it reports is committed.

- cancel is cooperative: every entry the invocation waits on (call, sleep,
  awakeable) completes with the error "cancelled", so its handler sees a
  TerminalError at the await and may compensate; a suspended invocation is
  resumed to see it. One that waits on nothing is marked (`cancelled`, in
  its status record) and its next await fails instead. Both land in the
  journal, so a replay after a crash takes the same path.
- kill fails it at once with reason "killed": its task is dropped, its
  sleeps' timers deleted, a dead letter written, its caller answered, its
  key handed on.
- pause stops it where it is (PAUSED, `held`): it keeps its key, takes no
  capacity and stays paused across restarts until resumed. resume starts a
  PAUSED invocation again by journal replay, whatever paused it (an
  operator, a non-determinism error, a remote endpoint out of budget).
- purge forgets a finished invocation (its dedup entry or retained
  failure), so its id and idempotency key can be used again.

Cancel and kill reach the callees of the calls it awaits: each gets the same
control, on its own partition, in the same transaction (not one-way sends,
which live on their own), so a tree of calls ends together. An INBOXED
invocation (waiting behind its key or for capacity: it has not started) is
marked (`DOOMED`) instead and fails with "cancelled" or "killed" at the
moment it would start, without running; its place in its key's queue is
kept, so the order of the others does not change.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator

import orjson

from oncely import schemas
from oncely.errors import CANCELLED, KILLED
from oncely.processor import completions, keys, outcomes, requests
from oncely.processor.invocation import COMPLETED, FAILED, INBOXED, PAUSED, SUSPENDED, Invocation
from oncely.shuffle.ids import child_id, format_id

if TYPE_CHECKING:
    from oncely.processor.partition import PartitionProcessor

log = logging.getLogger("oncely.partition")

HELD = "paused by an operator"
MAX_LIST = 1000


class Conflict(Exception):
    """The action does not apply in the invocation's phase (HTTP 409)."""


def _held(part: PartitionProcessor) -> Iterator[dict[str, Any]]:
    """The Invokes waiting as read-ahead (in memory only, not in the store)."""
    seen: set[int] = set()
    for queue in part.ahead.held.values():
        if id(queue) not in seen:
            seen.add(id(queue))
            yield from (invoke for _, invoke, stored in queue.window if not stored)


def _held_invoke(part: PartitionProcessor, inv_id: bytes) -> dict[str, Any] | None:
    """A held Invoke by id: lookup finds only those with an idempotency key
    (the duplicate check needs no more), an operator any of them."""
    return next((i for i in _held(part) if i["invocation_id"] == inv_id), None)


def on_control(part: PartitionProcessor, body: dict[str, Any]) -> None:
    inv_id, action, to = body["invocation_id"], body["action"], body["reply"]
    phase = part.lookup(inv_id)
    if phase is None and _held_invoke(part, inv_id) is not None:
        phase = INBOXED
    if phase is None:
        status, error = "unknown", None
    else:
        try:
            _ACTIONS[action](part, inv_id, phase)
            status, error = "applied", None
            log.info("%s: %s applied (was %s)", format_id(inv_id), action, phase)
        except Conflict as e:
            status, error = "conflict", str(e)
    if to is not None:
        requests.reply(part, to, inv_id, status, error=error)


def _reach_callees(part: PartitionProcessor, inv: Invocation, action: str) -> None:
    """The same control for the callee of every call `inv` still awaits."""
    for i, e in enumerate(inv.journal):
        if e.kind == "call" and not e.completed and e.partition is not None:
            callee = child_id(inv.id, i)
            record = schemas.encode("log_record", {"body": ("oncely.Control", {
                "invocation_id": callee, "action": action, "reply": None})})
            part.out.produce(part.app.log_topic, callee, record, partition=e.partition)


def _doom(part: PartitionProcessor, inv_id: bytes, action: str) -> None:
    """An INBOXED invocation fails with the action's reason when it would start."""
    part.doomed[inv_id] = action
    part.store.put(keys.doomed(inv_id), action.encode())


def fail_doomed(part: PartitionProcessor, inv: Invocation) -> None:
    """It was cancelled or killed while INBOXED: it fails instead of starting."""
    action = part.doomed.pop(inv.id)
    part.store.delete(keys.doomed(inv.id))
    log.info("%s: %s before it started", format_id(inv.id), "cancelled" if action == "cancel" else "killed")
    if action == "cancel":
        outcomes.fail(part, inv, "cancelled", CANCELLED)
    else:
        outcomes.fail(part, inv, "killed", KILLED)


def _in_memory(part: PartitionProcessor, inv_id: bytes, phase: str, action: str) -> Invocation:
    """The invocation in memory (a suspended one is loaded, not started)."""
    if phase in (COMPLETED, FAILED):
        raise Conflict(f"cannot {action} it: it has finished ({phase})")
    if phase == INBOXED:
        raise Conflict(f"cannot {action} it: it waits in its key's queue and has not started")
    inv = part.invocations.get(inv_id)
    if inv is None and phase == SUSPENDED:
        inv = completions.load_suspended(part, inv_id)
    if inv is None:
        raise Conflict(f"cannot {action} it: it is not in flight here")
    return inv


def _stop(part: PartitionProcessor, inv: Invocation) -> None:
    """Drop its running task (its outcome, if any, is not applied)."""
    inv.run += 1  # an outcome already on its way is not applied
    if inv.running is not None:
        inv.running.cancel()
        inv.running = None
    part.active.discard(inv)
    part.waits.drop(inv)


def _cancel(part: PartitionProcessor, inv_id: bytes, phase: str) -> None:
    if phase == INBOXED:
        _doom(part, inv_id, "cancel")
        return
    suspended = phase == SUSPENDED
    inv = _in_memory(part, inv_id, phase, "cancel")
    _reach_callees(part, inv, "cancel")
    pending = [i for i, e in enumerate(inv.journal) if not e.completed and e.kind in ("call", "sleep", "awakeable")]
    for i in pending:
        e = inv.journal[i]
        e.completed, e.error = True, CANCELLED
        part.writer.entry_completed(inv, i)
        part.waits.completed(inv, i)
    if not pending:
        inv.cancelled = True  # its next await fails
        part.writer.changed(inv)
    if suspended:
        part.stats.resumed += 1
        part.start(inv)  # replay up to the cancelled await


def deliver_cancel(part: PartitionProcessor, inv: Invocation, index: int) -> bool:
    """A marked (`cancelled`) invocation awaits entry `index`: it fails now
    with "cancelled", recorded in the journal. True when delivered."""
    if not inv.cancelled or index >= len(inv.journal) or inv.journal[index].completed:
        return False
    e = inv.journal[index]
    e.completed, e.error = True, CANCELLED
    inv.cancelled = False
    part.writer.entry_completed(inv, index)
    part.writer.changed(inv)
    return True


def _kill(part: PartitionProcessor, inv_id: bytes, phase: str) -> None:
    if phase == INBOXED:
        _doom(part, inv_id, "kill")
        return
    inv = _in_memory(part, inv_id, phase, "kill")
    _reach_callees(part, inv, "kill")
    _stop(part, inv)
    for i, e in enumerate(inv.journal):
        if e.kind == "sleep" and not e.completed and e.value:
            part.store.delete(keys.timer(orjson.loads(e.value), inv.id, i))
    if inv.phase == PAUSED:
        part.n_paused -= 1
    outcomes.fail(part, inv, "killed", KILLED)


def _pause(part: PartitionProcessor, inv_id: bytes, phase: str) -> None:
    inv = _in_memory(part, inv_id, phase, "pause")
    part.ahead.spill()  # Invokes behind its key may now wait for days: not in memory only
    if inv.phase != PAUSED:  # one paused already keeps its reason
        _stop(part, inv)
        inv.phase = PAUSED
        inv.error = HELD
        part.n_paused += 1
        part.stats.paused += 1
    inv.held = True
    part.writer.changed(inv)


def _resume(part: PartitionProcessor, inv_id: bytes, phase: str) -> None:
    if phase != PAUSED:
        raise Conflict(f"cannot resume it: it is {phase}, not PAUSED")
    inv = part.invocations[inv_id]
    inv.held = False
    inv.error = None
    part.stats.resumed += 1
    part.start(inv)  # replays its journal; its outcome, or its first await, marks the status changed


def _purge(part: PartitionProcessor, inv_id: bytes, phase: str) -> None:
    if phase not in (COMPLETED, FAILED):
        raise Conflict(f"cannot purge it: it is {phase}; only a finished invocation can be purged "
                       "(kill it first)")
    store = part.store
    raw = store.get(keys.dedup(inv_id))
    if raw is not None:
        store.delete(keys.dedup(inv_id))
        store.delete(keys.expiry(schemas.decode("dedup_entry", raw)["expires_at_ms"], keys.DEDUP, inv_id))
    raw = store.get(keys.failed(inv_id))
    if raw is not None:
        store.delete(keys.failed(inv_id))
        expires = schemas.decode("invocation_status", raw).get("expires_at_ms")
        if expires is not None:
            store.delete(keys.expiry(expires, keys.FAILED, inv_id))


_ACTIONS = {"cancel": _cancel, "kill": _kill, "pause": _pause, "resume": _resume, "purge": _purge}


# -- status queries -------------------------------------------------------------------


def describe(part: PartitionProcessor, inv_id: bytes) -> dict[str, Any] | None:
    """What an operator sees of one invocation, None when unknown here."""
    inv = part.invocations.get(inv_id)
    if inv is not None:
        return _desc(part, inv_id, inv.invoke, inv.phase, inv.attempt, inv.error, len(inv.journal),
                     inv.held, inv.cancelled, inv.deployment)
    store = part.store
    for space in (keys.STATUS, keys.FAILED):
        raw = store.get(space + inv_id)
        if raw is not None:
            st = schemas.decode("invocation_status", raw)
            n = len(store.scan(keys.journal_prefix(inv_id))) if space == keys.STATUS else 0
            return _desc(part, inv_id, st["invoke"], st["phase"], st["attempt"], st["error"], n,
                         st.get("held", False), st.get("cancelled", False), st.get("deployment"))
    phase = part.lookup(inv_id)
    held = _held_invoke(part, inv_id) if phase in (None, INBOXED) else None
    if phase is None and held is None:
        return None
    d = _desc(part, inv_id, held, phase or INBOXED, 0, None, 0, False, part.doomed.get(inv_id) == "cancel")
    if phase == COMPLETED:
        raw = store.get(keys.dedup(inv_id))
        if raw is not None:
            d["expires_at_ms"] = schemas.decode("dedup_entry", raw)["expires_at_ms"]
    return d


def _desc(part: PartitionProcessor, inv_id: bytes, invoke: dict[str, Any] | None, phase: str, attempt: int,
          error: str | None, journal_length: int, held: bool, cancelled: bool,
          deployment: str | None = None) -> dict[str, Any]:
    key = invoke["key"] if invoke is not None else None
    if key is not None:
        try:
            key = key.decode()
        except UnicodeDecodeError:
            key = {"hex": key.hex()}
    return {"invocation_id": f"{format_id(inv_id)}_{part.partition}",
            "target": f"{invoke['service']}/{invoke['handler']}" if invoke is not None else None,
            "key": key, "phase": phase, "attempt": attempt, "error": error,
            "deployment": deployment,
            "journal_length": journal_length, "paused_by_operator": held, "cancelled": cancelled,
            "idempotency_key": invoke.get("idempotency_key") if invoke is not None else None}


def listing(part: PartitionProcessor, phases: set[str], limit: int) -> list[dict[str, Any]]:
    """Up to `limit` of this partition's invocations: in flight (memory,
    then suspended), queued, then retained failures. Completed ones are not
    listed (their dedup entries keep no target); describe finds them."""
    out: list[dict[str, Any]] = []
    limit = max(0, min(limit, MAX_LIST))

    def want(phase: str) -> bool:
        return (not phases or phase in phases) and len(out) < limit

    for inv in list(part.invocations.values()):
        if want(inv.phase):
            out.append(describe(part, inv.id))  # type: ignore[arg-type]
    store = part.store
    if want(SUSPENDED):
        for k, _ in store.scan(keys.STATUS, limit=limit + len(part.invocations)):
            inv_id = k[1:]
            if inv_id not in part.invocations and want(SUSPENDED):
                out.append(describe(part, inv_id))  # type: ignore[arg-type]
    if want(INBOXED):
        for invoke in _held(part):
            if want(INBOXED):
                out.append(_desc(part, invoke["invocation_id"], invoke, INBOXED, 0, None, 0, False,
                                 part.doomed.get(invoke["invocation_id"]) == "cancel"))
        for space in (keys.READY, keys.INBOX):
            for _, v in store.scan(space, limit=limit):
                if want(INBOXED):
                    invoke = schemas.decode("invocation_status", v)["invoke"]
                    out.append(_desc(part, invoke["invocation_id"], invoke, INBOXED, 0, None, 0, False, False))
    if want(FAILED):
        for k, _ in store.scan(keys.FAILED, limit=limit):
            if want(FAILED):
                out.append(describe(part, k[1:]))  # type: ignore[arg-type]
    return out


def on_query(part: PartitionProcessor, body: dict[str, Any]) -> None:
    inv_id, to = body["invocation_id"], body["reply"]
    if inv_id is not None:
        d = describe(part, inv_id)
        if d is None:
            requests.reply(part, to, inv_id, "unknown")
            return
        found: list[dict[str, Any]] = [d]
    else:
        found = listing(part, set(body["phases"]), body["limit"])
    requests.reply(part, to, inv_id, "info", value=orjson.dumps(found))
