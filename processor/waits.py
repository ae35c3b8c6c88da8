"""What running invocations wait for, and for how long.

A coroutine awaiting a journal entry (a call's Response, a sleep's timer, an
awakeable's result) waits on a future here; the completion sets it. Waiting
invocations are kept oldest-idle first: the ones idle past `suspend_after`,
or the oldest when the partition needs room, are suspended (dropped from
memory; a completion resumes them by journal replay).
"""

from __future__ import annotations

import asyncio
from typing import Iterator

from oncely.processor.invocation import Invocation, now_ms


class Waits:
    def __init__(self, suspend_after_ms: int) -> None:
        self.suspend_after_ms = suspend_after_ms
        self.futures: dict[tuple[bytes, int], asyncio.Future] = {}
        # Waiting invocations by when they last made progress (ms), oldest first.
        self.idle: dict[Invocation, int] = {}
        self.woken = 0  # futures set (progress the commit loop can see)

    def future(self, inv: Invocation, index: int) -> asyncio.Future:
        fut = self.futures.get((inv.id, index))
        if fut is None or fut.cancelled():  # a waiter that was cancelled (e.g. a remote attempt ended) took it along
            fut = self.futures[(inv.id, index)] = asyncio.get_running_loop().create_future()
        return fut

    def started(self, inv: Invocation, index: int) -> None:
        """Its coroutine awaits entry `index` now."""
        if not inv.awaiting:
            self.progressed(inv, now_ms())
        inv.awaiting.append(index)

    def stopped(self, inv: Invocation, index: int) -> None:
        if index in inv.awaiting:  # a task an operator's pause dropped may end after a resume restarted it
            inv.awaiting.remove(index)
        if not inv.awaiting:
            self.idle.pop(inv, None)

    def progressed(self, inv: Invocation, now: int) -> None:
        """Restart an invocation's inactivity clock."""
        self.idle.pop(inv, None)
        self.idle[inv] = now
        inv.progress_mark = len(inv.journal)

    def completed(self, inv: Invocation, index: int) -> None:
        """Journal entry `index` of `inv` completed: wake its coroutine."""
        if inv in self.idle:
            self.progressed(inv, now_ms())
        fut = self.futures.pop((inv.id, index), None)
        if fut is not None and not fut.done():
            fut.set_result(None)
            self.woken += 1

    def due(self, now: int) -> list[Invocation]:
        """Waiting invocations idle past `suspend_after`."""
        limit = now - self.suspend_after_ms
        due = []
        for inv, since in list(self.idle.items()):  # oldest first
            if since > limit:
                break
            if len(inv.journal) != inv.progress_mark:
                self.progressed(inv, now)  # it journaled steps while it waited (e.g. inside a gather)
            else:
                due.append(inv)
        return due

    def oldest(self) -> Iterator[Invocation]:
        """Waiting invocations, longest idle first (a snapshot)."""
        return iter(list(self.idle))

    def drop(self, inv: Invocation) -> None:
        """`inv` left memory (suspended or finished)."""
        futures = self.futures
        if futures:  # nothing waits at all in the common case: no lookups
            for i in range(len(inv.journal)):
                futures.pop((inv.id, i), None)
        self.idle.pop(inv, None)

    def clear(self) -> None:
        self.futures.clear()
        self.idle.clear()
