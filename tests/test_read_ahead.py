"""Read-ahead is not persisted (processor/inbox.py, ReadAhead): Invokes read
but not started stay in memory, the log offset commits only up to the first
of them, and the AHEAD record names which offsets above it a re-read still
applies; all others are skipped. Non-idempotent Invokes (random ids) make a
double application visible: each handler appends its item to a list.
"""

from __future__ import annotations

import asyncio

import random
import time
from pathlib import Path
from typing import Any

import pytest

import oncely
from oncely.processor import inbox, keys
from oncely.testing import TestDriver, read_to_end, unique_name
from support import ProcessorProcess, changelog_state, store_kv, wait_for_app_topics, wait_until


def _appender(name: str, inflight: int) -> tuple[oncely.App, Any]:
    app = oncely.App(name, partitions=2)
    app.config.max_inflight_per_partition = inflight
    seq = app.keyed("seq")

    @seq.handler
    async def append(ctx: oncely.KeyedContext, item: int) -> None:
        if item < 0:
            await ctx.sleep(10)  # holds its key: later items wait behind it
        elif item >= 1000:
            await asyncio.sleep(0)  # does not end in its first step: the next items wait for a loop pass
        ctx.set("items", ctx.get("items", []) + [item])

    return app, append


def _held(d: TestDriver) -> int:
    return sum(len(p.ahead.held) for p in d.partitions)


@pytest.mark.parametrize("limit", [1024, 5])  # all held in memory; held and stored mixed
def test_held_read_ahead_is_reread_once_after_a_crash(limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbox, "READ_AHEAD", limit)
    app, append = _appender("ahead", inflight=100)
    with TestDriver(app) as d:
        for k in range(4):
            d.send(append, f"k{k}", -1)
        for item in range(80):
            d.send(append, f"k{item % 4}", item)
            d.send(append, f"free{item}", item)  # applied above the held ones
        d.loop.run_until_complete(d._astep())  # the k* wait (read ahead); committed
        assert _held(d) > 0
        committed = {p.partition: p.store.get(keys.AHEAD) for p in d.partitions}
        assert any(committed.values()), "a commit with held Invokes writes the AHEAD record"
        assert any(c < pos for c, pos in zip(d.committed_position, d.position)), "the offset is held back"
        stored = sum(len(p.store.scan(keys.INBOX)) + len(p.store.scan(keys.READY)) for p in d.partitions)
        assert (stored == 0) == (limit == 1024)
        d.crash()
        d.advance(11)
        for k in range(4):
            assert d.state("seq", f"k{k}") == {"items": [-1, *range(k, 80, 4)]}
        assert all(d.state("seq", f"free{i}") == {"items": [i]} for i in range(80))
        # Applied records below the read position were skipped, not re-read as duplicates.
        assert sum(p.stats.duplicates for p in d.partitions) == 0
        for p in d.partitions:
            assert not p.store.scan(keys.INBOX) and not p.store.scan(keys.READY) and not p.store.scan(keys.QUEUED)
            assert p.store.get(keys.AHEAD) is None and not p.ahead.held


def test_a_duplicate_of_a_held_invocation_is_dropped_across_a_crash() -> None:
    app, append = _appender("aheaddup", inflight=100)
    with TestDriver(app) as d:
        d.send(append, "k", -1)  # holds the key for 10 s
        d.send(append, "k", 1)
        two = d.send(append, "k", 2, idempotency_key="two")
        d.send(append, "k", 2, idempotency_key="two")
        d.loop.run_until_complete(d._astep())  # committed with 1 and 2 held
        assert _held(d) == 2 and d.phase(two) == "INBOXED"
        assert sum(p.stats.duplicates for p in d.partitions) == 1
        d.crash()
        d.send(append, "k", 2, idempotency_key="two")
        d.advance(11)
        assert d.phase(two) == "COMPLETED"
        assert d.state("seq", "k") == {"items": [-1, 1, 2]}


def test_read_ahead_spills_to_the_store_when_it_trails_too_far(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbox, "SPAN", 10)
    app, append = _appender("aheadspan", inflight=100)
    with TestDriver(app) as d:
        d.send(append, "k", -1)  # holds the key for 10 s
        for item in range(30):
            d.send(append, "k", item)
        d.loop.run_until_complete(d._astep())  # committed
        # The queued ones trailed the read position by more than SPAN at the commit.
        assert sum(len(p.store.scan(keys.INBOX)) for p in d.partitions) == 30
        assert _held(d) == 0 and all(p.store.get(keys.AHEAD) is None for p in d.partitions)
        d.crash()
        d.advance(11)
        assert d.state("seq", "k") == {"items": [-1, *range(30)]}


