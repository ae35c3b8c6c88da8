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
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from oncely import schemas
from oncely.egress.dead_letters import dead_letter
from oncely.processor import keys
from oncely.processor.protocol import Entry, Executor, HandlerCall, Outcome, Running
from oncely.processor.store import PartitionStore
from oncely.shuffle.envelope import invoke_record
from oncely.shuffle.ids import child_id, format_id
from oncely.shuffle.routing import partition_for
from oncely.shuffle.targets import resolve

if TYPE_CHECKING:
    from oncely.app import App

log = logging.getLogger("oncely.partition")

INBOXED, RUNNING, BACKING_OFF, PAUSED = "INBOXED", "RUNNING", "BACKING_OFF", "PAUSED"
DEFAULT_RETENTION_MS = 24 * 3600 * 1000


class TxnOutput(Protocol):
    """Adds records to the open Kafka transaction."""

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]] | None = None, partition: int | None = None) -> None: ...


def now_ms() -> int:
    return int(time.time() * 1000)


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
    waiting: bool = False  # awaiting a timer (or, later, a response)

    @property
    def target(self) -> str:
        return f"{self.invoke['service']}/{self.invoke['handler']}"


class _KeyQueue:
    __slots__ = ("holder", "waiting")

    def __init__(self) -> None:
        self.holder: Invocation | None = None
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
    ) -> None:
        self.app = app
        self.partition = partition
        self.store = store
        self.executor = executor
        self.out = out
        self.net_effects = net_effects
        self.effects = effects
        self.invocations: dict[bytes, Invocation] = {}
        self.queues: dict[bytes, _KeyQueue] = {}
        self.active: set[Invocation] = set()
        self.dirty: set[Invocation] = set()
        # (fire ms, invocation id, journal index); index -1 is a retry timer
        # (derived from the status), others are TIMER records in the store.
        self.timers: list[tuple[int, bytes, int]] = []
        self.waiters: dict[tuple[bytes, int], asyncio.Future] = {}
        self.stats = PartitionStats()
        self.closed = False
        self.paused = False  # consumption paused for backpressure
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
        for k, _ in store.scan(keys.TIMER):
            fire_ms, inv_id, index = keys.parse_timer(k)
            heapq.heappush(self.timers, (fire_ms, inv_id, index))
        for k, v in store.scan(keys.STATUS):
            st = schemas.decode("invocation_status", v)
            inv_id = k[1:]
            invoke = st["invoke"]
            inv = Invocation(
                id=inv_id, invoke=invoke, sk=self._sk(invoke), seq=st["seq"], phase=st["phase"],
                attempt=st["attempt"], retry_at_ms=st["retry_at_ms"], error=st["error"],
                status_written=True, status_dirty=False,
            )
            for jk, jv in store.scan(keys.journal_prefix(inv_id)):
                e = schemas.decode("journal_entry", jv)
                inv.journal.append(Entry(e["kind"], e["name"], e["value"], e["error"], e["completed"]))
            inv.journal_written = len(inv.journal)
            self.invocations[inv_id] = inv
        for k, v in store.scan(keys.LOCK):
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
        for q in self.queues.values():
            if q.holder is None and q.waiting:
                self._promote(q)
        if self.invocations:
            log.info("partition %d: loaded %d in-flight invocations (%d resumed by replay)", self.partition,
                     len(self.invocations), self.stats.resumed)

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
        self.waiters.clear()

    # -- input ----------------------------------------------------------------------

    def on_invoke(self, invoke: dict[str, Any], offset: int) -> None:
        inv_id = invoke["invocation_id"]
        # Only an id derived from an idempotency key can arrive twice (the log
        # is read read_committed; random ids are unique), so only those pay
        # for the store lookups.
        if inv_id in self.invocations or (invoke["idempotency_key"] is not None and self._known(inv_id)):
            self.stats.duplicates += 1
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

    def _known(self, inv_id: bytes) -> bool:
        """Finished within the dedup retention (or retained as failed)."""
        store = self.store
        return store.get(keys.dedup(inv_id)) is not None or store.get(keys.failed(inv_id)) is not None

    def _enqueue(self, inv: Invocation) -> None:
        if inv.sk is None:
            self._start(inv)
            return
        q = self.queues.get(inv.sk)
        if q is None:
            q = self.queues[inv.sk] = _KeyQueue()
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
        inv.phase = RUNNING
        self._mark(inv)
        state = _KeyState(self.store, inv.sk) if inv.sk is not None else None
        invoke = inv.invoke
        call = HandlerCall(
            invocation_id=inv.id, service=invoke["service"], handler=invoke["handler"], key=invoke["key"],
            payload=invoke["payload"], payload_format=invoke["payload_format"], attempt=inv.attempt,
            journal=inv.journal, state=state, source=invoke.get("source"), subscription=invoke.get("subscription"),
            effects=InvocationEffects(self, inv),
        )
        self.active.add(inv)
        inv.running = self.executor.start(call, lambda outcome: self._on_outcome(inv, outcome))

    def _on_outcome(self, inv: Invocation, outcome: Outcome) -> None:
        if self.closed or self.invocations.get(inv.id) is not inv:
            return  # outcome of a run that a rewind or revocation already dropped
        self.active.discard(inv)
        inv.running = None
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
            inv.phase = BACKING_OFF
            inv.retry_at_ms = now_ms() + int(policy.delay(inv.attempt) * 1000)
            heapq.heappush(self.timers, (inv.retry_at_ms, inv.id, -1))
            self._mark(inv)
            log.info("%s %s attempt %d failed, retrying in %d ms: %s", format_id(inv.id), inv.target,
                     inv.attempt, inv.retry_at_ms - now_ms(), outcome.error)
        else:  # paused
            inv.phase = PAUSED
            inv.error = outcome.error
            self.stats.paused += 1
            self._mark(inv)
            log.error("%s %s paused: %s", format_id(inv.id), inv.target, outcome.error)

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
            self.out.produce(topic, key, value, headers)
        self._remember(inv, failed=False, result=outcome.value, error=None)
        self.stats.completed += 1
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
        log.warning("%s %s failed (%s): %s", format_id(inv.id), inv.target, reason, error)
        k, v, h = dead_letter(
            self.app.name, reason, error, invoke["key"], invoke["payload"], invocation_id=inv.id,
            target=inv.target, attempts=inv.attempt + (1 if reason != "retries-exhausted" else 0),
            source=invoke.get("source"),
        )
        self.out.produce(self.app.dlq_topic, k, v, h)
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
        self.invocations.pop(inv.id, None)
        self.dirty.discard(inv)
        self.active.discard(inv)
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
            at, inv_id, index = heapq.heappop(timers)
            if index < 0:
                inv = self.invocations.get(inv_id)
                if inv is not None and inv.phase == BACKING_OFF and inv.retry_at_ms == at:
                    self._start(inv)
                continue
            key = keys.timer(at, inv_id, index)
            raw = self.store.get(key)
            if raw is None:
                continue  # fired already (a duplicate heap entry) or dropped
            self.store.delete(key)
            timer = schemas.decode("timer", raw)
            if timer["kind"] == "SEND":
                self.out.produce(self.app.log_topic, timer["routing_key"], timer["record"],
                                 partition=timer["partition"])
                self.stats.timers_fired += 1
            else:
                self.stats.timers_fired += 1
                self._complete_entry(inv_id, index, None, None)
        if now >= self._next_expiry_sweep:
            self._next_expiry_sweep = now + 1000
            self._expire(now)

    def _complete_entry(self, inv_id: bytes, index: int, value: bytes | None, error: str | None) -> None:
        """A journal entry that waited (sleep, later call/awakeable) completed:
        record it and wake the waiting coroutine, if there is one."""
        inv = self.invocations.get(inv_id)
        if inv is None or index >= len(inv.journal):
            return  # the invocation finished or was dropped; nothing waits
        entry = inv.journal[index]
        if entry.completed:
            return
        entry.completed = True
        if value is not None:
            entry.value = value
        entry.error = error
        if index < inv.journal_written:
            inv.journal_dirty.add(index)
            self.dirty.add(inv)
        fut = self.waiters.pop((inv_id, index), None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def add_timer(self, fire_ms: int, inv_id: bytes, index: int, record: dict[str, Any]) -> None:
        self.store.put_fresh(keys.timer(fire_ms, inv_id, index), schemas.encode("timer", record))
        heapq.heappush(self.timers, (fire_ms, inv_id, index))

    def waiter(self, inv: Invocation, index: int) -> asyncio.Future:
        fut = self.waiters.get((inv.id, index))
        if fut is None:
            fut = self.waiters[(inv.id, index)] = asyncio.get_running_loop().create_future()
        return fut

    def next_timer_ms(self) -> int | None:
        return self.timers[0][0] if self.timers else None

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
            e = journal[i]
            self._put_new(keys.journal(inv.id, i), schemas.encode("journal_entry", {
                "kind": e.kind, "name": e.name, "completed": e.completed, "value": e.value, "error": e.error}))
        inv.journal_written = len(journal)
        for i in inv.journal_dirty:
            e = journal[i]
            store.put(keys.journal(inv.id, i), schemas.encode("journal_entry", {
                "kind": e.kind, "name": e.name, "completed": e.completed, "value": e.value, "error": e.error}))
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

    def after_commit(self, changelog_offset: int | None) -> None:
        self.store.commit(changelog_offset)

    # -- inspection -----------------------------------------------------------------

    def in_flight(self) -> int:
        return len(self.invocations)


class InvocationEffects:
    """What a running invocation's Context may do beyond its own state: the
    effects that must join the partition's transaction or its timers."""

    __slots__ = ("part", "inv")

    def __init__(self, part: PartitionProcessor, inv: Invocation) -> None:
        self.part = part
        self.inv = inv

    def record(self, topic: str, value: Any, key: Any, headers: Any) -> tuple:
        """An emitted record, complete (egress.sinks)."""
        if self.part.effects is None:
            raise RuntimeError("ctx.emit: no sinks are configured")
        return self.part.effects.record(topic, value, key, headers)

    def _live(self, op: str) -> PartitionProcessor:
        """The partition, while this invocation is still its live one. A
        coroutine that outlives a rewind or a revocation (a handler that
        catches CancelledError) must not add effects to a transaction or a
        store that now belong to what Kafka says is committed."""
        part = self.part
        if part.closed or part.invocations.get(self.inv.id) is not self.inv:
            raise asyncio.CancelledError(f"ctx.{op}: the invocation was rewound or moved; dropped")
        return part

    def send(self, target: Any, args: tuple, index: int, delay_ms: int | None) -> bytes:
        """Produce (or schedule) an Invoke of `target` in the open
        transaction; returns the callee's invocation id."""
        part = self._live("send")
        app = part.app
        t = resolve(target, args, app.services)
        callee = child_id(self.inv.id, index)
        # A delivery seen twice is recognised by the callee's partition.
        record = invoke_record(callee, t.service, t.handler, t.key, t.payload, t.payload_format,
                               idempotency_key=f"child:{format_id(self.inv.id)}:{index}")
        routing = t.key if t.key is not None else callee
        partition = partition_for(routing, app.partitions)
        if delay_ms:
            part.add_timer(now_ms() + delay_ms, self.inv.id, index, {
                "kind": "SEND", "partition": partition, "routing_key": routing, "record": record})
        else:
            part.out.produce(app.log_topic, routing, record, partition=partition)
        return callee

    def sleep_until(self, fire_ms: int, index: int) -> None:
        self._live("sleep").add_timer(fire_ms, self.inv.id, index, {
            "kind": "WAKE", "partition": -1, "routing_key": None, "record": None})

    async def wait(self, index: int) -> None:
        """Wait until the journal entry at `index` completes."""
        fut = self._live("sleep").waiter(self.inv, index)
        self.inv.waiting = True
        try:
            await fut
        finally:
            self.inv.waiting = False
