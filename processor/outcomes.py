"""What an invocation's outcome changes: state, records, dedup entries.

Completed: its state changes, emits and its caller's Response join the open
transaction, with a dedup entry when it asked for idempotency. Terminal or
out of attempts: a dead letter, the caller's failed Response and a retained
failure. Retry: a retry timer. Paused: it stays until the next (re)start.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from oncely import schemas
from oncely.egress.dead_letters import dead_letter
from oncely.logs import invocation_extra
from oncely.processor import handover, keys, requests
from oncely.processor.invocation import BACKING_OFF, FAILED, PAUSED, Invocation, now_ms
from oncely.sdk.protocol import Outcome
from oncely.shuffle.delivery import response
from oncely.shuffle.ids import format_id

if TYPE_CHECKING:
    from oncely.processor.partition import PartitionProcessor

log = logging.getLogger("oncely.partition")

DEFAULT_RETENTION_MS = 24 * 3600 * 1000


def apply(part: PartitionProcessor, inv: Invocation, outcome: Outcome) -> None:
    status = outcome.status
    if status == "completed":
        complete(part, inv, outcome)
    elif status == "terminal":
        fail(part, inv, "terminal", outcome.error or "terminal error")
    elif status == "retry":
        policy = part.app.services[inv.invoke["service"]].retry
        inv.attempt += 1
        inv.error = outcome.error
        if inv.attempt >= policy.max_attempts:
            fail(part, inv, "retries-exhausted", f"failed {inv.attempt} attempts; last error: {outcome.error}")
            return
        part.stats.retries += 1
        if part.metrics is not None:
            part.metrics.outcome(inv, "retried")
        inv.phase = BACKING_OFF
        inv.retry_at_ms = now_ms() + int(policy.delay(inv.attempt) * 1000)
        part.timers.retry_at(inv.retry_at_ms, inv.id)
        part.writer.changed(inv)
        log.info("%s %s attempt %d failed, retrying in %d ms: %s", format_id(inv.id), inv.target,
                 inv.attempt, inv.retry_at_ms - now_ms(), outcome.error, extra=invocation_extra(inv, "retrying"))
    else:
        pause(part, inv, outcome.error)


def pause(part: PartitionProcessor, inv: Invocation, error: str | None) -> None:
    """It stays, holding its key, until an operator resumes (or kills) it."""
    part.ahead.spill()  # Invokes behind its key may now wait for days: not in memory only
    inv.phase = PAUSED
    inv.error = error
    part.n_paused += 1
    part.stats.paused += 1
    if part.metrics is not None:
        part.metrics.outcome(inv, "paused")
    part.writer.changed(inv)
    log.error("%s %s paused: %s", format_id(inv.id), inv.target, error, extra=invocation_extra(inv, "paused"))


def complete(part: PartitionProcessor, inv: Invocation, outcome: Outcome) -> None:
    store = part.store
    if inv.sk is not None:
        if outcome.cleared_all:
            for k, _ in store.scan(keys.state_prefix(inv.sk)):
                store.delete(k)
        for name, value in outcome.state.items():
            sk = keys.state(inv.sk, name)
            if value is None:
                store.delete(sk)
            else:
                store.put(sk, value)
    for topic, key, value, headers in outcome.emits:
        part.out.produce(topic, key, value, headers, owner=inv.id)
    invoke = inv.invoke  # (the checks of respond, requests.finished and remember, inlined)
    if invoke["caller"] is not None:
        respond(part, invoke["caller"], inv.id, outcome.value, None)
    if part.waiters or "reply" in invoke:  # someone outside waits for it (requests.py)
        requests.finished(part, inv, outcome.value, None)
    if invoke.get("idempotency_key") is not None:
        remember(part, inv, failed=False, result=outcome.value, error=None)
    part.stats.completed += 1
    if part.metrics is not None:
        part.metrics.outcome(inv, "completed")
    handover.finish(part, inv)


def respond(part: PartitionProcessor, caller: dict | None, callee: bytes, value: bytes | None,
            failure: str | None) -> None:
    """A call's outcome travels to the caller's partition in this transaction."""
    if caller is None:
        return
    d = response(caller, callee, value, failure)
    part.out.produce(part.app.log_topic, d.key, d.value, partition=d.partition, owner=callee)


def respond_again(part: PartitionProcessor, inv_id: bytes, caller: dict) -> None:
    """A finished callee answers a repeated call from its dedup entry."""
    raw = part.store.get(keys.dedup(inv_id))
    if raw is not None:
        d = schemas.decode("dedup_entry", raw)
        respond(part, caller, inv_id, d["result"], d["error"] if d["failed"] else None)


def remember(part: PartitionProcessor, inv: Invocation, failed: bool, result: bytes | None,
             error: str | None) -> None:
    """Keep a dedup entry for invocations that asked for idempotency."""
    if inv.invoke.get("idempotency_key") is None:
        return
    expires = now_ms() + (inv.invoke.get("idempotency_retention_ms") or DEFAULT_RETENTION_MS)
    part.store.put_fresh(keys.dedup(inv.id), schemas.encode("dedup_entry", {
        "expires_at_ms": expires, "failed": failed, "result": result, "error": error}))
    part.store.put_fresh(keys.expiry(expires, keys.DEDUP, inv.id), b"")


def fail(part: PartitionProcessor, inv: Invocation, reason: str, error: str) -> None:
    dead(part, inv, reason, error)
    handover.finish(part, inv)


def dead(part: PartitionProcessor, inv: Invocation, reason: str, error: str) -> None:
    """Write the dead letter and retain the failed status for inspection."""
    invoke = inv.invoke
    part.stats.failed += 1
    if part.metrics is not None:
        part.metrics.failed(inv, reason)
    log.warning("%s %s failed (%s): %s", format_id(inv.id), inv.target, reason, error,
                extra=invocation_extra(inv, "dead-lettered", reason))
    k, v, h = dead_letter(
        part.app.name, reason, error, invoke["key"], invoke["payload"], invocation_id=inv.id,
        target=inv.target, attempts=inv.attempt + (1 if reason != "retries-exhausted" else 0),
        source=invoke.get("source"),
    )
    part.out.produce(part.app.dlq_topic, k, v, h)
    failure = error if reason == "terminal" else f"{inv.target} failed ({reason}): {error}"
    respond(part, invoke["caller"], inv.id, None, failure)
    requests.finished(part, inv, None, failure)
    expires = now_ms() + (invoke.get("idempotency_retention_ms") or DEFAULT_RETENTION_MS)
    part.store.put(keys.failed(inv.id), schemas.encode("invocation_status", {
        "invoke": invoke, "phase": FAILED, "seq": inv.seq, "attempt": inv.attempt, "retry_at_ms": 0,
        "error": f"{reason}: {error}", "expires_at_ms": expires}))
    part.store.put(keys.expiry(expires, keys.FAILED, inv.id), b"")
    if invoke.get("idempotency_key") is not None:
        remember(part, inv, failed=True, result=None, error=error)

