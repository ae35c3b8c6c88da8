"""Blocking Kafka client calls, run where a watchdog can see them.

librdkafka's transactional calls do not always honour their timeout (a
`send_offsets_to_transaction` waiting on a decommissioned group coordinator
after a broker restart blocks forever: librdkafka #5456/#5511). No such call
runs on the event-loop thread: a `Worker` runs it on its own daemon thread
and the caller waits in short slices, so that

- a call that outlives its bound raises `Stuck` (the caller treats it as
  fatal: the client is abandoned, never touched again, and replaced);
- a stop request (SIGTERM/SIGINT, `interrupt`) ends the wait of a call that
  has already run for a while, so shutdown never waits on a stuck client.

A stuck worker thread stays blocked inside librdkafka; it is a daemon, and a
process that abandoned a client exits with `os._exit` (see runtime.run), so
nothing waits for it at exit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Generic, TypeVar

log = logging.getLogger("oncely.worker")

T = TypeVar("T")

# A stop request abandons a call only after it ran this long: a healthy
# commit takes milliseconds and should finish.
INTERRUPT_GRACE = 1.0
_SLICE = 0.05


class Stuck(Exception):
    """A client call did not return within its bound (or was abandoned on a
    stop request); its client must not be used again."""

    def __init__(self, during: str, seconds: float, interrupted: bool = False) -> None:
        why = "abandoned on a stop request" if interrupted else "did not return"
        super().__init__(f"{during} {why} after {seconds:.1f} s")
        self.during = during
        self.interrupted = interrupted


class Worker:
    """One daemon thread running blocking calls of one client, in order."""

    def __init__(self, name: str, interrupt: threading.Event) -> None:
        self.name = name
        self.interrupt = interrupt
        self.stuck = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"oncely-{name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)
            # Nothing of a finished call stays referenced while the next is
            # awaited (a consumer is dropped by letting go of it: rebalance.py).
            item = fut = fn = None

    def submit(self, fn: Callable[[], T]) -> "Future[T]":
        """Queue `fn`; the caller polls the future (see `call` for waiting)."""
        if self.stuck:
            raise Stuck(f"{self.name} (an earlier call is stuck)", 0.0)
        fut: Future = Future()
        self._queue.put((fut, fn))
        return fut

    def call(self, fn: Callable[[], T], bound: float, during: str) -> T:
        """Run `fn` on the worker and wait for it, at most `bound` seconds."""
        return self.start(fn, bound).result(during)

    def start(self, fn: Callable[[], T], bound: float) -> "Pending[T]":
        """Run `fn` on the worker without waiting: the caller goes on and
        checks back (`Pending`), e.g. a commit while the loop processes."""
        return Pending(self, self.submit(fn), bound)

    def _abandon(self, during: str, elapsed: float, interrupted: bool) -> None:
        self.stuck = True
        err = Stuck(during, elapsed, interrupted)
        log.error("%s: %s; abandoning this Kafka client", self.name, err)
        raise err

    def close(self) -> None:
        """Let the thread end after what is queued (a stuck one never does)."""
        self._queue.put(None)


class Pending(Generic[T]):
    """A call on a worker that its caller does not wait for; its bound runs
    from the submission."""

    def __init__(self, worker: Worker, future: "Future[T]", bound: float) -> None:
        self.worker = worker
        self.future = future
        self.bound = bound
        self.started = time.monotonic()

    def ready(self) -> bool:
        """Its result (or its Stuck) is at hand: `result` will not wait."""
        if self.future.done():
            return True
        elapsed = time.monotonic() - self.started
        return elapsed >= self.bound or (self.worker.interrupt.is_set() and elapsed >= INTERRUPT_GRACE)

    def result(self, during: str) -> T:
        """Wait for the call, up to its bound: its result, its exception, or
        `Stuck` (the worker's client must not be used again)."""
        fut, worker = self.future, self.worker
        while True:
            try:
                return fut.result(timeout=_SLICE)
            except FutureTimeout:
                elapsed = time.monotonic() - self.started
                if worker.interrupt.is_set() and elapsed >= INTERRUPT_GRACE:
                    worker._abandon(during, elapsed, interrupted=True)
                if elapsed >= self.bound:
                    worker._abandon(during, elapsed, interrupted=False)

    async def nap(self, seconds: float) -> None:
        """Sleep on the event loop up to `seconds`, less when the call ends sooner."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        def wake_from_worker(_: Any) -> None:
            try:
                loop.call_soon_threadsafe(wake)
            except RuntimeError:
                pass  # the loop is closed: nobody naps

        timer = loop.call_later(seconds, wake)
        self.future.add_done_callback(wake_from_worker)
        try:
            await waiter
        finally:
            timer.cancel()
