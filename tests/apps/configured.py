"""Test app: App keyword arguments from the environment (ONCELY_TEST_SETTINGS,
JSON), to check how wrong settings are reported."""

import os

import orjson

import oncely

app = oncely.App(os.environ.get("ONCELY_TEST_APP", "configured-test"), partitions=2,
                 **orjson.loads(os.environ.get("ONCELY_TEST_SETTINGS", "{}")))
counter = app.keyed("counter")


@counter.handler
async def add(ctx: oncely.Context, amount: int) -> int:
    n = ctx.get("n", 0) + amount
    ctx.set("n", n)
    return n
