"""A partition's clocks: durable timers, retry timers and retention expiry.

Sleeps and delayed sends are TIMER records in the store, read in fire-time
order; deleting the record and producing its effect join one transaction,
so a timer fires once. Retries of backing-off invocations are in memory, like
those invocations. Dedup entries and retained failures expire after their
retention.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable

from oncely import schemas
from oncely.processor import keys
from oncely.processor.store import PartitionStore

TIMER_BATCH = 256
EXPIRY_BATCH = 10_000


class Timers:
    def __init__(self, store: PartitionStore, on_send: Callable[[dict[str, Any]], None],
                 on_wake: Callable[[bytes, int], None], on_retry: Callable[[bytes, int], None]) -> None:
        self.store = store
        self._on_send = on_send
        self._on_wake = on_wake
        self._on_retry = on_retry
        self.retries: list[tuple[int, bytes]] = []  # (fire ms, invocation id)
        self.next_timer: int | None = None
        self.fired = 0
        self._next_expiry_sweep = 0

    def load(self) -> None:
        first = self.store.scan(keys.TIMER, limit=1)
        self.next_timer = keys.parse_timer(first[0][0])[0] if first else None

    def clear(self) -> None:
        self.retries.clear()
        self.next_timer = None

    def add(self, fire_ms: int, inv_id: bytes, index: int, record: dict[str, Any]) -> None:
        self.store.put_fresh(keys.timer(fire_ms, inv_id, index), schemas.encode("timer", record))
        if self.next_timer is None or fire_ms < self.next_timer:
            self.next_timer = fire_ms

    def retry_at(self, fire_ms: int, inv_id: bytes) -> None:
        heapq.heappush(self.retries, (fire_ms, inv_id))

    def fire(self, now: int) -> None:
        retries = self.retries
        while retries and retries[0][0] <= now:
            at, inv_id = heapq.heappop(retries)
            self._on_retry(inv_id, at)
        if self.next_timer is not None and self.next_timer <= now:
            self._fire_stored(now)
        if now >= self._next_expiry_sweep:
            self._next_expiry_sweep = now + 1000
            self._expire(now)

    def _fire_stored(self, now: int) -> None:
        store = self.store
        while True:
            batch = store.scan(keys.TIMER, limit=TIMER_BATCH)
            nxt = None
            for key, raw in batch:
                at, inv_id, index = keys.parse_timer(key)
                if at > now:
                    nxt = at
                    break
                store.delete(key)
                timer = schemas.decode("timer", raw)
                self.fired += 1
                if timer["kind"] == "SEND":
                    self._on_send(timer)
                else:
                    self._on_wake(inv_id, index)
            if nxt is not None or len(batch) < TIMER_BATCH:
                self.next_timer = nxt
                return

    def _expire(self, now: int) -> None:
        """Remove dedup entries and retained failures past their retention."""
        store = self.store
        for k, _ in store.scan(keys.EXPIRY, keys.expiry_upper(now), limit=EXPIRY_BATCH):
            _, space, inv_id = keys.parse_expiry(k)
            store.delete(k)
            store.delete(space + inv_id)
