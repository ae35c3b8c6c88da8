"""Test app: a keyed counter. Name and partitions come from the environment
so each test gets its own topics; ONCELY_TEST_SETTINGS (JSON) gives more App
keyword arguments."""

import asyncio
import os

import orjson

import oncely

app = oncely.App(
    os.environ.get("ONCELY_TEST_APP", "counter-test"),
    partitions=int(os.environ.get("ONCELY_TEST_PARTITIONS", "8")),
    retry=oncely.RetryPolicy(max_attempts=5, initial_interval=0.05, max_interval=0.5),
    **orjson.loads(os.environ.get("ONCELY_TEST_SETTINGS", "{}")),
)
counter = app.keyed("counter")
SLOW = float(os.environ.get("ONCELY_TEST_SLOW", "0"))


@counter.handler
async def add(ctx: oncely.Context, amount: int) -> int:
    n = ctx.get("n", 0)
    if SLOW:
        # Widen the window in which an invocation is in flight at a commit.
        await asyncio.sleep(SLOW * ctx.random())
    ctx.set("n", n + amount)
    ctx.set("count", ctx.get("count", 0) + 1)
    return n + amount
