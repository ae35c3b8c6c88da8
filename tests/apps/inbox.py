"""Test app for the durable inbox: a hot key and a backlog of callers."""

import os

import oncely

app = oncely.App(os.environ.get("ONCELY_TEST_APP", "inbox-test"), partitions=4)
RESULTS = os.environ.get("ONCELY_TEST_RESULTS", "inbox-results")
app.sink(RESULTS)

hot = app.keyed("hot")
caller = app.keyed("caller")
leaf = app.keyed("leaf")


@hot.handler
async def add(ctx: oncely.Context, n: int) -> None:
    count = ctx.get("count", 0) + 1
    ctx.set("count", count)
    ctx.set("sum", ctx.get("sum", 0) + n)
    if count % 10_000 == 0:
        ctx.emit(RESULTS, {"hot": count}, key="hot")


@leaf.handler
async def double(ctx: oncely.Context, n: int) -> int:
    ctx.set("calls", ctx.get("calls", 0) + 1)
    return 2 * n


@caller.handler
async def go(ctx: oncely.Context, n: int) -> None:
    result = await ctx.call(double, f"l{n % 500}", n)
    ctx.set("result", result)
    ctx.emit(RESULTS, {"caller": n, "result": result}, key=str(n))
