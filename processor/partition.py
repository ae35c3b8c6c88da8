"""The partition processor: invocations of one log partition.

It owns the partition's store and decides, per record and per outcome, what
changes. It never talks to Kafka itself: records to produce go to the
`TxnOutput` of the current transaction, and the commit loop decides when the
overlay becomes a commit.

Persistence follows "net effects": an invocation that is accepted and
finishes between two commits writes only its effects (state, dedup entry,
outputs). Status, journal, lock and inbox records are written at commit time
only for invocations still in flight (`prepare_commit`), and deleted when
such an invocation finishes. With `net_effects=False` every invocation's
records are written as it goes (for measuring the difference).

Waiting is journaled: a call's Response, a timer or an awakeable result
completes a journal entry and wakes the coroutine. An invocation that waits
longer than `suspend_after` is suspended (it then lives only in the store)
and the completion resumes it by journal replay, the same path as recovery.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from oncely import schemas
from oncely.egress.dead_letters import dead_letter
from oncely.logs import invocation_extra
from oncely.processor import keys
from oncely.processor.effects import InvocationEffects, now_ms
from oncely.processor.protocol import Entry, Executor, HandlerCall, Limits, Outcome, Running
from oncely.processor.store import PartitionStore
from oncely.shuffle.ids import format_id
from oncely.shuffle.routing import partition_for

if TYPE_CHECKING:
    from oncely.app import App

log = logging.getLogger("oncely.partition")

INBOXED, RUNNING, BACKING_OFF, PAUSED = "INBOXED", "RUNNING", "BACKING_OFF", "PAUSED"
SUSPENDED = "SUSPENDED"
TIMER_BATCH = 256
DEFAULT_RETENTION_MS = 24 * 3600 * 1000


class TxnOutput(Protocol):
    """Adds records to the open Kafka transaction."""

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]] | None = None, partition: int | None = None,
                owner: bytes | None = None) -> None:
        """`owner`: the invocation the record belongs to (it fails, and
        nothing else, when the record can never be produced)."""

    def fault(self, inv_id: bytes, why: str) -> None:
        """An invocation's outcome could not be applied: abort the open
        transaction; the invocation fails with `why` when it next starts."""


@dataclass(eq=False)
class Invocation:
    id: bytes
    invoke: dict[str, Any]
    sk: bytes | None               # (service, key) for keyed targets
    seq: int                       # log offset of the Invoke
    phase: str = INBOXED
    attempt: int = 0
    retry_at_ms: int = 0
    error: str | None = None
    journal: list[Entry] = field(default_factory=list)
    running: Running | None = None
    # What the store holds for it (committed or in the overlay).
    status_written: bool = False
    status_dirty: bool = True
    journal_written: int = 0
    journal_dirty: set[int] = field(default_factory=set)  # written entries completed since
    lock_written: bool = False
    inbox_written: bool = False
    awaiting: list[int] = field(default_factory=list)  # journal indexes its coroutine awaits right now
    progress_mark: int = 0  # journal length when it was last seen to progress
    has_early: bool = False  # completions that arrived before their entry
    started: float = 0.0  # monotonic start of its current attempt (metrics)

    @property
    def waiting(self) -> bool:
        return bool(self.awaiting)

    @property
    def target(self) -> str:
        return f"{self.invoke['service']}/{self.invoke['handler']}"


class _KeyQueue:
    __slots__ = ("holder", "waiting")

    def __init__(self) -> None:
        # The invocation holding the key's lock; its id (bytes) while it is
        # suspended and lives only in the store.
        self.holder: Invocation | bytes | None = None
        self.waiting: deque[Invocation] = deque()


class _KeyState:
    """Committed state of one key, read through the overlay."""

    __slots__ = ("store", "sk")

    def __init__(self, store: PartitionStore, sk: bytes) -> None:
        self.store = store
        self.sk = sk

    def get(self, name: str) -> bytes | None:
        return self.store.get(keys.state(self.sk, name))

    def names(self) -> list[str]:
        prefix = keys.state_prefix(self.sk)
        return [k[len(prefix):].decode() for k, _ in self.store.scan(prefix)]


@dataclass
class PartitionStats:
    accepted: int = 0
    duplicates: int = 0
    completed: int = 0
    failed: int = 0
    retries: int = 0
    paused: int = 0
    resumed: int = 0
    timers_fired: int = 0
    suspensions: int = 0
    responses: int = 0


class PartitionProcessor:
    def __init__(
        self,
        app: "App",
        partition: int,
        store: PartitionStore,
        executor: Executor,
        out: TxnOutput,
        net_effects: bool = True,
        effects: Any = None,
        poisoned: dict[bytes, str] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.app = app
        self.partition = partition
        self.store = store
        self.executor = executor
        self.out = out
        self.net_effects = net_effects
        self.effects = effects
        # Invocations that must fail when they next start, with the reason
        # (shared with the commit loop; it survives rewinds).
        self.poisoned: dict[bytes, str] = poisoned if poisoned is not None else {}
        self.limits = limits or Limits()
        self.poison_failed: list[bytes] = []  # poisoned invocations failed in the open transaction
        self._counted = (0, 0)  # (finished, failed) already reported as committed
        self.invocations: dict[bytes, Invocation] = {}
        self.queues: dict[bytes, _KeyQueue] = {}
        self.active: set[Invocation] = set()
        self.dirty: set[Invocation] = set()
        # Retry timers of backing-off invocations (in memory, like them):
        # (fire ms, invocation id, -1). Sleeps and delayed sends are TIMER
        # records in the store, read in fire-time order from `next_timer`.
        self.timers: list[tuple[int, bytes, int]] = []
        self.next_timer: int | None = None
        self.waiters: dict[tuple[bytes, int], asyncio.Future] = {}
        # Waiting invocations by when they last made progress (ms), oldest
        # first: the ones idle past `suspend_after` are suspended.
        self.idle: dict[Invocation, int] = {}
        self.suspend_after_ms = int(app.config.suspend_after * 1000)
        self.suspended = 0  # SUSPENDED invocations in the store
        self.stats = PartitionStats()
        self.metrics = getattr(out, "metrics", None)  # oncely.observe.Metrics, or None without --metrics
        self.closed = False
        self.paused = False  # consumption paused for backpressure
        # Invocations finished, suspended or woken: the commit loop reads on
        # past backpressure when this stops moving (see _apply_backpressure).
        self.progress = 0
        self.progress_seen = 0
        self.progress_at = time.monotonic()
        self.reading_on = False  # resumed past backpressure until progress shows
        self._next_expiry_sweep = 0
        # Without net effects, records of every invocation are written as it
        # goes; a later delete then leaves a tombstone instead of nothing.
        self._put_new = store.put_fresh if net_effects else store.put

    # -- loading (assignment, restart, rewind) -----------------------------------

    def load(self) -> None:
        """Rebuild in-memory invocations from the committed store and resume
        the ones that were running: recovery after a crash and a rewind after
        an abort are this same path."""
        store = self.store
        first = store.scan(keys.TIMER, limit=1)
        self.next_timer = keys.parse_timer(first[0][0])[0] if first else None
        suspended: set[bytes] = set()
        for k, v in store.scan(keys.STATUS):
            st = schemas.decode("invocation_status", v)
            inv_id = k[1:]
            if st["phase"] == SUSPENDED:
                suspended.add(inv_id)  # stays in the store until its completion arrives
                continue
            self._from_store(inv_id, st)
        self.suspended = len(suspended)
        for k, v in store.scan(keys.LOCK):
            if v in suspended:
                self.queues.setdefault(k[1:], _KeyQueue()).holder = v
                continue
            inv = self.invocations.get(v)
            if inv is None or inv.sk != k[1:]:
                log.warning("partition %d: lock without its invocation (%s); dropping it", self.partition, format_id(v))
                store.delete(k)
                continue
            self.queues.setdefault(inv.sk, _KeyQueue()).holder = inv
            inv.lock_written = True
        for k, v in store.scan(keys.INBOX):
            inv = self.invocations.get(v)
            if inv is None:
                store.delete(k)
                continue
            self.queues.setdefault(inv.sk, _KeyQueue()).waiting.append(inv)  # key order = seq order
            inv.inbox_written = True
        for inv in list(self.invocations.values()):
            if inv.phase == INBOXED:
                q = self.queues.get(inv.sk) if inv.sk is not None else None
                if q is None or (q.holder is None and inv not in q.waiting):
                    # An inbox entry was lost; treat it as newly arrived.
                    self._enqueue(inv)
                continue
            if inv.sk is not None:
                q = self.queues.setdefault(inv.sk, _KeyQueue())
                if q.holder is None:
                    q.holder = inv
                    self.dirty.add(inv)
            if inv.phase == BACKING_OFF:
                heapq.heappush(self.timers, (inv.retry_at_ms, inv.id, -1))
            else:
                # RUNNING resumes by replaying its journal; PAUSED invocations
                # are retried once per (re)start, so a fixed handler resumes them.
                self.stats.resumed += 1
                self._start(inv)
        for sk, q in list(self.queues.items()):
            if q.holder is None and q.waiting:
                self._promote(q)
            elif isinstance(q.holder, bytes) and not q.waiting:
                del self.queues[sk]  # the lock in the store is enough (see _enqueue)
        if self.invocations or self.suspended:
            log.info("partition %d: loaded %d in-flight invocations (%d resumed by replay), %d suspended",
                     self.partition, len(self.invocations), self.stats.resumed, self.suspended)

    def _from_store(self, inv_id: bytes, st: dict[str, Any]) -> Invocation:
        """An in-flight invocation as the store holds it (status and journal)."""
        invoke = st["invoke"]
        inv = Invocation(
            id=inv_id, invoke=invoke, sk=self._sk(invoke), seq=st["seq"], phase=st["phase"],
            attempt=st["attempt"], retry_at_ms=st["retry_at_ms"], error=st["error"],
            status_written=True, status_dirty=False,
        )
        store = self.store
        inv.journal.extend(Entry.decode(jv) for _, jv in store.scan(keys.journal_prefix(inv_id)))
        inv.journal_written = len(inv.journal)
        inv.has_early = bool(store.scan(keys.early_prefix(inv_id), limit=1))
        self.invocations[inv_id] = inv
        return inv

    def _sk(self, invoke: dict[str, Any]) -> bytes | None:
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
        self.queues.clear()
        self.dirty.clear()
        self.timers.clear()
        self.next_timer = None
        self.waiters.clear()
        self.idle.clear()
        self.suspended = 0

    # -- input ----------------------------------------------------------------------

    def on_invoke(self, invoke: dict[str, Any], offset: int) -> None:
        inv_id = invoke["invocation_id"]
        # Only an id derived from an idempotency key can arrive twice (the log
        # is read read_committed; random ids are unique), so only those pay
        # for the store lookups.
        phase = self.invocations[inv_id].phase if inv_id in self.invocations else (
            self.lookup(inv_id) if invoke["idempotency_key"] is not None else None)
        if phase is not None:
            self.stats.duplicates += 1
            if self.metrics is not None: self.metrics.duplicate()
            if invoke["caller"] is not None and phase in ("COMPLETED", "FAILED"):
                # A finished callee answers its caller again; one in flight
                # answers when it finishes (the caller is the same one).
                self._respond_again(inv_id, invoke["caller"])
            return
        svc = self.app.services.get(invoke["service"])
        handler = svc.handlers.get(invoke["handler"]) if svc else None
        inv = Invocation(id=inv_id, invoke=invoke, sk=self._sk(invoke), seq=offset)
        self.stats.accepted += 1
        if handler is None:
            self._dead(inv, "unknown-handler",
                       f"app {self.app.name!r} has no handler {invoke['service']}.{invoke['handler']}")
            return
        if svc.keyed and invoke["key"] is None:
            self._dead(inv, "missing-key", f"keyed service {svc.name!r} needs a key; the invocation has none")
            return
        self.invocations[inv_id] = inv
        self._enqueue(inv)

    def lookup(self, inv_id: bytes) -> str | None:
        """Where an invocation id stands on this partition, from the one rule
        every duplicate check uses: its phase while in memory; SUSPENDED while
        only the store holds it in flight; COMPLETED or FAILED while its
        outcome is retained; None when the partition never accepted it (or
        forgot it after the retention)."""
        inv = self.invocations.get(inv_id)
        if inv is not None:
            return inv.phase
        get = self.store.get
        if get(keys.status(inv_id)) is not None:
            return SUSPENDED  # load() brings every other in-flight phase into memory
        if get(keys.failed(inv_id)) is not None:
            return "FAILED"
        if get(keys.dedup(inv_id)) is not None:
            return "COMPLETED"
        return None

    def _enqueue(self, inv: Invocation) -> None:
        if inv.sk is None:
            self._start(inv)
            return
        q = self.queues.get(inv.sk)
        if q is None:
            q = self.queues[inv.sk] = _KeyQueue()
            if self.suspended:
                # A suspended invocation may hold the key; only the store knows.
                q.holder = self.store.get(keys.lock(inv.sk))
        if q.holder is None and not q.waiting:
            q.holder = inv
            self._start(inv)
        else:
            inv.phase = INBOXED
            q.waiting.append(inv)
            self._mark(inv)

    def _promote(self, q: _KeyQueue) -> None:
        nxt = q.waiting.popleft()
        q.holder = nxt
        if nxt.inbox_written:
            self.store.delete(keys.inbox(nxt.sk, nxt.seq))  # type: ignore[arg-type]
            nxt.inbox_written = False
        self._start(nxt)

    def _mark(self, inv: Invocation) -> None:
        inv.status_dirty = True
        self.dirty.add(inv)
        if not self.net_effects:
            self._persist(inv)

    # -- execution ----------------------------------------------------------------

    def _start(self, inv: Invocation) -> None:
        why = self.poisoned.get(inv.id) if self.poisoned else None
        if why is not None:
            # Forgotten only once its failure commits: a rewind may replay it.
            self.poison_failed.append(inv.id)
            self._fail(inv, "unproducible" if why.startswith("a record") else "internal-error", why)
            return
        inv.phase = RUNNING
        self._mark(inv)
        state = _KeyState(self.store, inv.sk) if inv.sk is not None else None
        invoke = inv.invoke
        call = HandlerCall(
            invocation_id=inv.id, service=invoke["service"], handler=invoke["handler"], key=invoke["key"],
            payload=invoke["payload"], payload_format=invoke["payload_format"], attempt=inv.attempt,
            journal=inv.journal, state=state, source=invoke.get("source"), subscription=invoke.get("subscription"),
            effects=InvocationEffects(self, inv), limits=self.limits,
        )
        self.active.add(inv)
        if self.metrics is not None: self.metrics.started(inv)
        inv.running = self.executor.start(call, lambda outcome: self._apply_outcome(inv, outcome))

    def _apply_outcome(self, inv: Invocation, outcome: Outcome) -> None:
        """Apply an outcome; an error doing so must not leave the invocation
        running with its key locked (it would, silently, in asyncio's
        exception handler): the transaction holding half of it is aborted and
        the invocation fails with the reason when the rewind starts it again."""
        try:
            self._on_outcome(inv, outcome)
        except Exception as e:
            log.exception("%s %s: applying its outcome failed", format_id(inv.id), inv.target)
            self.out.fault(inv.id, f"internal error applying its outcome ({outcome.status}): "
                                   f"{type(e).__name__}: {e}")

    def _on_outcome(self, inv: Invocation, outcome: Outcome) -> None:
        if self.closed or self.invocations.get(inv.id) is not inv:
            return  # outcome of a run that a rewind or revocation already dropped
        self.active.discard(inv)
        inv.running = None
        if self.metrics is not None: self.metrics.attempt_ended(inv)
        if not self.net_effects:
            self._persist(inv)
        status = outcome.status
        if status == "completed":
            self._complete(inv, outcome)
        elif status == "terminal":
            self._fail(inv, "terminal", outcome.error or "terminal error")
        elif status == "retry":
            policy = self.app.services[inv.invoke["service"]].retry
            inv.attempt += 1
            inv.error = outcome.error
            if inv.attempt >= policy.max_attempts:
                self._fail(inv, "retries-exhausted",
                           f"failed {inv.attempt} attempts; last error: {outcome.error}")
                return
            self.stats.retries += 1
            if self.metrics is not None: self.metrics.outcome(inv, "retried")
            inv.phase = BACKING_OFF
            inv.retry_at_ms = now_ms() + int(policy.delay(inv.attempt) * 1000)
            heapq.heappush(self.timers, (inv.retry_at_ms, inv.id, -1))
            self._mark(inv)
            log.info("%s %s attempt %d failed, retrying in %d ms: %s", format_id(inv.id), inv.target,
                     inv.attempt, inv.retry_at_ms - now_ms(), outcome.error,
                     extra=invocation_extra(inv, "retrying"))
        else:  # paused
            inv.phase = PAUSED
            inv.error = outcome.error
            self.stats.paused += 1
            if self.metrics is not None: self.metrics.outcome(inv, "paused")
            self._mark(inv)
            log.error("%s %s paused: %s", format_id(inv.id), inv.target, outcome.error,
                      extra=invocation_extra(inv, "paused"))

    def _complete(self, inv: Invocation, outcome: Outcome) -> None:
        store = self.store
        if inv.sk is not None:
            if outcome.cleared_all:
                for k, _ in store.scan(keys.state_prefix(inv.sk)):
                    store.delete(k)
            for name, value in outcome.state.items():
                sk = keys.state(inv.sk, name)
                if value is None:
                    store.delete(sk)
                else:
                    store.put(sk, value)
        for topic, key, value, headers in outcome.emits:
            self.out.produce(topic, key, value, headers, owner=inv.id)
        self._respond(inv.invoke["caller"], inv.id, outcome.value, None)
        self._remember(inv, failed=False, result=outcome.value, error=None)
        self.stats.completed += 1
        if self.metrics is not None: self.metrics.outcome(inv, "completed")
        self._finish(inv)

    def _remember(self, inv: Invocation, failed: bool, result: bytes | None, error: str | None) -> None:
        """Keep a dedup entry for invocations that asked for idempotency."""
        if inv.invoke.get("idempotency_key") is None:
            return
        retention = inv.invoke.get("idempotency_retention_ms") or DEFAULT_RETENTION_MS
        expires = now_ms() + retention
        self.store.put_fresh(keys.dedup(inv.id), schemas.encode("dedup_entry", {
            "expires_at_ms": expires, "failed": failed, "result": result, "error": error}))
        self.store.put_fresh(keys.expiry(expires, keys.DEDUP, inv.id), b"")

    def _fail(self, inv: Invocation, reason: str, error: str) -> None:
        self._dead(inv, reason, error)
        self._finish(inv)

    def _dead(self, inv: Invocation, reason: str, error: str) -> None:
        """Write the dead letter and retain the failed status for inspection."""
        invoke = inv.invoke
        self.stats.failed += 1
        if self.metrics is not None: self.metrics.failed(inv, reason)
        log.warning("%s %s failed (%s): %s", format_id(inv.id), inv.target, reason, error,
                    extra=invocation_extra(inv, "dead-lettered", reason))
        k, v, h = dead_letter(
            self.app.name, reason, error, invoke["key"], invoke["payload"], invocation_id=inv.id,
            target=inv.target, attempts=inv.attempt + (1 if reason != "retries-exhausted" else 0),
            source=invoke.get("source"),
        )
        self.out.produce(self.app.dlq_topic, k, v, h)
        self._respond(invoke["caller"], inv.id, None, error if reason == "terminal" else
                      f"{inv.target} failed ({reason}): {error}")
        retention = invoke.get("idempotency_retention_ms") or DEFAULT_RETENTION_MS
        expires = now_ms() + retention
        self.store.put(keys.failed(inv.id), schemas.encode("invocation_status", {
            "invoke": invoke, "phase": "FAILED", "seq": inv.seq, "attempt": inv.attempt, "retry_at_ms": 0,
            "error": f"{reason}: {error}", "result": None, "updated_at_ms": now_ms(), "expires_at_ms": expires}))
        self.store.put(keys.expiry(expires, keys.FAILED, inv.id), b"")
        if invoke.get("idempotency_key") is not None:
            self._remember(inv, failed=True, result=None, error=error)

    def _finish(self, inv: Invocation) -> None:
        """Forget a finished invocation: delete what the store holds for it
        and hand its key to the next waiting invocation."""
        store = self.store
        if inv.status_written:
            store.delete(keys.status(inv.id))
        for i in range(inv.journal_written):
            store.delete(keys.journal(inv.id, i))
        if inv.inbox_written:
            store.delete(keys.inbox(inv.sk, inv.seq))  # type: ignore[arg-type]
        if inv.lock_written:
            store.delete(keys.lock(inv.sk))  # type: ignore[arg-type]
        if inv.has_early:
            for k, _ in store.scan(keys.early_prefix(inv.id)):
                store.delete(k)
        self.invocations.pop(inv.id, None)
        self.dirty.discard(inv)
        self.active.discard(inv)
        self.idle.pop(inv, None)
        self.progress += 1
        if inv.sk is not None:
            q = self.queues.get(inv.sk)
            if q is not None and q.holder is inv:
                q.holder = None
                if q.waiting:
                    self._promote(q)
                else:
                    del self.queues[inv.sk]

    # -- time -----------------------------------------------------------------------

    def fire_timers(self, now: int) -> None:
        timers = self.timers
        while timers and timers[0][0] <= now:
            at, inv_id, _ = heapq.heappop(timers)
            inv = self.invocations.get(inv_id)
            if inv is not None and inv.phase == BACKING_OFF and inv.retry_at_ms == at:
                self._start(inv)
        if self.next_timer is not None and self.next_timer <= now:
            self._fire_store_timers(now)
        if self.idle:
            self._suspend_idle(now)
        if now >= self._next_expiry_sweep:
            self._next_expiry_sweep = now + 1000
            self._expire(now)

    def _fire_store_timers(self, now: int) -> None:
        """Fire due TIMER records in fire-time order. Deleting the record and
        producing its effect join the same transaction, so a timer fires once."""
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
                self.stats.timers_fired += 1
                if timer["kind"] == "SEND":
                    self.out.produce(self.app.log_topic, timer["routing_key"], timer["record"],
                                     partition=timer["partition"])
                else:
                    self._complete_entry(inv_id, index, None, None)
            if nxt is not None or len(batch) < TIMER_BATCH:
                self.next_timer = nxt
                return

    def add_timer(self, fire_ms: int, inv_id: bytes, index: int, record: dict[str, Any]) -> None:
        self.store.put_fresh(keys.timer(fire_ms, inv_id, index), schemas.encode("timer", record))
        if self.next_timer is None or fire_ms < self.next_timer:
            self.next_timer = fire_ms

    # -- waiting, completions, suspension ---------------------------------------------

    def waiter(self, inv: Invocation, index: int) -> asyncio.Future:
        fut = self.waiters.get((inv.id, index))
        if fut is None:
            fut = self.waiters[(inv.id, index)] = asyncio.get_running_loop().create_future()
        return fut

    def _complete_entry(self, inv_id: bytes, index: int, value: bytes | None, error: str | None,
                        kind: str | None = None) -> str | None:
        """A journal entry that waited (sleep, call, awakeable) completed:
        record it and wake the waiting coroutine, or resume a suspended
        invocation by replay. Returns why it could not be completed."""
        inv = self.invocations.get(inv_id)
        resumed = False
        if inv is None and self.suspended:
            inv = self._load_suspended(inv_id)
            resumed = inv is not None
        if inv is None:
            return "its invocation is not in flight on this partition (it already finished, or never existed)"
        if index >= len(inv.journal):
            reason = f"its journal has no entry {index}"
        else:
            entry = inv.journal[index]
            if kind is not None and entry.kind != kind:
                reason = f"journal entry {index} is a {entry.kind}, not a {kind}"
            elif entry.completed:
                reason = "it was already completed"
            else:
                entry.completed = True
                entry.value = value if value is not None else entry.value
                entry.error = error
                reason = None
                if index < inv.journal_written:
                    inv.journal_dirty.add(index)
                    self.dirty.add(inv)
        if resumed:
            if reason is not None:
                self.suspend(inv)  # nothing changed for it: back to the store
                return reason
            self.stats.resumed += 1
            self._start(inv)  # replay: it waits again if it still has to
        elif reason is None:
            if inv in self.idle:
                self._progressed(inv, now_ms())
            fut = self.waiters.pop((inv_id, index), None)
            if fut is not None and not fut.done():
                fut.set_result(None)
                self.progress += 1
        return reason

    def _load_suspended(self, inv_id: bytes) -> Invocation | None:
        """Bring a suspended invocation back from the store (not yet started)."""
        store = self.store
        raw = store.get(keys.status(inv_id))
        if raw is None:
            return None
        st = schemas.decode("invocation_status", raw)
        if st["phase"] != SUSPENDED:
            return None
        inv = self._from_store(inv_id, st)
        inv.status_dirty = True  # its phase changes when it starts
        self.suspended -= 1
        if inv.sk is not None:
            inv.lock_written = True
            q = self.queues.get(inv.sk)
            if q is None:
                q = self.queues[inv.sk] = _KeyQueue()
            q.holder = inv
        return inv

    def _progressed(self, inv: Invocation, now: int) -> None:
        """Restart an invocation's inactivity clock (it stays in `idle`)."""
        self.idle.pop(inv, None)
        self.idle[inv] = now
        inv.progress_mark = len(inv.journal)

    def _suspend_idle(self, now: int) -> None:
        limit = now - self.suspend_after_ms
        due = []
        for inv, since in self.idle.items():  # oldest first
            if since > limit:
                break
            due.append(inv)
        for inv in due:
            if len(inv.journal) != inv.progress_mark:
                self._progressed(inv, now)  # it journaled steps while it waited (e.g. inside a gather)
            else:
                self.suspend(inv)

    def suspend(self, inv: Invocation) -> None:
        """Drop a waiting invocation's coroutine and keep it only in the
        store; a completion for it resumes it by journal replay."""
        if self.invocations.get(inv.id) is not inv:
            return
        if any(inv.journal[i].completed for i in inv.awaiting):
            return  # woken already: its coroutine runs next, dropping it would lose the wake-up
        inv.phase = SUSPENDED
        inv.status_dirty = True
        self._persist(inv)  # status, journal and lock, before it leaves memory
        for i, e in enumerate(inv.journal):
            if not e.completed:
                self.waiters.pop((inv.id, i), None)
        if inv.running is not None:
            inv.running.cancel()
            inv.running = None
        del self.invocations[inv.id]
        self.active.discard(inv)
        self.dirty.discard(inv)
        self.idle.pop(inv, None)
        self.suspended += 1
        self.stats.suspensions += 1
        self.progress += 1
        if inv.sk is not None:
            q = self.queues.get(inv.sk)
            if q is not None and q.holder is inv:
                if q.waiting:
                    q.holder = inv.id
                else:
                    del self.queues[inv.sk]

    def suspend_waiting(self) -> None:
        """Suspend every waiting invocation (on shutdown), so a restart does
        not replay them until their completions arrive."""
        for inv in [i for i in self.invocations.values() if i.waiting]:
            self.suspend(inv)

    # -- responses and awakeables -----------------------------------------------------

    def _respond(self, caller: dict[str, Any] | None, callee: bytes, value: bytes | None,
                 failure: str | None) -> None:
        """A call's outcome travels to the caller's partition in this transaction."""
        if caller is None:
            return
        record = schemas.encode("log_record", {"body": ("oncely.Response", {
            "invocation_id": caller["invocation_id"], "journal_index": caller["journal_index"],
            "callee_id": callee, "value": value, "failure": failure})})
        self.out.produce(self.app.log_topic, caller["invocation_id"], record, partition=caller["partition"],
                         owner=callee)

    def _respond_again(self, inv_id: bytes, caller: dict[str, Any]) -> None:
        raw = self.store.get(keys.dedup(inv_id))
        if raw is not None:
            d = schemas.decode("dedup_entry", raw)
            self._respond(caller, inv_id, d["result"], d["error"] if d["failed"] else None)

    def on_response(self, body: dict[str, Any]) -> None:
        self.stats.responses += 1
        why = self._complete_entry(body["invocation_id"], body["journal_index"], body["value"], body["failure"],
                                   kind="call")
        if why is not None:
            log.info("response for %s[%d] dropped: %s", format_id(body["invocation_id"]), body["journal_index"], why)

    def on_awakeable_result(self, body: dict[str, Any]) -> None:
        """Resolve or reject an awakeable, once; the resolver gets a reply."""
        inv_id, index = body["invocation_id"], body["journal_index"]
        inv = self.invocations.get(inv_id)
        if inv is not None and index >= len(inv.journal):
            # Its id went out before the entry was journaled here (a replay
            # is on its way to it): keep the completion for the entry.
            key = keys.early(inv_id, index)
            if self.store.get(key) is not None:
                why: str | None = "it was already completed"
            else:
                self.store.put_fresh(key, Entry("awakeable", value=body["value"], error=body["failure"]).encode())
                inv.has_early = True
                why = None
        else:
            why = self._complete_entry(inv_id, index, body["value"], body["failure"], kind="awakeable")
        if why is not None:
            log.info("awakeable %s[%d] not completed: %s", format_id(inv_id), index, why)
        request = body.get("request_id")
        if request is not None:
            answer = {"ok": why is None, "error": why}
            self.out.produce(self.app.replies_topic, request, orjson.dumps(answer),
                             partition=partition_for(request, self.app.partitions))

    def _expire(self, now: int, limit: int = 10_000) -> None:
        """Remove dedup entries and retained failures past their retention."""
        store = self.store
        for k, _ in store.scan(keys.EXPIRY, keys.expiry_upper(now))[:limit]:
            _, space, inv_id = keys.parse_expiry(k)
            store.delete(k)
            store.delete(space + inv_id)

    # -- commit ---------------------------------------------------------------------

    def _persist(self, inv: Invocation) -> None:
        store = self.store
        if inv.status_dirty or not inv.status_written:
            data = schemas.encode("invocation_status", {
                "invoke": inv.invoke, "phase": inv.phase, "seq": inv.seq, "attempt": inv.attempt,
                "retry_at_ms": inv.retry_at_ms, "error": inv.error, "result": None,
                "updated_at_ms": now_ms(), "expires_at_ms": 0,
            })
            if inv.status_written:
                store.put(keys.status(inv.id), data)
            else:
                self._put_new(keys.status(inv.id), data)
                inv.status_written = True
            inv.status_dirty = False
        journal = inv.journal
        for i in range(inv.journal_written, len(journal)):
            self._put_new(keys.journal(inv.id, i), journal[i].encode())
        inv.journal_written = len(journal)
        for i in inv.journal_dirty:
            store.put(keys.journal(inv.id, i), journal[i].encode())
        inv.journal_dirty.clear()
        if inv.sk is not None:
            q = self.queues.get(inv.sk)
            if q is not None and q.holder is inv and not inv.lock_written:
                self._put_new(keys.lock(inv.sk), inv.id)
                inv.lock_written = True
            if inv.phase == INBOXED and not inv.inbox_written:
                self._put_new(keys.inbox(inv.sk, inv.seq), inv.id)
                inv.inbox_written = True

    def prepare_commit(self) -> None:
        """Write what outlives this commit: records of invocations in flight."""
        for inv in self.dirty | self.active:
            if self.invocations.get(inv.id) is inv:
                self._persist(inv)
        self.dirty.clear()

    def after_commit(self, changelog_offset: int | None) -> tuple[int, int]:
        """RocksDB now reflects the commit. Returns the invocations finished
        and failed in it."""
        self.store.commit(changelog_offset)
        stats = self.stats
        finished = stats.completed + stats.failed - self._counted[0]
        failed = stats.failed - self._counted[1]
        self._counted = (stats.completed + stats.failed, stats.failed)
        for inv_id in self.poison_failed:
            self.poisoned.pop(inv_id, None)
        self.poison_failed.clear()
        return finished, failed

    # -- inspection -----------------------------------------------------------------

    def in_flight(self) -> int:
        return len(self.invocations)
