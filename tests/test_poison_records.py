"""One record that can never be produced must not stall the process.

A 2 MB state value is larger than the changelog accepts: it is refused where
it is made (ctx.set raises RecordTooLarge), so the invocation fails on its
own. A record for a sink topic deleted after start fails only when the
transaction is committed: the commit aborts, the record's invocation is
failed with the reason, and every other invocation commits after the rewind
instead of the same transaction being replayed forever.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

import oncely
from oncely.testing import create_topic, read_to_end, unique_name
from support import InProcessProcessor, changelog_state, wait_until


def test_poison_invocations_are_dead_lettered_and_the_rest_flows(kafka: str, tmp_path: Path) -> None:
    name = unique_name("poison")
    doomed = create_topic(kafka, unique_name("doomed"), 1)
    app = oncely.App(name, partitions=4, bootstrap=kafka, state_dir=str(tmp_path))
    app.sink(doomed)
    counter = app.keyed("counter")
    caught: list[str] = []

    @counter.handler
    async def add(ctx: oncely.Context, amount: int) -> None:
        ctx.set("n", ctx.get("n", 0) + amount)

    @counter.handler
    async def big(ctx: oncely.Context) -> None:
        ctx.set("blob", "x" * 2_000_000)

    @counter.handler
    async def big_caught(ctx: oncely.Context) -> None:
        try:
            ctx.set("blob", "x" * 2_000_000)
        except oncely.RecordTooLarge as e:
            caught.append(str(e))
        ctx.set("small", 1)

    @counter.handler
    async def emit(ctx: oncely.Context, i: int) -> None:
        ctx.set("emitted", i)
        ctx.emit(doomed, {"i": i})

    runner = InProcessProcessor(app).start()
    sums: dict[bytes, int] = {}
    rng = random.Random(3)
    client = oncely.Client(kafka, app=name)

    def traffic(n: int) -> None:
        for _ in range(n):
            key = f"k{rng.randrange(40)}"
            amount = rng.randint(1, 9)
            client.send(counter.add, key, amount)
            sums[key.encode()] = sums.get(key.encode(), 0) + amount
        client.flush()

    def exact() -> bool:
        state = changelog_state(kafka, name)
        return {k: v for (_, k, n), v in state.items() if n == "n"} == sums

    try:
        traffic(500)
        client.send(counter.emit, "e-before", 1)
        client.flush()
        wait_until(exact, 60, 0.5, "the first sums")
        admin = AdminClient({"bootstrap.servers": kafka})
        admin.delete_topics([doomed])[doomed].result(30)
        traffic(200)
        client.send(counter.big, "big", None)
        client.send(counter.big_caught, "caught", None)
        client.send(counter.emit, "e-after", 2)
        traffic(300)
        client.send(counter.emit, "e-after-2", 3)
        traffic(300)
        wait_until(exact, 120, 0.5, "exact sums for every other key")

        def dead() -> dict[bytes, dict[str, str]]:
            return {r.key: {k: v.decode() for k, v in r.headers} for r in read_to_end(kafka, f"{name}.dlq")}

        wait_until(lambda: len(dead()) >= 3, 60, 0.5, "three dead letters")
        letters = dead()
    finally:
        runner.stop()
    assert set(letters) == {b"big", b"e-after", b"e-after-2"}, letters
    assert letters[b"big"]["oncely.reason"] == "terminal"
    assert "ctx.set('blob')" in letters[b"big"]["oncely.error"] and "2000003 bytes" in letters[b"big"]["oncely.error"]
    for key in (b"e-after", b"e-after-2"):
        assert letters[key]["oncely.reason"] == "unproducible", letters[key]
        assert doomed in letters[key]["oncely.error"], letters[key]
    state = changelog_state(kafka, name)
    # (It may have run more than once: a rewind replays what an abort dropped.)
    assert state.get(("counter", b"caught", "small")) == 1 and caught, "a caught RecordTooLarge"
    assert ("counter", b"big", "blob") not in state
    assert state.get(("counter", b"e-before", "emitted")) == 1
    assert ("counter", b"e-after", "emitted") not in state, "a failed invocation's state must not commit"


@pytest.mark.parametrize("path", ["in place", "general"])
def test_an_error_applying_an_outcome_fails_that_invocation_and_frees_its_key(kafka: str, tmp_path: Path,
                                                                               monkeypatch, path: str) -> None:
    # Fault injection: applying one invocation's outcome raises inside the
    # engine, once. It used to end in asyncio's exception handler, leaving the
    # invocation RUNNING and its key locked for good. Both ways an outcome is
    # applied: in place (first_step._complete, a handler that returns None)
    # and the general one (outcomes.complete, a handler that returns a value).
    from oncely.processor.store import PartitionStore
    from oncely.sdk.protocol import encode_value

    real = PartitionStore.put
    fired: list[bytes] = []

    def failing(store, key, value):  # type: ignore[no-untyped-def]
        if value == encode_value(14) and not fired:  # k's state after 1 and 13: the second invocation's
            fired.append(key)
            raise RuntimeError("injected fault")
        return real(store, key, value)

    monkeypatch.setattr(PartitionStore, "put", failing)
    name = unique_name("fault")
    app = oncely.App(name, partitions=2, bootstrap=kafka, state_dir=str(tmp_path))
    counter = app.keyed("counter")

    @counter.handler
    async def add(ctx: oncely.Context, amount: int) -> int | None:
        n = ctx.get("n", 0) + amount
        ctx.set("n", n)
        return n if path == "general" else None

    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=name)
        for amount in (1, 13, 2):
            client.send(counter.add, "k", amount)
        client.send(counter.add, "other", 5)
        client.flush()
        wait_until(lambda: changelog_state(kafka, name).get(("counter", b"k", "n")) == 3, 60, 0.3,
                   "the key to be free again after the failed invocation")
        letters = read_to_end(kafka, f"{name}.dlq")
    finally:
        runner.stop()
    assert fired, "the fault was injected"
    assert len(letters) == 1
    headers = {k: v.decode() for k, v in letters[0].headers}
    assert headers["oncely.reason"] == "internal-error" and "injected fault" in headers["oncely.error"], headers
    assert changelog_state(kafka, name).get(("counter", b"other", "n")) == 5
