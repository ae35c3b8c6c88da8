"""Subscribed records that wait here for their key, without the log.

A source record whose log partition runs in this process starts at once
when its key is free (local_start.py). When the key is held by an
invocation in memory, sending the record through the log would make every
later record of that key follow it there until it is read back, so under a
backlog almost nothing would start locally. Instead it waits here, in
memory, behind the key's holder and the key's inbox, and takes the key when
they are done (`PartitionProcessor.finish`).

Nothing of it is persisted: its source offset is in the open transaction.
Whatever still waits when a commit is prepared goes to the log as an Invoke
in that commit (in key order, and counted in transit, so later records of
the key follow it through the log), as does the rest of a key whose holder
leaves memory (suspended). A rewind drops them with the source offsets
that read them.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from oncely.shuffle.envelope import encode_invoke

if TYPE_CHECKING:
    from oncely.processor.invocation import TxnOutput


class LocalWaits:
    """One log partition's waiting subscribed records, per (service, key)."""

    __slots__ = ("by_key", "ids", "n", "on_flush", "out", "topic", "partition")

    def __init__(self, out: "TxnOutput", topic: str, partition: int) -> None:
        self.out, self.topic, self.partition = out, topic, partition  # the log partition
        self.by_key: dict[bytes, deque[dict[str, Any]]] = {}
        self.ids: set[bytes] = set()  # their invocation ids: a duplicate lookup sees them as queued
        self.n = 0
        # Told of Invokes that went to the log instead (local_start.py counts them in transit).
        self.on_flush: Callable[[list[dict[str, Any]]], None] | None = None

    def __len__(self) -> int:
        return self.n

    def wait(self, sk: bytes, invoke: dict[str, Any]) -> None:
        q = self.by_key.get(sk)
        if q is None:
            self.by_key[sk] = q = deque()
        q.append(invoke)
        self.ids.add(invoke["invocation_id"])
        self.n += 1

    def pop(self, sk: bytes) -> dict[str, Any] | None:
        """The key's next waiting record, if any."""
        q = self.by_key.get(sk)
        if q is None:
            return None
        invoke = q.popleft()
        if not q:
            del self.by_key[sk]
        self.ids.discard(invoke["invocation_id"])
        self.n -= 1
        return invoke

    def take(self, sk: bytes | None = None) -> list[dict[str, Any]]:
        """Remove and return a key's waiting records (all keys' for None), in order."""
        if sk is None:
            out = [invoke for q in self.by_key.values() for invoke in q]
            self.by_key.clear()
            self.ids.clear()
            self.n = 0
            return out
        q = self.by_key.pop(sk, None)
        if q is None:
            return []
        for invoke in q:
            self.ids.discard(invoke["invocation_id"])
        self.n -= len(q)
        return list(q)

    def flush(self, sk: bytes | None = None) -> None:
        """A key's (or every) waiting record goes to the log after all, in
        order, in the open transaction."""
        invokes = self.take(sk)
        produce, topic, p = self.out.produce, self.topic, self.partition
        for invoke in invokes:
            produce(topic, invoke["key"], encode_invoke(invoke), partition=p)
        if invokes and self.on_flush is not None:
            self.on_flush(invokes)

    def clear(self) -> None:
        self.by_key.clear()
        self.ids.clear()
        self.n = 0
