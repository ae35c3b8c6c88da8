"""Test app of invocation controls (tests/test_controls.py, test_admin_api.py):
a trip that calls a payment waiting on an awakeable and compensates when
the call fails, a long nap, and a short hold that counts its completions."""

import os

import oncely

app = oncely.App(os.environ.get("ONCELY_TEST_APP", "controls-test"),
                 partitions=int(os.environ.get("ONCELY_TEST_PARTITIONS", "2")))
trips = app.keyed("trips")
payments = app.keyed("payments")
audit = app.keyed("audit")
HOLD = float(os.environ.get("ONCELY_TEST_HOLD", "8"))  # long enough to control it while it sleeps


@payments.handler
async def charge(ctx: oncely.KeyedContext) -> object:
    _, fut = ctx.awakeable()  # never resolved: only a cancel ends it
    return await fut


@trips.handler
async def book(ctx: oncely.KeyedContext) -> object:
    try:
        return await ctx.call(charge, ctx.key)
    except oncely.TerminalError as e:
        ctx.send(note, ctx.key, f"compensated: {e.message}")
        raise


@trips.handler
async def nap(ctx: oncely.KeyedContext) -> str:
    await ctx.sleep(3600)
    return "rested"


@trips.handler
async def hold(ctx: oncely.KeyedContext) -> int:
    await ctx.sleep(HOLD)
    n = ctx.get("done", 0) + 1
    ctx.set("done", n)
    return n


@audit.handler
async def note(ctx: oncely.KeyedContext, text: str) -> None:
    ctx.set("log", text)
