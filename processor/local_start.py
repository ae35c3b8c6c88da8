"""Subscribed records that start here, without crossing Kafka twice.

A source record becomes an Invoke for log partition L (ingest/router.py).
When this process runs L, and L would start the Invoke at once had it read
it from the log, it starts it now, in the transaction that commits the
source offset: its effects (or, still in flight at the commit, its status
and journal) commit with that offset, and a rewind drops both. Otherwise the
Invoke goes to the log as before.

Starting it now must not overtake anything older for the same key that is
still on the log, so a partition starts one only when

- **caught up**: after every change of assignment and every rewind (a
  source partition that moved here may have Invokes of its previous owner
  still unread on L), L is not caught up until it reads back a marker
  (`oncely.Mark`: this process's random token and its epoch) that this
  process produced to it after the change; everything older on L has been
  read by then. Markers of other processes and older epochs are ignored;
- **nothing in transit**: no Invoke this process produced to L for the same
  routing key since then is still unread (counted per key, matched by
  invocation id when read back); otherwise it waits here until the last of
  them is read back and applied, then goes on as if just read
  (local_waits.py);
- and the Invoke starts at once (the partition has room, nothing waits for
  capacity, and the key is free), or its key is held by an invocation in
  memory, behind which it waits here (`PartitionProcessor.on_invoke(local=True)`).

Whatever still waits at a commit or an assignment change goes to the log
then, before anything newer of its key.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from oncely import schemas
from oncely.processor.invocation import TxnOutput
from oncely.processor.partition import PartitionProcessor
from oncely.shuffle.envelope import encode_invoke

if TYPE_CHECKING:
    from oncely.ingest.router import Routed


class _Gate:
    """One log partition's bookkeeping since the last reset."""

    __slots__ = ("part", "caught_up", "ids", "keys", "n")

    def __init__(self, part: PartitionProcessor) -> None:
        self.part = part
        self.caught_up = False
        self.n = 0  # Invokes in transit
        self.ids: dict[bytes, int] = {}   # invocation id -> Invokes produced, not read back
        self.keys: dict[bytes, int] = {}  # routing key -> Invokes produced, not read back


