"""A duplicate of a suspended invocation is a duplicate, not a new one.

A suspended invocation lives only in the store, so a duplicate check that
looks at memory and at finished invocations misses it: a keyed duplicate
queued behind the original's lock and swallowed its completion (the key
stayed locked for good); a stateless one ran again from an empty journal.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import oncely
from oncely import schemas
from oncely.testing import produce, read_to_end, unique_name
from support import InProcessProcessor, changelog_state, wait_until


def _app(kafka: str, tmp_path: Path) -> tuple[oncely.App, dict]:
    app = oncely.App(unique_name("dupsusp"), partitions=4, bootstrap=kafka, state_dir=str(tmp_path))
    app.config.suspend_after = 0.5
    seen: dict = {"started": Counter(), "awk": {}, "done": Counter()}

    def started(name: str) -> str:
        seen["started"][name] += 1
        return name

    keyed = app.keyed("keyed")
    free = app.service("free")

    @keyed.handler
    async def wait(ctx: oncely.Context) -> None:
        await ctx.run("start", started, f"keyed/{ctx.key}")
        awk, fut = ctx.awakeable()
        seen["awk"][f"keyed/{ctx.key}"] = awk
        ctx.set("got", await fut)
        seen["done"][f"keyed/{ctx.key}"] += 1

    @free.handler
    async def wait_free(ctx: oncely.Context, name: str) -> None:
        await ctx.run("start", started, f"free/{name}")
        awk, fut = ctx.awakeable()
        seen["awk"][f"free/{name}"] = awk
        await fut
        seen["done"][f"free/{name}"] += 1

    return app, seen


def test_a_duplicate_of_a_suspended_invocation_is_dropped_and_the_original_resumes(kafka: str,
                                                                                      tmp_path: Path) -> None:
    app, seen = _app(kafka, tmp_path)
    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=app.name)
        client.send("keyed", "k1", "wait", None, idempotency_key="retry-me")
        client.send("free", None, "wait_free", "s1", idempotency_key="retry-me-too")
        client.flush()
        names = ["keyed/k1", "free/s1"]
        wait_until(lambda: all(n in seen["awk"] for n in names), 30, 0.05, "both awakeables")
        parts = runner.processor.partitions
        wait_until(lambda: runner.on_loop(lambda: sum(p.suspended for p in parts.values())) == 2, 30, 0.1,
                   "both to suspend")

        # A client retry with the same idempotency key, and a re-delivered
        # copy of the stateless Invoke (as a replay without new ids makes).
        client.send("keyed", "k1", "wait", None, idempotency_key="retry-me")
        client.flush()
        invokes = [r for r in read_to_end(kafka, app.log_topic)
                   if (b := schemas.decode("log_record", r.value)["body"])[0] == "oncely.Invoke"
                   and b[1]["service"] == "free"]
        assert len(invokes) == 1
        produce(kafka, app.log_topic, [(invokes[0].key, invokes[0].value)], partition=invokes[0].partition)
        wait_until(lambda: runner.on_loop(lambda: sum(p.stats.duplicates for p in parts.values())) == 2, 30, 0.1,
                   "both duplicates to be recognised")

        for n in names:
            client.resolve_awakeable(seen["awk"][n], {"v": n})
        wait_until(lambda: all(seen["done"][n] for n in names), 30, 0.1, "both originals to resume and finish")
        wait_until(lambda: changelog_state(kafka, app.name).get(("keyed", b"k1", "got")) == {"v": "keyed/k1"},
                   30, 0.3, "the keyed result in the changelog")
        # The key is free again: a new invocation of it runs to its awakeable.
        client.send("keyed", "k1", "wait", None)
        client.flush()
        wait_until(lambda: seen["started"]["keyed/k1"] == 2, 30, 0.1, "a later invocation of the same key")
    finally:
        runner.stop()
    assert seen["started"] == Counter({"keyed/k1": 2, "free/s1": 1}), "a duplicate ran its handler again"
    assert seen["done"] == Counter({"keyed/k1": 1, "free/s1": 1})
