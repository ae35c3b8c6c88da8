"""`TestDriver`: run an app's handlers without Kafka, for fast unit tests.

The counterpart of Kafka Streams' TopologyTestDriver and Restate's test
harness. It runs the real partition engine (key locks, the durable inbox,
journals, timers, suspension, dedup) on real RocksDB stores, with an
in-memory log and output instead of Kafka. A `commit()` plays the part of
the Kafka transaction: store changes, produced records and consumed
positions become durable together; `crash()` drops everything since the
last commit (memory, the stores' overlays, uncommitted records) and restarts
the partitions from their stores, the path recovery takes after kill -9.

It is not a replacement for tests against a broker of anything Kafka does
(transactions, rebalances, restore from the changelog).
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from oncely import schemas
from oncely.admin import parse_state_key
from oncely.app import App
from oncely.egress.sinks import Sinks
from oncely.kafka_io import Record
from oncely.processor import controls, dispatch, handover, keys
from oncely.driver_replay import ReplayChecking
from oncely.processor.executor import LocalExecutor
from oncely.processor.partition import PartitionProcessor
from oncely.processor.store import PartitionStore
from oncely.sdk.protocol import Entry, decode_value, encode_value
from oncely.shuffle.delivery import awakeable_result
from oncely.shuffle.envelope import invoke_record
from oncely.shuffle.ids import format_id, idempotent_id, parse_awakeable, parse_id, random_id
from oncely.shuffle.routing import partition_for
from oncely.shuffle.targets import resolve


class _Message:
    """A log record as the dispatcher reads it (the confluent_kafka.Message API it uses)."""

    __slots__ = ("_topic", "_partition", "_offset", "_key", "_value")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes) -> None:
        self._topic, self._partition, self._offset, self._key, self._value = topic, partition, offset, key, value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes:
        return self._value


class _Output:
    """The open "transaction": records wait here until `commit()`."""

    def __init__(self, driver: "TestDriver") -> None:
        self.driver = driver
        self.pending: list[Record] = []
        self.faults: list[str] = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]] | None = None, partition: int | None = None,
                owner: bytes | None = None) -> None:
        self.pending.append(Record(key, value, list(headers or []), partition if partition is not None else 0,
                                   0, topic, int(time.time() * 1000)))

    def fault(self, inv_id: bytes, why: str) -> None:
        self.driver.poisoned[inv_id] = why
        self.faults.append(f"{format_id(inv_id)}: {why}")


class TestDriver:
    """Runs `app`'s handlers on real RocksDB stores in `state_dir` (a
    temporary directory by default), with an in-memory log and output.

    With `always_replay=True` every waiting invocation is suspended at each
    step (so it resumes by replay), and every attempt's outcome is checked by
    replaying the handler from its journal: a handler that is not
    deterministic makes `run()` raise AssertionError.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, app: App, state_dir: str | Path | None = None, always_replay: bool = False) -> None:
        self.app = app
        self._own_dir = state_dir is None
        self.state_dir = Path(state_dir) if state_dir is not None else Path(tempfile.mkdtemp(prefix="oncely-driver-"))
        self.always_replay = always_replay
        self.replay_failures: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.out = _Output(self)
        self.sinks = Sinks(app.sinks, lambda topic: True)
        self.executor = ReplayChecking(app, self.replay_failures) if always_replay else LocalExecutor(app)
        self.skew_ms = 0
        n = app.partitions
        # The log holds committed records only: produced ones wait in `out` until a commit.
        self.log: list[list[tuple[bytes | None, bytes]]] = [[] for _ in range(n)]
        self.position = [0] * n  # next log offset to read
        self.committed_position = [0] * n
        self._read_at_commit = [0] * n
        self.output: list[Record] = []  # committed records for user topics and the dlq
        self.poisoned: dict[bytes, str] = {}
        self.stores = [self._open(p) for p in range(n)]
        self.partitions: list[PartitionProcessor] = []
        self._start_partitions()

    # -- lifecycle --------------------------------------------------------------

    def _open(self, p: int) -> PartitionStore:
        store = PartitionStore(self.state_dir / str(p), self.app.name, self.app.partitions, p)
        store.open()
        return store

    def _new_partitions(self) -> None:
        """Partition processors loaded from the stores (on the loop: loading
        resumes running invocations)."""
        self.partitions = []
        for p, store in enumerate(self.stores):
            part = PartitionProcessor(self.app, p, store, self.executor, self.out, sinks=self.sinks,
                                      poisoned=self.poisoned)
            part.load()
            self.partitions.append(part)

    def _start_partitions(self) -> None:
        async def start() -> None:
            self._new_partitions()

        self.loop.run_until_complete(start())

    def _rewind(self, reopen: bool) -> None:
        """Back to the last commit: memory, overlays, uncommitted records and
        read positions go; the partitions load again from their stores."""
        for part in self.partitions:
            part.close()
            part.store.drop_overlay()
        self.out.pending.clear()
        self.out.faults.clear()
        self.position = list(self.committed_position)
        if reopen:
            for store in self.stores:
                store.close()
            self.stores = [self._open(p) for p in range(self.app.partitions)]
        self._new_partitions()

    def crash(self) -> None:
        """Lose everything since the last commit, as a kill -9 would, and
        restart every partition from its store (recovery by replay)."""
        async def crash() -> None:
            self._rewind(reopen=True)
            await asyncio.sleep(0)

        self.loop.run_until_complete(crash())

    def close(self) -> None:
        for part in self.partitions:
            part.close()
        local = getattr(self.executor, "local", self.executor)
        local.cancel_spare()
        self.loop.run_until_complete(asyncio.sleep(0))
        for store in self.stores:
            store.close()
        self.loop.close()
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> "TestDriver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- input --------------------------------------------------------------------

    def send(self, target: Any, *args: Any, idempotency_key: str | None = None,
             idempotency_retention: float | None = None) -> str:
        """Append an Invoke to the log, as `Client.send` would; returns its id.
        Every invocation the driver sends keeps its result (see `result`)."""
        t = resolve(target, args, self.app.services)
        key = idempotency_key or f"driver:{random_id().hex()}"
        inv_id = idempotent_id(t.service, t.handler, t.key, key)
        record = invoke_record(inv_id, t.service, t.handler, t.key, t.payload, t.payload_format,
                               idempotency_key=key, idempotency_retention_ms=int(idempotency_retention * 1000)
                               if idempotency_retention else None)
        routing = t.key if t.key is not None else inv_id
        self._append(partition_for(routing, self.app.partitions), routing, record)
        return format_id(inv_id)

    def resolve_awakeable(self, awakeable_id: str, value: Any = None) -> None:
        _, p, inv_id, index = parse_awakeable(awakeable_id)
        self._append(p, inv_id, awakeable_result(inv_id, index, encode_value(value), None, None))

    def reject_awakeable(self, awakeable_id: str, reason: str) -> None:
        _, p, inv_id, index = parse_awakeable(awakeable_id)
        self._append(p, inv_id, awakeable_result(inv_id, index, None, reason, None))

    # -- operators' controls (processor/controls.py) ------------------------------------

    def cancel(self, invocation_id: str) -> str:
        """Cancel (cooperatively) and run; the partition's answer: "applied",
        "unknown" or "conflict: why". So for kill, pause, resume, purge."""
        return self._control(invocation_id, "cancel")

    def kill(self, invocation_id: str) -> str:
        return self._control(invocation_id, "kill")

    def pause(self, invocation_id: str) -> str:
        return self._control(invocation_id, "pause")

    def resume(self, invocation_id: str) -> str:
        return self._control(invocation_id, "resume")

    def purge(self, invocation_id: str) -> str:
        return self._control(invocation_id, "purge")

    def describe(self, invocation_id: str) -> dict[str, Any] | None:
        """What `oncely invocations describe` shows (None: unknown)."""
        answer = self._ask(invocation_id, "oncely.Query", {"phases": [], "limit": 1})
        return orjson.loads(answer["value"])[0] if answer["status"] == "info" else None

    def _control(self, invocation_id: str, action: str) -> str:
        answer = self._ask(invocation_id, "oncely.Control", {"action": action})
        return answer["status"] if answer["error"] is None else f"{answer['status']}: {answer['error']}"

    def _ask(self, invocation_id: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            part, inv_id = self._where(invocation_id)
        except KeyError:
            return {"status": "unknown", "error": None, "value": None}
        rid = random_id()
        self._append(part.partition, inv_id, schemas.encode("log_record", {"body": (kind, {
            **body, "invocation_id": inv_id, "reply": {"request_id": rid, "partition": 0}})}))
        self.run()
        found = [r for r in self.output if r.topic == self.app.replies_topic and r.key == rid]
        return schemas.decode("reply", found[-1].value)  # type: ignore[arg-type]

    def _append(self, p: int, key: bytes | None, value: bytes) -> None:
        """A record that is in the log at once (sent from outside, already committed)."""
        self.log[p].append((key, value))

    # -- running --------------------------------------------------------------------

    def run(self, max_rounds: int = 10_000) -> None:
        """Process until nothing is left to do now: read the log, run
        handlers, fire due timers, commit; repeat while records appear."""
        for _ in range(max_rounds):
            if not self._step():
                break
        if self.replay_failures:
            raise AssertionError("non-deterministic handlers (always_replay): " + "; ".join(self.replay_failures))

    def advance(self, seconds: float) -> None:
        """Move the driver's clock forward: timers, retries and suspensions
        due within it happen now (what is scheduled afterwards is measured
        from the wall clock, so it is due once its delay is within the total
        advance), then `run()`."""
        self.skew_ms += int(seconds * 1000)
        self.run()

    def now_ms(self) -> int:
        return int(time.time() * 1000) + self.skew_ms

    def _step(self) -> bool:
        return self.loop.run_until_complete(self._astep())

    async def _astep(self) -> bool:
        read = 0
        for p, part in enumerate(self.partitions):
            entries = self.log[p]
            while self.position[p] < len(entries):
                key, value = entries[self.position[p]]
                dispatch.log_record(self.app, part, _Message(self.app.log_topic, p, self.position[p], key, value),
                                    self.out)
                self.position[p] += 1
                read += 1
        # As the commit loop drains before a commit: a key holder that
        # finishes meanwhile leaves its key vacant until the commit is over.
        for part in self.partitions:
            part.preparing = True
        try:
            await self._settle()
            return self.commit() or read > 0
        finally:
            for part in self.partitions:
                handover.prepared(part)

    async def _settle(self) -> None:
        """Let handlers run until none progresses (the rest waits)."""
        quiet = 0
        while quiet < 5:
            before = self._progress()
            for part in self.partitions:
                part.pump()
                part.fire_timers(self.now_ms())
                if self.always_replay:
                    part.suspend_waiting()
            for _ in range(3):
                await asyncio.sleep(0)
            await asyncio.sleep(0.001)  # ctx.run steps in threads
            quiet = quiet + 1 if self._progress() == before and not self._busy() else 0

    def _progress(self) -> tuple[int, ...]:
        return tuple(sum(dataclasses.astuple(p.stats)) + len(p.invocations) + p.waits.woken + len(p.store.overlay)
                     for p in self.partitions) + (len(self.out.pending),)

    def _busy(self) -> bool:
        return any(not inv.waiting for p in self.partitions for inv in p.active)

    def commit(self) -> bool:
        """Make everything since the last commit durable, as a committed
        Kafka transaction would; returns whether there was anything."""
        if self.out.faults:
            # The engine aborts such a transaction; the invocation fails when it starts again.
            self._rewind(reopen=False)
            return True
        changed = bool(self.out.pending) or self.position != self._read_at_commit or any(
            p.store.has_changes() or p.writer.dirty for p in self.partitions)
        if not changed:
            return False
        for part in self.partitions:
            part.prepare_commit()
            part.after_commit(None)
        for r in self.out.pending:
            if r.topic == self.app.log_topic:
                self.log[r.partition].append((r.key, r.value))  # type: ignore[arg-type]
            else:
                self.output.append(r)
        self.out.pending.clear()
        self._read_at_commit = list(self.position)
        # Up to each partition's first Invoke read but not applied (held in memory).
        self.committed_position = [pos if off is None else off for pos, off in
                                   zip(self.position, (part.commit_offset() for part in self.partitions))]
        return True

    # -- inspection -----------------------------------------------------------------

    def state(self, service: str, key: str | bytes) -> dict[str, Any]:
        """A key's committed state, decoded."""
        kb = key.encode() if isinstance(key, str) else key
        sk = keys.service_key(service, kb)
        store = self.stores[partition_for(kb, self.app.partitions)]
        return {parse_state_key(k)[2]: decode_value(v) for k, v in store.scan(keys.state_prefix(sk))}

    def _where(self, invocation_id: str) -> tuple[PartitionProcessor, bytes]:
        inv_id = parse_id(invocation_id)
        for part in self.partitions:
            # (describe also finds an Invoke held in memory without an idempotency key)
            if part.lookup(inv_id) is not None or controls.describe(part, inv_id) is not None:
                return part, inv_id
        raise KeyError(f"invocation {invocation_id} is not known to any partition")

    def phase(self, invocation_id: str) -> str:
        """INBOXED, RUNNING, BACKING_OFF, PAUSED, SUSPENDED, COMPLETED or FAILED."""
        part, inv_id = self._where(invocation_id)
        return part.lookup(inv_id)  # type: ignore[return-value]

    def result(self, invocation_id: str) -> Any:
        """A completed invocation's return value (TerminalError message as
        an AssertionError when it failed)."""
        part, inv_id = self._where(invocation_id)
        raw = part.store.get(keys.dedup(inv_id))
        if raw is None:
            raise AssertionError(f"invocation {invocation_id} has not completed ({part.lookup(inv_id)})")
        d = schemas.decode("dedup_entry", raw)
        if d["failed"]:
            raise AssertionError(f"invocation {invocation_id} failed: {d['error']}")
        return decode_value(d["result"]) if d["result"] is not None else None

    def journal(self, invocation_id: str) -> list[Entry]:
        """An in-flight invocation's journal (from memory or the store)."""
        part, inv_id = self._where(invocation_id)
        inv = part.invocations.get(inv_id)
        if inv is not None:
            return list(inv.journal)
        return [Entry.decode(v) for _, v in part.store.scan(keys.journal_prefix(inv_id))]

    def emitted(self, topic: str) -> list[Any]:
        """Committed records emitted to `topic`, values decoded from JSON."""
        return [orjson.loads(r.value) if r.value is not None else None for r in self.output if r.topic == topic]

    def dead_letters(self) -> list[Record]:
        return [r for r in self.output if r.topic == self.app.dlq_topic]