class LocalStarts:
    """The process's local starts over its running log partitions (the
    `Assignment`'s dict, which it keeps up to date)."""

    def __init__(self, partitions: dict[int, PartitionProcessor]) -> None:
        self.partitions = partitions
        self.token = os.urandom(16)
        self.epoch = 0
        self.marks = 0  # markers produced
        self.flushed = 0  # records that waited here and went to the log after all
        self._gates: dict[int, _Gate] = {}

    def reset(self, flush: bool = False) -> None:
        """A partition was assigned, revoked or rewound: no log partition is
        caught up, and what was in transit is covered by the next marker.
        `flush` (the open transaction goes on): records waiting here go to
        the log first, ahead of the newer ones of their keys that will."""
        if flush:
            for part in self.partitions.values():
                if part.local_waits.n:
                    part.local_waits.flush()
        self.epoch += 1
        self._gates.clear()

    def start(self, routed: "Routed", out: TxnOutput) -> bool:
        """Start the routed Invoke on its partition now when that is allowed;
        False: the caller produces it to the log (and calls `sent`)."""
        p = routed.partition
        part = self.partitions.get(p)
        if part is None:
            return False
        gate = self._gates.get(p)
        if gate is None or gate.part is not part:
            self._open_gate(part, out)
            return False
        if not gate.caught_up:
            return False
        key = routed.key
        if key in gate.keys:  # (as `_place` does, without a call on the hot path)
            part.local_waits.wait_for_log(key, routed.invoke)
            return True
        return part.on_invoke(routed.invoke, part.ahead.read_to, local=True)

    def _open_gate(self, part: PartitionProcessor, out: TxnOutput) -> None:
        """A new gate for `part`, closed until its marker is read back."""
        p = part.partition
        self._gates[p] = _Gate(part)
        part.local_waits.on_flush = lambda invokes: self._flushed(part, invokes)
        self.marks += 1
        out.produce(part.app.log_topic, None, schemas.encode("log_record", {"body": (
            "oncely.Mark", {"token": self.token, "epoch": self.epoch})}), partition=p)

    def _place(self, gate: _Gate, key: bytes, invoke: dict[str, Any]) -> bool:
        """Start the Invoke here or let it wait here; False: neither."""
        part = gate.part
        if key in gate.keys:  # behind the key's Invokes in transit (local_waits.py)
            part.local_waits.wait_for_log(key, invoke)
            return True
        # The read position as its seq: nothing orders by a running invocation's seq.
        return part.on_invoke(invoke, part.ahead.read_to, local=True)

    def sent(self, routed: "Routed") -> None:
        """The routed Invoke went to the log: in transit until read back."""
        gate = self._gates.get(routed.partition)
        if gate is not None:
            self._count(gate, routed.invocation_id, routed.key)

    def _count(self, gate: _Gate, inv_id: bytes, key: bytes) -> None:
        ids, keys = gate.ids, gate.keys
        ids[inv_id] = ids.get(inv_id, 0) + 1
        keys[key] = keys.get(key, 0) + 1
        gate.n += 1

    def _flushed(self, part: PartitionProcessor, invokes: list[dict[str, Any]]) -> None:
        """Records that waited on `part` went to its log: in transit."""
        self.flushed += len(invokes)
        gate = self._gates.get(part.partition)
        if gate is None or gate.part is not part:
            return  # the next gate's marker follows them on the log
        for invoke in invokes:
            self._count(gate, invoke["invocation_id"], invoke["key"])

    def read_back(self, part: PartitionProcessor, invoke: dict[str, Any]) -> bytes | None:
        """An Invoke read from `part`'s log: if this process produced it, it
        is no longer in transit. Returns its routing key when that was the
        key's last one in transit and records wait for it (call `release`
        once the Invoke is applied)."""
        gate = self._gates.get(part.partition)
        if gate is None or not gate.ids:
            return None
        inv_id = invoke["invocation_id"]
        n = gate.ids.pop(inv_id, 0)
        if not n:
            return None
        gate.n -= 1
        if n > 1:
            gate.ids[inv_id] = n - 1
        key = invoke["key"] if invoke["key"] is not None else inv_id  # the routing key (router.py)
        left = gate.keys.get(key, 1) - 1
        if left:
            gate.keys[key] = left
            return None
        gate.keys.pop(key, None)
        return key if key in part.local_waits.transit else None

    def release(self, part: PartitionProcessor, key: bytes) -> None:
        """The records that waited for `key`'s Invokes on the log go on, in
        order, as if just read: started, waiting for the key, or (no room)
        to the log."""
        gate = self._gates.get(part.partition)
        waiting = part.local_waits.read_back(key)
        for invoke in waiting:
            if gate is None or gate.part is not part or not self._place(gate, key, invoke):
                part.out.produce(part.app.log_topic, key, encode_invoke(invoke), partition=part.partition)
                if gate is not None and gate.part is part:
                    self._count(gate, invoke["invocation_id"], key)

    def on_mark(self, part: PartitionProcessor, mark: dict[str, Any]) -> None:
        """A marker read from `part`'s log: ours of this epoch means caught up."""
        gate = self._gates.get(part.partition)
        if gate is not None and gate.part is part and mark["epoch"] == self.epoch and mark["token"] == self.token:
            gate.caught_up = True

    def in_transit(self, p: int) -> int:
        """Invokes this process produced to log partition `p` (since the last
        reset) and has not read back, and records waiting there in memory:
        they will need room."""
        gate = self._gates.get(p)
        part = self.partitions.get(p)
        return (gate.n if gate is not None else 0) + (part.local_waits.n if part is not None else 0)

    def caught_up(self, p: int) -> bool:
        gate = self._gates.get(p)
        return gate is not None and gate.caught_up and gate.part is self.partitions.get(p)
