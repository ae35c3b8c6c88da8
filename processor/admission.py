"""What an arriving Invoke is before it may start: a duplicate of one this
partition already accepted, or one that can never run here (no such
handler, or a keyed service without a key). Both are answered here; the
partition starts or queues the rest (partition.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oncely.processor import keys, outcomes, requests
from oncely.processor.invocation import COMPLETED, FAILED, INBOXED, SUSPENDED, Invocation

if TYPE_CHECKING:
    from oncely.processor.partition import PartitionProcessor


def lookup(part: PartitionProcessor, inv_id: bytes) -> str | None:
    """Where an invocation id stands on this partition, from the one rule
    every duplicate check uses: its phase while in memory; SUSPENDED while
    only the store holds it in flight; INBOXED while it waits in the
    inbox; COMPLETED or FAILED while its outcome is retained; None when
    the partition never accepted it (or forgot it after the retention)."""
    inv = part.invocations.get(inv_id)
    if inv is not None:
        return inv.phase
    if inv_id in part.ahead.ids or inv_id in part.local_waits.ids:
        return INBOXED
    get = part.store.get
    if get(keys.status(inv_id)) is not None:
        return SUSPENDED  # load() brings every other in-flight phase into memory
    if get(keys.queued(inv_id)) is not None:
        return INBOXED
    if get(keys.failed(inv_id)) is not None:
        return FAILED
    if get(keys.dedup(inv_id)) is not None:
        return COMPLETED
    return None


def duplicate(part: PartitionProcessor, invoke: dict[str, Any], phase: str) -> None:
    """An Invoke whose invocation is already at `phase` here: it starts
    nothing; its caller (or outside caller) is answered."""
    inv_id = invoke["invocation_id"]
    part.stats.duplicates += 1
    if part.metrics is not None:
        part.metrics.duplicate()
    if invoke["caller"] is not None and phase in (COMPLETED, FAILED):
        # A finished callee answers its caller again; one in flight
        # answers when it finishes (the caller is the same one).
        outcomes.respond_again(part, inv_id, invoke["caller"])
    if "reply" in invoke:  # an outside caller attaches (requests.py)
        requests.on_duplicate(part, inv_id, phase, invoke["reply"])


def undeliverable(part: PartitionProcessor, invoke: dict[str, Any], offset: int, service: Any) -> None:
    """Fail an Invoke that can never run on this app (the partition found
    `service`, the app's Service or None, unable to take it): a dead letter,
    and its caller answered."""
    if service is None or invoke["handler"] not in service.handlers:
        reason, why = "unknown-handler", f"app {part.app.name!r} has no handler {invoke['service']}.{invoke['handler']}"
    else:
        reason, why = "missing-key", f"keyed service {service.name!r} needs a key; the invocation has none"
    part.stats.accepted += 1
    outcomes.dead(part, Invocation(invoke["invocation_id"], invoke, None, offset), reason, why)
