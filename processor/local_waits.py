"""Subscribed records that wait here, in memory, without the log.

A source record whose log partition runs in this process starts at once
when its key is free (local_start.py). Otherwise sending it through the
log would make every later record of its key follow it there until it is
read back, and a key with steady traffic would never come back. So it
waits here, in one of two stages:

- **for its key** (`by_key`, per service key): the key is held by an
  invocation in memory (or was when the first of them came: its holder may
  have been suspended since); the record waits behind it and the key's
  inbox, and takes the key when they are done (`PartitionProcessor.finish`);
- **for the log** (`transit`, per routing key): Invokes of its key that this
  process sent to the log are not read back yet; when the last is, the
  records go on in order as if just read (`LocalStarts.read_back`).

A key's records are in one stage at a time, and those waiting for the key
are older than those waiting for the log. Nothing of them is persisted:
their source offsets are in the open transaction. Whatever still waits
when a commit is prepared goes to the log in that commit (for each key the
first stage, then the second: source order), counted in transit. A rewind
drops them with the source offsets that read them.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from oncely.shuffle.envelope import encode_invoke

if TYPE_CHECKING:
    from oncely.processor.invocation import TxnOutput

Queues = dict[bytes, deque[dict[str, Any]]]


class LocalWaits:
    """One log partition's waiting subscribed records."""

    __slots__ = ("by_key", "transit", "ids", "n", "on_flush", "out", "topic", "partition")

    def __init__(self, out: "TxnOutput", topic: str, partition: int) -> None:
        self.out, self.topic, self.partition = out, topic, partition  # the log partition
        self.by_key: Queues = {}   # service key -> records waiting for it
        self.transit: Queues = {}  # routing key -> records waiting for its Invokes on the log
        self.ids: set[bytes] = set()  # their invocation ids: a duplicate lookup sees them as queued
        self.n = 0
        # Told of Invokes that went to the log after all (local_start.py counts them in transit).
        self.on_flush: Callable[[list[dict[str, Any]]], None] | None = None

    def wait(self, sk: bytes, invoke: dict[str, Any]) -> None:
        """Behind the holder of service key `sk`."""
        self._add(self.by_key, sk, invoke)

    def wait_for_log(self, routing_key: bytes, invoke: dict[str, Any]) -> None:
        """Until the key's Invokes in transit are read back."""
        self._add(self.transit, routing_key, invoke)

    def _add(self, queues: Queues, key: bytes, invoke: dict[str, Any]) -> None:
        q = queues.get(key)
        if q is None:
            queues[key] = q = deque()
        q.append(invoke)
        self.ids.add(invoke["invocation_id"])
        self.n += 1

    def pop(self, sk: bytes) -> dict[str, Any] | None:
        """The next record waiting for service key `sk`, if any."""
        q = self.by_key.get(sk)
        if q is None:
            return None
        invoke = q.popleft()
        if not q:
            del self.by_key[sk]
        self.ids.discard(invoke["invocation_id"])
        self.n -= 1
        return invoke

    def read_back(self, routing_key: bytes) -> list[dict[str, Any]]:
        """The records that waited for the key's Invokes on the log, in order."""
        return self._take(self.transit, routing_key)

    def _take(self, queues: Queues, key: bytes) -> list[dict[str, Any]]:
        q = queues.pop(key, None)
        if q is None:
            return []
        for invoke in q:
            self.ids.discard(invoke["invocation_id"])
        self.n -= len(q)
        return list(q)

    def flush(self) -> None:
        """Everything waiting goes to the log after all, in order, in the
        open transaction."""
        invokes = [invoke for queues in (self.by_key, self.transit) for q in queues.values() for invoke in q]
        self.clear()
        produce, topic, p = self.out.produce, self.topic, self.partition
        for invoke in invokes:
            produce(topic, invoke["key"], encode_invoke(invoke), partition=p)
        if invokes and self.on_flush is not None:
            self.on_flush(invokes)

    def clear(self) -> None:
        self.by_key.clear()
        self.transit.clear()
        self.ids.clear()
        self.n = 0
