"""What a running invocation's Context may do beyond its own state: join
the partition's open transaction (sends, calls), its timers (delayed sends,
sleeps) and its waits (calls, sleeps, awakeables)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from oncely.errors import TerminalError
from oncely.processor import controls, keys
from oncely.processor.invocation import STARTING, now_ms
from oncely.sdk.protocol import Entry
from oncely.shuffle.delivery import child_invoke
from oncely.shuffle.ids import format_awakeable
from oncely.shuffle.targets import Target, resolve

if TYPE_CHECKING:
    from oncely.processor.invocation import Invocation
    from oncely.processor.partition import PartitionProcessor


class InvocationEffects:
    """The effects of one running invocation (HandlerCall.effects)."""

    __slots__ = ("part", "inv")

    def __init__(self, part: PartitionProcessor, inv: Invocation) -> None:
        self.part = part
        self.inv = inv

    def record(self, topic: str, value: Any, key: Any, headers: Any) -> tuple:
        """An emitted record, complete (egress.sinks)."""
        if self.part.sinks is None:
            raise RuntimeError("ctx.emit: no sinks are configured")
        return self.part.sinks.record(topic, value, key, headers)

    def _live(self, op: str) -> PartitionProcessor:
        """The partition, while this invocation is still its live one. A
        coroutine that outlives a rewind or a revocation (a handler that
        catches CancelledError) must not add effects to a transaction or a
        store that now belong to what Kafka says is committed."""
        part, inv = self.part, self.inv
        # (A fresh first step, STARTING, is not registered yet: PartitionProcessor.start.)
        if part.closed or (part.invocations.get(inv.id) is not inv and inv.running is not STARTING):
            raise asyncio.CancelledError(f"ctx.{op}: the invocation was rewound or moved; dropped")
        return part

    def target(self, target: Any, args: tuple, call: bool) -> Target:
        """Resolve a send/call target; refuse a call to the caller's own key,
        which would wait forever on the key's lock."""
        t = resolve(target, args, self.part.app.services)
        sk = self.inv.sk
        if call and sk is not None and t.key is not None and keys.service_key(t.service, t.key) == sk:
            raise TerminalError(
                f"ctx.call: {t.service}/{t.key!r} calls its own key; the key stays locked until this "
                "invocation returns, so the call would wait forever. Use ctx.send, or call another key")
        return t

    def send(self, t: Target, index: int, delay_ms: int | None) -> bytes:
        """Produce (or schedule) an Invoke of `t` in the open transaction;
        returns the callee's invocation id."""
        return self._invoke("send", t, index, delay_ms, None)[0]

    def call(self, t: Target, index: int) -> int:
        """Produce an Invoke of `t` whose Response comes back to this
        partition for journal entry `index`; returns the callee's log partition."""
        return self._invoke("call", t, index, None, self.part.partition)[1]

    def _invoke(self, op: str, t: Target, index: int, delay_ms: int | None,
                reply_to: int | None) -> tuple[bytes, int]:
        part = self._live(op)
        callee, d = child_invoke(self.inv.id, index, t, part.app.partitions, reply_to)
        if delay_ms:
            part.timers.add(now_ms() + delay_ms, self.inv.id, index, {
                "kind": "SEND", "partition": d.partition, "routing_key": d.key, "record": d.value})
        else:
            part.out.produce(part.app.log_topic, d.key, d.value, partition=d.partition, owner=self.inv.id)
        return callee, d.partition

    def sleep_until(self, fire_ms: int, index: int) -> None:
        self._live("sleep").timers.add(fire_ms, self.inv.id, index, {
            "kind": "WAKE", "partition": -1, "routing_key": None, "record": None})

    def pin(self, deployment: str) -> None:
        """Remote handlers: the invocation stays with `deployment` (its first
        applied answer came from there); persisted with its status, in the
        transaction that holds that answer's effects."""
        part, inv = self.part, self.inv
        if part.closed or part.invocations.get(inv.id) is not inv or inv.deployment == deployment:
            return
        inv.deployment = deployment
        part.writer.changed(inv)

    def awakeable_id(self, index: int) -> str:
        return format_awakeable(self.part.app.name, self.part.partition, self.inv.id, index)

    def early_completion(self, index: int, entry: Entry) -> None:
        """Complete a new awakeable entry whose result arrived first."""
        inv = self.inv
        if not inv.has_early:
            return
        part = self._live("awakeable")
        key = keys.early(inv.id, index)
        raw = part.store.get(key)
        if raw is not None:
            early = Entry.decode(raw)
            entry.completed, entry.value, entry.error = True, early.value, early.error
            part.store.delete(key)

    async def wait(self, index: int) -> None:
        """Wait until the journal entry at `index` completes."""
        part = self._live("wait")
        inv = self.inv
        if inv.cancelled and controls.deliver_cancel(part, inv, index):
            return  # the entry completed with "cancelled"
        waits = part.waits
        fut = waits.future(inv, index)
        waits.started(inv, index)
        try:
            await fut
        finally:
            waits.stopped(inv, index)
