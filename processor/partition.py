"""The partition processor: the invocations of one log partition.

It decides, per log record and per outcome, what changes, and delegates the
parts: admission.py (duplicates and Invokes that can never run),
key_queues.py (one invocation per key), inbox.py (what waits, in the
store), writer.py (what of an in-flight invocation is persisted), timers.py
(durable timers, retries, expiry), waits.py (completions and suspension),
outcomes.py (what an outcome changes), handover.py (a finished invocation's
key to the next in line). It never talks to Kafka itself:
records go to the `TxnOutput` of the open transaction, and the commit loop
decides when the overlay becomes a commit.

An Invoke starts at once when its key is free and fewer than
`max_inflight_per_partition` invocations are in memory; otherwise it waits
in the store's inbox and starts when its key or capacity frees up. Waiting
invocations are suspended after `suspend_after`, or sooner when queued work
needs their room; a completion resumes them by journal replay, the same path
as recovery after a crash.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any

from oncely.processor import admission, completions, controls, first_step, handover, keys, loading, outcomes
from oncely.processor.effects import InvocationEffects
from oncely.processor.executor import LocalExecutor
from oncely.processor.inbox import ReadAhead, StoreQueue, ready_queue
from oncely.processor.invocation import (BACKING_OFF, PAUSED, RUNNING, STARTING, Invocation, PartitionStats,
                                         TxnOutput)
from oncely.processor.key_queues import KeyQueue, KeyQueues
from oncely.processor.local_waits import LocalWaits
from oncely.sdk.protocol import NOT_DECODED, Executor, HandlerCall, Limits, Outcome
from oncely.processor.store import PartitionStore
from oncely.processor.timers import Timers
from oncely.processor.waits import Waits
from oncely.processor.writer import InvocationWriter
from oncely.shuffle.envelope import DECODED
from oncely.shuffle.ids import format_id

if TYPE_CHECKING:
    from oncely.app import App
    from oncely.egress.sinks import Sinks

log = logging.getLogger("oncely.partition")


class PartitionProcessor:
    def __init__(self, app: "App", partition: int, store: PartitionStore, executor: Executor, out: TxnOutput,
                 net_effects: bool = True, sinks: "Sinks | None" = None, poisoned: dict[bytes, str] | None = None,
                 limits: Limits | None = None) -> None:
        self.app = app
        self.partition = partition
        self.store = store
        self.executor = executor
        # The executor that runs in-process handlers, if it lets first steps
        # run in place (first_step.py); a replay-checking one does not.
        self.in_process: LocalExecutor | None = getattr(executor, "in_process", None)
        self.out = out
        self.sinks = sinks
        # Invocations that must fail when they next start, with the reason
        # (shared with the commit loop; it survives rewinds).
        self.poisoned: dict[bytes, str] = poisoned if poisoned is not None else {}
        self.limits = limits or Limits()
        self.max_inflight = app.config.max_inflight_per_partition
        self.poison_failed: list[bytes] = []  # poisoned invocations failed in the open transaction
        self.doomed: dict[bytes, str] = {}  # INBOXED ones cancelled or killed: fail at start (controls.py)
        self._counted = (0, 0)  # (finished, failed) already reported as committed
        self._frozen: tuple[int, int, list[bytes]] | None = None  # the same at the commit on its way
        self.invocations: dict[bytes, Invocation] = {}  # in memory
        self.active: set[Invocation] = set()  # with a running coroutine
        self.suspended = 0  # SUSPENDED invocations in the store
        self.n_paused = 0   # PAUSED ones in memory (they take no capacity)
        self.queued = 0     # INBOXED ones (INBOX and READY, held in memory or stored)
        self.waiters = 0    # invocations with outside callers attached (keys.WAITER; requests.py)
        self.ahead = ReadAhead()  # waiting Invokes held in memory; what a re-read skips
        self.keys = KeyQueues(store, lambda: self.suspended > 0, self.ahead)
        self.ready: StoreQueue = ready_queue(store, self.ahead)
        self.writer = InvocationWriter(store, net_effects, self.keys.holds)
        self.local_waits = LocalWaits(out, app.log_topic, partition)  # subscribed records waiting for their key
        self.timers = Timers(store, self._send_timer, self._wake, self._retry)
        self.waits = Waits(int(app.config.suspend_after * 1000))
        self.stats = PartitionStats()
        self.metrics = getattr(out, "metrics", None)  # oncely.observe.Metrics, or None without --metrics
        self.closed = False
        # While a commit is prepared: finished holders leave their keys vacant
        # (key_queues.py) instead of starting the next in line.
        self.preparing = False

    # -- loading (assignment, restart, rewind) -----------------------------------

    def load(self) -> None:
        """Rebuild in-memory invocations from the committed store (loading.py)."""
        loading.load(self)

    def from_store(self, inv_id: bytes, st: dict[str, Any]) -> Invocation:
        """An in-flight invocation as the store holds it (status and journal)."""
        return loading.from_store(self, inv_id, st)

    def sk_of(self, invoke: dict[str, Any]) -> bytes | None:
        svc = self.app.services.get(invoke["service"])
        if svc is None or not svc.keyed or invoke["key"] is None:
            return None
        return keys.service_key(invoke["service"], invoke["key"])

    def close(self) -> None:
        """Stop everything in memory (a rewind or a revocation); the store is
        left as committed."""
        self.closed = True
        for inv in list(self.active):
            if inv.running is not None:
                inv.running.cancel()
        self.active.clear()
        self.invocations.clear()
        self.keys.clear()
        self.writer.clear()
        self.timers.clear()
        self.waits.clear()
        self.local_waits.clear()
        self.ahead = ReadAhead()
        self.keys.ahead = self.ahead
        self.ready = ready_queue(self.store, self.ahead)
        self.suspended = self.n_paused = self.queued = self.waiters = 0

    # -- input ----------------------------------------------------------------------

    def on_invoke(self, invoke: dict[str, Any], offset: int, local: bool = False) -> bool:
        """Accept an Invoke read at log `offset`. `local`: a subscribed
        record that never went to the log (local_start.py), taken only if it
        starts right now or can wait behind its key's holder in memory
        (local_waits.py); else False, and nothing changed: it goes to the
        log. `offset` is then the read position (its `seq`)."""
        inv_id = invoke["invocation_id"]
        # Only an id derived from an idempotency key can arrive twice (the log
        # is read read_committed; random ids are unique), so only those pay
        # for the store lookups.
        phase = self.invocations[inv_id].phase if inv_id in self.invocations else (
            admission.lookup(self, inv_id) if invoke["idempotency_key"] is not None else None)
        if phase is not None:
            admission.duplicate(self, invoke, phase)
            return True
        svc = self.app.services.get(invoke["service"])
        if svc is None or invoke["handler"] not in svc.handlers or (svc.keyed and invoke["key"] is None):
            admission.undeliverable(self, invoke, offset, svc)
            return True
        sk = keys.service_key(invoke["service"], invoke["key"]) if svc.keyed else None
        if local and sk is not None and sk in self.local_waits.by_key:
            self.local_waits.wait(sk, invoke)  # behind the key's earlier records waiting here
            return True
        # (`_full()`, `bool(self.ready)` and `KeyQueues.is_held`, inlined: once per record; an empty
        # window with nothing beyond it is an empty ready queue without a `peek`)
        ready = self.ready
        full = len(self.invocations) - self.n_paused >= self.max_inflight or (
            (ready.window or ready.beyond) and ready.peek() is not None)
        if full or (sk is not None and (sk in self.keys.held or (self.suspended > 0 and self.keys.is_held(sk)))):
            if local:
                if sk is None or sk not in self.keys.held:
                    return False  # no room, or held by a suspended invocation: the log
                self.local_waits.wait(sk, invoke)  # behind the holder in memory
                return True
            if full:
                self.ready.push(offset, invoke)
            else:
                self.keys.wait(sk, offset, invoke)  # type: ignore[arg-type]
            self.stats.inboxed += 1
            self.queued += 1
        else:
            if local:
                self.stats.local_starts += 1
            self.begin(invoke, offset, sk)
        self.stats.accepted += 1
        return True

    def lookup(self, inv_id: bytes) -> str | None:
        """Where an invocation id stands on this partition (admission.py)."""
        return admission.lookup(self, inv_id)

    def _full(self) -> bool:
        return len(self.invocations) - self.n_paused >= self.max_inflight

    def pump(self) -> None:
        """Start queued invocations while there is room; when there is none,
        suspend waiting invocations (the longest idle first) to make it."""
        ready = self.ready
        while not self.closed and ready.peek() is not None:
            if self._full() and not self._make_room():
                return
            seq, invoke = ready.pop()  # type: ignore[misc]
            sk = self.sk_of(invoke)
            if sk is not None and self.keys.is_held(sk):
                self.keys.wait(sk, seq, invoke)
            else:
                self.queued -= 1
                self.begin(invoke, seq, sk)

    def _make_room(self) -> bool:
        for inv in self.waits.oldest():
            if self.suspend(inv):
                self.stats.pressure_suspensions += 1
                if not self._full():
                    return True
        return False

    # -- execution ----------------------------------------------------------------

    def begin(self, invoke: dict[str, Any], seq: int, sk: bytes | None, inbox: StoreQueue | None = None) -> None:
        """A new invocation starts (and takes its key). Unless it waited in
        a key's inbox, it is `fresh`: registered only when its first step
        does not complete it in place (`start`)."""
        inv = Invocation(invoke["invocation_id"], invoke, sk, seq)
        if inbox is not None:
            self.register(inv, inbox)
            self.start(inv)
        else:
            self.start(inv, fresh=True)

    def register(self, inv: Invocation, inbox: StoreQueue | None = None) -> None:
        """A new invocation joins memory and holds its key (KeyQueues.take, inlined)."""
        self.invocations[inv.id] = inv
        if inv.sk is not None:
            self.keys.held[inv.sk] = KeyQueue(inv, inbox)

    def start(self, inv: Invocation, fresh: bool = False) -> None:
        """Run an attempt of `inv`. A `fresh` one (`begin`) is not yet in
        `invocations` and holds no key: most first steps complete in place
        (first_step.py), and one that does needs neither, since nothing else
        of the partition runs until it returns. Any other path registers it
        first (`register`)."""
        if self.poisoned or self.doomed:
            if fresh:
                self.register(inv)
                fresh = False
            why = self.poisoned.get(inv.id)
            if why is not None:
                # Forgotten only once its failure commits: a rewind may replay it.
                self.poison_failed.append(inv.id)
                outcomes.fail(self, inv, "unproducible" if why.startswith("a record") else "internal-error", why)
                return
            if inv.id in self.doomed:
                controls.fail_doomed(self, inv)
                return
        if inv.phase == PAUSED:
            self.n_paused -= 1
        inv.phase = RUNNING
        invoke = inv.invoke
        # Positional, in HandlerCall's field order (half the cost of keywords, once per record):
        call = HandlerCall(
            inv.id, invoke["service"], invoke["handler"], invoke["key"],  # invocation_id, service, handler, key
            invoke["payload"], invoke["payload_format"], inv.attempt, inv.journal,  # payload, ..., attempt, journal
            self.store.key_state(inv.sk) if inv.sk is not None else None,  # state
            invoke.get("source"), invoke.get("subscription"), InvocationEffects(self, inv), self.limits,
            invoke.get("traceparent"), invoke.get("created_at_ms"), inv.deployment,
            invoke.pop(DECODED, NOT_DECODED),  # input
        )
        if self.metrics is not None:
            self.metrics.started(inv)
        inv.run += 1
        run = inv.run
        inv.running = STARTING  # until its outcome is applied (which may be before `start` returns)
        local = self.in_process
        handler = first_step.handler(self, local, invoke, call) if local is not None and not local.eager else None
        if handler is not None:
            running = first_step.run(self, inv, call, handler, local, run, fresh)  # type: ignore[arg-type]
        else:
            if fresh:
                self.register(inv)
            # (a partial, not a lambda: a closure would make `inv` and `run` cells on every start)
            running = self.executor.start(call, partial(self._apply_outcome, inv, run=run))
        if inv.running is STARTING and inv.run == run:
            inv.running = running
            if running is not None:  # it awaits: only now does it join what a commit persists
                self.active.add(inv)
                self.writer.changed(inv)

    def _apply_outcome(self, inv: Invocation, outcome: Outcome, run: int) -> None:
        """Apply an outcome; an error doing so must not leave the invocation
        running with its key locked (it would, silently, in asyncio's
        exception handler): the transaction holding half of it is aborted and
        the invocation fails with the reason when the rewind starts it again."""
        if self.closed or self.invocations.get(inv.id) is not inv or run != inv.run:
            return  # outcome of a run that a rewind, revocation or control (pause, kill) already dropped
        self.active.discard(inv)
        inv.running = None
        if self.metrics is not None:
            self.metrics.attempt_ended(inv)
        try:
            if not self.writer.net_effects:
                self.writer.persist(inv)
            if outcome.status == "completed":  # (most: `apply`'s first case, without its call)
                outcomes.complete(self, inv, outcome)
            else:
                outcomes.apply(self, inv, outcome)
        except Exception as e:
            log.exception("%s %s: applying its outcome failed", format_id(inv.id), inv.target)
            self.out.fault(inv.id, f"internal error applying its outcome ({outcome.status}): "
                                   f"{type(e).__name__}: {e}")

    # -- time -----------------------------------------------------------------------

    def fire_timers(self, now: int) -> None:
        self.timers.fire(now)
        for inv in self.waits.due(now):
            self.suspend(inv)

    def _send_timer(self, timer: dict[str, Any]) -> None:
        self.out.produce(self.app.log_topic, timer["routing_key"], timer["record"], partition=timer["partition"])

    def _wake(self, inv_id: bytes, index: int) -> None:
        self.complete_entry(inv_id, index, None, None)

    def _retry(self, inv_id: bytes, at: int) -> None:
        inv = self.invocations.get(inv_id)
        if inv is not None and inv.phase == BACKING_OFF and inv.retry_at_ms == at:
            self.start(inv)

    # -- completions and suspension (completions.py) -------------------------------------

    def complete_entry(self, inv_id: bytes, index: int, value: bytes | None, error: str | None,
                       kind: str | None = None) -> str | None:
        return completions.complete_entry(self, inv_id, index, value, error, kind)

    def suspend(self, inv: Invocation) -> bool:
        return completions.suspend(self, inv)

    def suspend_waiting(self) -> None:
        """Suspend every waiting invocation (on shutdown), so a restart does
        not replay them until their completions arrive."""
        for inv in [i for i in self.invocations.values() if i.waiting]:
            completions.suspend(self, inv)

    def on_response(self, body: dict[str, Any]) -> None:
        completions.on_response(self, body)

    def on_awakeable_result(self, body: dict[str, Any]) -> None:
        completions.on_awakeable_result(self, body)

    # -- commit ---------------------------------------------------------------------

    def prepare_commit(self) -> None:
        """Write what outlives this commit: records of invocations in flight,
        and which read-ahead a re-read of the log must apply; subscribed
        records still waiting here go to the log."""
        if self.local_waits.n:
            self.local_waits.flush()
        if self.keys.vacant and (self.ahead.spill_due() or not self.keys.vacant_only_held()):
            handover.fill_vacant(self)  # an inbox in the store needs its key held (a LOCK)
        self.writer.persist_all(self.active)
        self.ahead.prepare_commit(self.store)

    def commit_offset(self) -> int | None:
        """The log offset this partition commits: its first Invoke read but
        not applied (held in memory), else its read position; None when it
        read nothing since it loaded."""
        return self.ahead.commit_offset()

    def freeze(self) -> None:
        """The commit's content is complete (its changelog records are in):
        what happens from now on belongs to the next transaction."""
        self.store.freeze()
        stats = self.stats
        self._frozen = (stats.completed + stats.failed, stats.failed, self.poison_failed)
        self.poison_failed = []

    def after_commit(self, changelog_offset: int | None) -> tuple[int, int]:
        """RocksDB now reflects the commit. Returns the invocations finished
        and failed in it."""
        if self._frozen is None:
            self.freeze()  # committed without a commit on its way (the TestDriver)
        self.store.commit(changelog_offset)
        ended, failed, poison_failed = self._frozen  # type: ignore[misc]
        self._frozen = None
        counted = self._counted
        self._counted = (ended, failed)
        for inv_id in poison_failed:
            self.poisoned.pop(inv_id, None)
        return ended - counted[0], failed - counted[1]

    def in_flight(self) -> int:
        return len(self.invocations)