def test_a_key_left_vacant_at_a_commit_that_spills_gets_its_holder_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a commit is prepared a finished holder leaves its key vacant
    (key_queues.py); when that commit spills the key's inbox to the store,
    the next in line must take the key (and its LOCK) first, or after a
    crash nothing would hold the key: the stored inbox would never start and
    a later Invoke would overtake it."""
    monkeypatch.setattr(inbox, "SPAN", 10)
    app, append = _appender("aheadvacant", inflight=100)
    with TestDriver(app) as d:
        for item in range(1000, 1030):
            d.send(append, "k", item)
        d.loop.run_until_complete(d._astep())  # 1000 ran; the rest trailed by more than SPAN: spilled
        assert sum(len(p.store.scan(keys.INBOX)) for p in d.partitions) == 28
        assert sum(len(p.store.scan(keys.LOCK)) for p in d.partitions) == 1, "the key has a holder"
        d.crash()
        d.send(append, "k", 1030)
        d.run()
        assert d.state("seq", "k") == {"items": list(range(1000, 1031))}


@pytest.mark.parametrize("limit,inflight,crash", [(1024, 2, False), (1024, 2, True), (4, 2, True),
                                                   (7, 1, True), (3, 3, True)])
def test_held_entries_behind_suspended_holders_keep_key_order(limit: int, inflight: int, crash: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Holders wait (awakeable) and are suspended: the Invokes held behind
    # them go to the store with them. At a small in-flight limit entries also
    # move from READY into key inboxes; crashes re-read the held ones. Every
    # key's items arrive once, in log order, and nothing is left behind.
    monkeypatch.setattr(inbox, "READ_AHEAD", limit)
    app = oncely.App("aheadsusp", partitions=1)
    app.config.max_inflight_per_partition = inflight
    app.config.suspend_after = 0.5
    seq = app.keyed("seq")
    awks: dict[str, str] = {}

    @seq.handler
    async def append(ctx: oncely.KeyedContext, item: int) -> None:
        if item < 0:
            awk, fut = ctx.awakeable()
            awks[ctx.key] = awk
            await fut
        ctx.set("items", ctx.get("items", []) + [item])

    with TestDriver(app) as d:
        for k in range(3):
            d.send(append, f"k{k}", -1)
        for item in range(60):
            d.send(append, f"k{item % 3}", item)
            if item % 20 == 19:
                d.loop.run_until_complete(d._astep())
                if crash:
                    d.crash()
        d.advance(1)  # the waiting holders are suspended
        assert crash or sum(p.stats.suspensions for p in d.partitions) > 0
        for k in range(3):
            while f"k{k}" not in awks:
                d.advance(1)
            d.resolve_awakeable(awks[f"k{k}"], None)
            d.loop.run_until_complete(d._astep())
            if crash:
                d.crash()
        d.advance(1)
        for k in range(3):
            assert d.state("seq", f"k{k}") == {"items": [-1, *range(k, 60, 3)]}
        assert all(not p.ahead.held and not p.queued and not p.invocations for p in d.partitions)


def test_counter_with_hot_keys_exact_under_kill9(kafka: str, tmp_path: Path) -> None:
    # Few keys and slow handlers: most Invokes wait behind their key at every
    # commit (held read-ahead); kill -9 at random moments must neither lose
    # nor repeat one (a counter: too small or too large shows it).
    app = unique_name("ahead")
    rng = random.Random(13)
    env = {"ONCELY_TEST_APP": app, "ONCELY_TEST_PARTITIONS": "2", "ONCELY_TEST_SLOW": "0.02"}
    proc = ProcessorProcess("tests.apps.counter:app", kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    try:
        wait_for_app_topics(kafka, app)
        client = oncely.Client(kafka, app=app)
        sums: dict[bytes, int] = {}
        for batch in range(6):
            for _ in range(150):  # a backlog below the read-ahead bound
                key = f"k{rng.randrange(6)}"
                amount = rng.randint(1, 9)
                client.send("counter", key, "add", amount)
                sums[key.encode()] = sums.get(key.encode(), 0) + amount
            client.flush(60)
            if batch in (1, 3):
                wait_until(lambda: "ready:" in proc.log_text().split("===== start #")[-1], 60, 0.05,
                           "the processor to run its partitions")
                time.sleep(rng.uniform(0.5, 1.5))
                proc.kill9()
                proc.start()

        def exact() -> bool:
            state = changelog_state(kafka, app)
            return {k: v for (s, k, n), v in state.items() if n == "n"} == sums

        wait_until(exact, 240, 2.0, "every key's exact sum")
        # The premise: commits held read-ahead (AHEAD records), which the
        # store did not hold (few INBOX records next to 3,000 Invokes).
        # (The changelog is compacted, so AHEAD's count is a lower bound.)
        changelog = [r.key for r in read_to_end(kafka, f"{app}.changelog")]
        ahead, inboxed = (sum(1 for k in changelog if k is not None and k[:1] == t) for t in (keys.AHEAD, keys.INBOX))
        print(f"\nchangelog: {ahead} AHEAD, {inboxed} INBOX records for 900 Invokes")
        assert ahead >= 2 and inboxed < 100
        assert proc.stop() == 0, proc.log_text()[-3000:]
        kv = store_kv(tmp_path / "state", app, 2)
        assert not [k for k in kv if k[:1] in (keys.INBOX, keys.READY, keys.QUEUED, keys.AHEAD)]
    finally:
        if proc.alive():
            proc.kill9()


def test_invokes_behind_a_paused_holder_go_to_the_store() -> None:
    app, append = _appender("aheadpause", inflight=100)
    with TestDriver(app) as d:
        first = d.send(append, "k", -1)
        d.send(append, "k", 1)
        d.loop.run_until_complete(d._astep())
        assert _held(d) == 1
        assert d.pause(first) == "applied"
        assert _held(d) == 0 and sum(len(p.store.scan(keys.INBOX)) for p in d.partitions) == 1
        assert d.resume(first) == "applied"
        d.advance(11)
        assert d.state("seq", "k") == {"items": [-1, 1]}
