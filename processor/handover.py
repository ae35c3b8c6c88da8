"""A key changes hands: when an invocation leaves memory, the next in line
for its key starts (the key's inbox in the store first, then a subscribed
record waiting here, local_waits.py); while a commit is prepared, a key
whose inbox is in the store is left vacant instead (key_queues.py) and
filled once the commit is made (`prepared`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oncely.processor.inbox import StoreQueue
    from oncely.processor.invocation import Invocation
    from oncely.processor.partition import PartitionProcessor


def finish(part: PartitionProcessor, inv: Invocation) -> None:
    """Forget a finished invocation and hand its key to the next in line."""
    part.writer.forget(inv)
    part.invocations.pop(inv.id, None)
    part.active.discard(inv)
    waits = part.waits
    if waits.futures or waits.idle:  # (`Waits.drop` has nothing to do otherwise)
        waits.drop(inv)
    sk = inv.sk
    if sk is not None:
        held = part.keys.held
        q = held.get(sk)
        if q is not None and q.holder is inv and q.inbox is None:
            del held[sk]  # nothing waits for the key (`KeyQueues.release`'s first case, inlined)
            nxt = None
        else:
            nxt = part.keys.release(inv, vacate=part.preparing)
        if nxt is not None:
            hand_over(part, nxt)
        elif part.local_waits.n and sk not in held:
            start_local(part, sk)


def finish_fresh(part: PartitionProcessor, inv: Invocation) -> None:
    """`finish` for a fresh invocation that ended in place (never
    registered: PartitionProcessor.start): nothing to forget but waits its
    step began, and the key's next record waiting here goes on
    (`start_local` starts one at a time)."""
    part.waits.drop(inv)
    sk = inv.sk
    if sk is not None and part.local_waits.n and sk not in part.keys.held:
        start_local(part, sk)


def fill_vacant(part: PartitionProcessor) -> None:
    """Start the next in line of every key left vacant while the commit was prepared."""
    for nxt in part.keys.fill_vacant():
        hand_over(part, nxt)


def prepared(part: PartitionProcessor) -> None:
    """The commit is over (or was not made): keys are handed on again."""
    part.preparing = False
    fill_vacant(part)
    for sk in [sk for sk in part.local_waits.by_key if not part.keys.is_held(sk)]:
        start_local(part, sk)


def start_local(part: PartitionProcessor, sk: bytes) -> None:
    """The key is free: its next subscribed record waiting here takes it."""
    invoke = part.local_waits.pop(sk)
    if invoke is not None:
        part.stats.local_starts += 1
        part.stats.accepted += 1
        part.begin(invoke, part.ahead.read_to, sk)


def hand_over(part: PartitionProcessor, nxt: tuple[int, dict[str, Any], StoreQueue] | None) -> None:
    """Start the next invocation of a key's inbox as the key's holder."""
    if nxt is not None:
        seq, invoke, inbox = nxt
        part.queued -= 1
        part.begin(invoke, seq, part.sk_of(invoke), inbox)
