"""Test app for local starts (tests/test_local_start.py): a subscription on
ONCELY_TEST_SOURCE to a keyed handler that appends each record's number to
its key's state list and emits it to ONCELY_TEST_RESULTS. A record with
"busy" set waits (a durable sleep) first, so its key stays held and the
records behind it go through the log."""

import os

import orjson

import oncely


def build(name: str, source: str, results: str, partitions: int = 4, **config: object) -> oncely.App:
    app = oncely.App(name, partitions=partitions)
    for k, v in config.items():
        setattr(app.config, k, v)
    seq = app.keyed("seq")
    app.sink(results)

    @seq.handler
    async def add(ctx: oncely.KeyedContext, rec: dict) -> None:
        if rec.get("busy"):
            await ctx.sleep(rec["busy"])
        seen = ctx.get("seen", [])
        seen.append(rec["n"])
        ctx.set("seen", seen)
        ctx.emit(results, {"k": rec["k"], "n": rec["n"]}, key=rec["k"])

    app.subscribe(source, add)
    return app


app = build(os.environ.get("ONCELY_TEST_APP", "local-order-test"),
            os.environ.get("ONCELY_TEST_SOURCE", "local-order-source"),
            os.environ.get("ONCELY_TEST_RESULTS", "local-order-results"),
            int(os.environ.get("ONCELY_TEST_PARTITIONS", "4")),
            **orjson.loads(os.environ.get("ONCELY_TEST_SETTINGS", "{}")))
